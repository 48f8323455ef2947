"""`wsd-llms chat`'s interactive loop over a scripted runtime: Ctrl-C stops a reply, drops that
turn and closes its stream (which cancels the request), and the chat goes on. Ctrl-C while the
models load exits at once."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text

from terminal import python_child
from wsd_llms.cli import _interactive, main, stats_line, stream_reply
from wsd_llms.errors import PromptTooLongError, RequestFailedError
from wsd_llms.events import Event, FinalEvent, TextDelta, Timings, Usage, WSDResult


class Scripted:
    """Streams one piece, then the result; counts the streams closed. Each message counts 10 tokens
    of a 1000-token window."""

    loaded = True

    def __init__(self) -> None:
        self.calls: list[list[dict[str, str]]] = []
        self.closed = 0
        self.window = 1000

    def context_window(self, mode: str = "online") -> int:
        return self.window

    def window_tokens(self, messages: list[dict[str, str]], **params: Any) -> int:
        return 10 * len(messages)

    def stream(self, messages: list[dict[str, str]], **params: Any) -> Iterator[Event]:
        self.calls.append(messages)
        try:
            yield TextDelta("Once upon", "draft")
            yield FinalEvent(WSDResult("Once upon", "stop", None, "Once upon", Usage(), Timings(total=1.0), "d", "b", "online"))
        finally:
            self.closed += 1


class CtrlCOnce(Console):
    """A console where Ctrl-C arrives while the first reply's text is written (the stream is
    paused at that point, so only closing it cancels the request)."""

    class File(io.StringIO):
        fired = False

        def write(self, text: str) -> int:
            if not self.fired and "Once upon" in text:
                self.fired = True
                raise KeyboardInterrupt
            return super().write(text)

    def __init__(self, answers: list[str]) -> None:
        super().__init__(file=self.File(), force_terminal=False)
        self.answers = iter(answers)

    def input(self, *args: Any, **kwargs: Any) -> str:
        return next(self.answers)


class Switching(Scripted):
    """A reply the base takes over."""

    def stream(self, messages: list[dict[str, str]], **params: Any) -> Iterator[Event]:
        yield TextDelta("Paris", "draft")
        yield TextDelta(" is the capital.", "base")
        yield FinalEvent(WSDResult("Paris is the capital.", "stop", 1, "Paris", Usage(), Timings(total=1.0), "d", "b", "online"))


PARAMS = {"max_tokens": 100, "max_draft_tokens": 512, "mode": "online"}


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_the_hand_over_marker_shows_on_a_terminal_only(terminal: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """On a terminal a ▸ marks where the base took over; in a pipe or a file stdout holds the reply's
    text alone (Rich's FORCE_COLOR would call a pipe a terminal), and the facts go to stderr."""
    console = Console(file=Tty() if terminal else io.StringIO(), force_terminal=True, width=200)
    stream_reply(console, Switching(), [{"role": "user", "content": "?"}], {})  # type: ignore[arg-type]
    shown = console.file.getvalue()
    if terminal:
        assert "Paris ▸  is the capital." in Text.from_ansi(shown).plain
    else:
        assert shown == "Paris is the capital.\n"
    assert "switch after 1 draft tokens" in capsys.readouterr().err


class Written(Scripted):
    """A reply with a tab, a carriage return, a bell, a form feed and text that looks like markup."""

    TEXT = "all:\n\tcc -o x x.c\r\nbell\x07 ff\x0c [bold]x[/bold] 🙂"

    def stream(self, messages: list[dict[str, str]], **params: Any) -> Iterator[Event]:
        yield TextDelta(self.TEXT[:9], "draft")
        yield TextDelta(self.TEXT[9:], "base")
        yield FinalEvent(WSDResult(self.TEXT, "stop", 1, self.TEXT[:9], Usage(), Timings(total=1.0), "d", "b", "online"))


def test_a_piped_reply_is_its_text_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """`wsd-llms chat "write a Makefile" > Makefile`: Rich had turned the tab into spaces, dropped
    the carriage return and other control characters, and under FORCE_COLOR coloured the file."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    console = Console(file=io.StringIO(), highlight=False)
    stream_reply(console, Written(), [{"role": "user", "content": "?"}], {})  # type: ignore[arg-type]
    assert console.file.getvalue() == Written.TEXT + "\n"


class FailsMidway(Scripted):
    def stream(self, messages: list[dict[str, str]], **params: Any) -> Iterator[Event]:
        yield TextDelta("Partial answer", "draft")
        raise RequestFailedError("request timed out after 5 s")


def test_a_turn_that_fails_after_some_text_ends_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The error note had followed the reply's text on the same line; the prompt, on stderr, is not
    in the replies either."""
    console = Answers(["Hi", ""])
    assert _interactive(console, FailsMidway(), [], PARAMS) == 0  # type: ignore[arg-type]
    assert console.file.getvalue() == "Partial answer\n"
    err = capsys.readouterr().err
    assert "you> " in err and "error: request timed out after 5 s (this turn is dropped)" in err


def test_ctrl_c_stops_the_reply_and_drops_the_turn(capsys: pytest.CaptureFixture[str]) -> None:
    runtime, console = Scripted(), CtrlCOnce(["Tell me a story.", "Hi", ""])
    history: list[dict[str, str]] = []
    assert _interactive(console, runtime, history, PARAMS) == 0  # type: ignore[arg-type]
    assert runtime.closed == 2 and "stopped" in capsys.readouterr().err  # on stderr: stdout holds replies
    assert runtime.calls[1] == [{"role": "user", "content": "Hi"}]  # the stopped turn is not in the history
    assert history == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once upon"}]


def test_a_reply_stopped_as_it_is_written_does_not_show_again_in_the_next() -> None:
    """On a terminal, a Ctrl-C inside Rich's write left the text in its buffer, which it clears only
    after writing: the next turn's reply began with the stopped one's text."""

    class TtyCtrlCOnce(CtrlCOnce):
        class File(CtrlCOnce.File):
            def isatty(self) -> bool:
                return True

        def __init__(self, answers: list[str]) -> None:
            Console.__init__(self, file=self.File(), force_terminal=True, width=200)
            self.answers = iter(answers)

    console = TtyCtrlCOnce(["Tell me a story.", "Hi", ""])
    assert _interactive(console, Scripted(), [], PARAMS) == 0  # type: ignore[arg-type]
    assert re.sub(r"\x1b\[[0-9;]*m", "", console.file.getvalue()) == "Once upon\n"  # (Rich 14's from_ansi drops the newline)


def test_a_piped_chat_shows_each_question_after_its_prompt(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`wsd-llms chat < questions.txt`: no terminal shows the lines read, so they are shown here, as
    read (a tab stays a tab); the facts and the next prompt had followed "you> " on its line, and the
    quitting empty line left the last prompt unended. stdout still holds the replies alone."""
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # a pipe (under `pytest -s` at a terminal too)
    console = Answers(["Hi", "And\tyou?", ""])
    assert _interactive(console, Scripted(), [], PARAMS) == 0  # type: ignore[arg-type]
    assert console.file.getvalue() == "Once upon\nOnce upon\n"
    prompts = [line for line in capsys.readouterr().err.splitlines() if line.startswith("you>")]
    assert prompts == ["you> Hi", "you> And\tyou?", "you> "]


def test_a_chat_with_stdin_closed_ends_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`wsd-llms chat <&-`: no question can come (it raised AttributeError, a traceback)."""
    monkeypatch.setattr(sys, "stdin", None)
    assert _interactive(Answers([]), Scripted(), [], PARAMS) == 0  # type: ignore[arg-type]


def test_a_line_that_is_not_utf8_drops_its_turn(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A strict reader (PYTHONIOENCODING=utf-8, a UTF-8 locale) had raised UnicodeDecodeError: a
    traceback ended the chat. The line is reported and the chat goes on."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff?\nHi\n\n"), encoding="utf-8"))
    runtime = Scripted()
    assert _interactive(Console(file=io.StringIO()), runtime, [], PARAMS) == 0  # type: ignore[arg-type]
    assert "error: this line is not valid UTF-8 (this turn is dropped)" in capsys.readouterr().err
    assert runtime.calls == [[{"role": "user", "content": "Hi"}]]


def test_ctrl_c_while_the_turn_is_measured_ends_the_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A Ctrl-C in window_tokens, before the turn's stream starts, had left "(stopped; ...)" on the
    line of the terminal's ^C; the chat goes on, the history as it was."""
    monkeypatch.setattr(sys, "stdin", Tty())  # typed: the terminal shows the question

    class CtrlCMeasuring(Scripted):
        def window_tokens(self, messages: list[dict[str, str]], **params: Any) -> int:
            raise KeyboardInterrupt

    runtime = CtrlCMeasuring()
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert _interactive(CtrlCOnce(["Tell me a story.", ""]), runtime, history, PARAMS) == 0  # type: ignore[arg-type]
    assert "you> \n(stopped; this turn is dropped)" in capsys.readouterr().err
    assert runtime.calls == [] and len(history) == 2


def test_an_interactive_chat_loads_the_models_before_its_first_question(monkeypatch: pytest.MonkeyPatch) -> None:
    """As for one question: the first turn's time to first token and tok/s are the reply's own, not
    the load's (they had read 28.8 s and 0.4 tok/s)."""

    order: list[str] = []
    runtime = Scripted()
    runtime.load = lambda: order.append("load")  # type: ignore[attr-defined]
    monkeypatch.setattr("wsd_llms.runtime.get_runtime", lambda *args: runtime)
    monkeypatch.setattr(Console, "input", lambda self, *args, **kwargs: order.append("input") or "")
    assert main(["chat"]) == 0 and order == ["load", "input"]


@pytest.mark.parametrize("at", ["prompt", "first text", "mid-reply"])
def test_ctrl_c_leaves_stdout_the_reply_alone(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], at: str) -> None:
    """Ctrl-C at the `you> ` prompt, or before a reply's first text, ends the ^C's line on stderr:
    stdout, piped or in a file, holds replies alone (it had got a lone newline). One that stops a
    reply ends the reply's line there."""

    class Stopped(Scripted):
        def stream(self, messages: list[dict[str, str]], **params: Any) -> Iterator[Event]:
            if at == "mid-reply":
                yield TextDelta("Once", "draft")
            raise KeyboardInterrupt

    runtime = Stopped()
    runtime.load = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setattr("wsd_llms.runtime.get_runtime", lambda *args: runtime)
    if at == "prompt":
        monkeypatch.setattr(Console, "input", lambda self, *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["chat"] if at == "prompt" else ["chat", "hi"]) == 130
    out, err = capfd.readouterr()
    assert out == ("Once\n" if at == "mid-reply" else "")
    if at == "prompt":
        assert err.endswith("you> \n")
    else:  # no legend: stdout is not a terminal
        assert err == ("\n" if at == "first text" else "")


@pytest.mark.parametrize(("stdout", "mode", "legend"), [("terminal", "online", True), ("terminal", "base", False), ("pipe", "online", False)])
def test_the_legend_shows_where_the_reply_is_styled(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdout: str, mode: str, legend: bool
) -> None:
    """The legend (on stderr) explains the draft's and the base's styles and the hand-over marker: a
    reply piped to a file, or written by one model alone, has none of them."""
    runtime = Scripted()
    runtime.load = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setattr("wsd_llms.runtime.get_runtime", lambda *args: runtime)
    monkeypatch.setattr(sys, "stdout", Tty() if stdout == "terminal" else io.StringIO())
    assert main(["chat", "hi", "--mode", mode]) == 0
    assert ("draft model  ▸ switch  base model" in capsys.readouterr().err) == legend


SLOW_LOAD = """
import sys, time
from wsd_llms import cli, runtime

def slow_load(self, role, source, revision):  # a model load, which nothing can interrupt
    print("loading", file=sys.stderr, flush=True)
    time.sleep(600)

runtime.WSDRuntime._load = slow_load
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("args", [["chat", "hi"], ["chat"]])
def test_ctrl_c_while_the_models_load_exits_at_once(args: list[str]) -> None:
    """One question, or an interactive chat's first: a normal exit would wait for the load (atexit
    joins the worker, up to a minute)."""
    proc = python_child(SLOW_LOAD, *args)
    try:
        assert proc.stdin is not None
        proc.stdin.write("hi\n")  # the interactive chat's first question (kept open: no end of input)
        proc.stdin.flush()
        assert proc.stderr is not None and proc.stderr.readline() == "loading\n"
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        assert proc.wait(timeout=20) == 130
        assert time.monotonic() - started < 10
        assert proc.communicate()[0] == ""  # stdout holds a reply alone: there is none (a lone newline had ended the ^C's line)
    finally:
        proc.kill()
        proc.communicate()


SLOW_IMPORT = """
import sys, time

class SlowCli:  # the CLI's modules take a fraction of a second to import; this one takes long
    def find_spec(self, name, path=None, target=None):
        if name == "wsd_llms.cli":
            print("importing", file=sys.stderr, flush=True)
            time.sleep(600)

sys.meta_path.insert(0, SlowCli())
from wsd_llms.__main__ import main
sys.exit(main())
"""


def test_ctrl_c_while_the_command_imports_exits_130_without_a_traceback() -> None:
    """A Ctrl-C in the first fraction of a second of `wsd-llms` printed Python's traceback."""
    proc = python_child(SLOW_IMPORT, "chat", "hi")
    try:
        assert proc.stderr is not None and proc.stderr.readline() == "importing\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
        assert proc.communicate() == ("", "")
    finally:
        proc.kill()
        proc.communicate()


def test_the_command_is_the_guarded_entry_point() -> None:
    """The `wsd-llms` script pyproject declares runs wsd_llms.__main__:main, which holds the guard above."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"wsd-llms": "wsd_llms.__main__:main"}


@pytest.mark.parametrize(
    ("mode", "usage", "expected"),
    [
        ("online", Usage(draft_tokens=9, kept_draft_tokens=5, base_tokens=7, reply_tokens=12), "switch after 5 draft tokens | reply 12 tokens (draft 5, base 7)"),
        ("whole", Usage(draft_tokens=9, kept_draft_tokens=9, base_tokens=7, reply_tokens=16), "no switch (the whole draft kept, then the base went on) | reply 16 tokens (draft 9, base 7)"),
        ("whole", Usage(draft_tokens=9, kept_draft_tokens=9, reply_tokens=9), "no switch (the whole draft kept) | reply 9 tokens (draft 9, base 0)"),
        ("base", Usage(base_tokens=12, reply_tokens=12), "base model alone | reply 12 tokens |"),
        ("draft", Usage(draft_tokens=12, reply_tokens=12), "draft model alone | reply 12 tokens |"),
    ],
)
def test_the_stats_line_says_who_wrote_the_reply(mode: str, usage: Usage, expected: str) -> None:
    """WSD's line gives the switch and each model's share; a model alone has neither (base mode
    had said "no switch (draft kept whole)", draft mode "draft 0, base 0")."""
    switch = 5 if mode == "online" else None
    result = WSDResult("x", "stop", switch, "x", usage, Timings(ttft=0.1, total=2.0), "d", "b", "online" if mode == "whole" else mode)  # type: ignore[arg-type]
    assert stats_line(result).startswith(expected) and stats_line(result).endswith(f"| {usage.reply_tokens / 2:.1f} tok/s")


@pytest.mark.parametrize("question", ["", "  "])
def test_an_empty_question_is_an_error_not_an_interactive_chat(question: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`wsd-llms chat "$Q"` with Q unset had started an interactive chat (which, with no terminal,
    ended at once, printing nothing)."""
    assert main(["chat", question]) == 2
    assert "the question is empty" in capsys.readouterr().err


def test_the_repetition_penalty_is_an_option_checked_before_any_model_loads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "--repetition-penalty", "0", "hi"]) == 2
    assert "--repetition-penalty: invalid repetition_penalty=0.0: Input should be greater than or equal to 0.0001" in capsys.readouterr().err


def test_a_model_that_cannot_load_is_a_clean_error(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """One question loads the models first, in this thread: a config transformers cannot read is an
    error line and exit status 1 (a failure; 2 is for bad options), not a traceback."""
    (tmp_path / "config.json").write_text('{"model_type": "nosucharch", "architectures": ["NoSuch"]}')
    assert main(["chat", "--draft", str(tmp_path), "--base", str(tmp_path), "--device", "cpu", "hi"]) == 1
    assert f"error: could not load the draft model '{tmp_path}'" in capsys.readouterr().err


class Window(Scripted):
    """Refuses a conversation of more than `fits` messages, as a full context window does."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits

    def stream(self, messages: list[dict[str, str]], **params: Any) -> Iterator[Event]:
        if len(messages) > self.fits:
            self.calls.append(messages)
            raise PromptTooLongError(f"the prompt is {len(messages)} messages (window {self.fits})")
        yield from super().stream(messages, **params)


class Answers(Console):
    def __init__(self, answers: list[str]) -> None:
        super().__init__(file=io.StringIO(), force_terminal=False)
        self.answers = iter(answers)

    def input(self, *args: Any, **kwargs: Any) -> str:
        return next(self.answers)


def test_a_conversation_past_the_window_leaves_out_its_oldest_exchanges(capsys: pytest.CaptureFixture[str]) -> None:
    """Every turn after the window filled failed, and the chat could not go on: now the oldest
    exchanges (not the system message) are left out until the turn fits. A question that does not
    fit alone is reported, and the history stays."""
    system = {"role": "system", "content": "Be brief."}
    history = [system]
    runtime = Window(fits=4)
    assert _interactive(Answers(["a", "b", "c", "d", ""]), runtime, history, PARAMS) == 0  # type: ignore[arg-type]
    reply = {"role": "assistant", "content": "Once upon"}
    assert history == [system, {"role": "user", "content": "c"}, reply, {"role": "user", "content": "d"}, reply]
    assert capsys.readouterr().err.count("its oldest 1 exchange(s) were left out") == 2  # at "c" and at "d"
    runtime.fits = 0  # nothing fits: the question alone is refused
    kept = list(history)
    assert _interactive(Answers(["e", ""]), runtime, history, PARAMS) == 0  # type: ignore[arg-type]
    assert history == kept and "error: the prompt is 2 messages (window 0) (this turn is dropped)" in capsys.readouterr().err


def test_old_exchanges_give_way_to_room_for_the_whole_reply(capsys: pytest.CaptureFixture[str]) -> None:
    """A prompt that still fitted the window, with little room left, had got a reply of a few
    tokens (finish length) while old exchanges could have gone: they go until max_tokens fits too."""
    system = {"role": "system", "content": "Be brief."}
    history = [system]
    runtime = Scripted()
    runtime.window = 50 + PARAMS["max_tokens"]  # 5 messages and a whole reply
    assert _interactive(Answers(["a", "b", "c", ""]), runtime, history, PARAMS) == 0  # type: ignore[arg-type]
    assert [len(call) for call in runtime.calls] == [2, 4, 4]  # at "c": the system, "b" and its reply, "c"
    assert history[:3] == [system, {"role": "user", "content": "b"}, {"role": "assistant", "content": "Once upon"}]
    assert "its oldest 1 exchange(s) were left out" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["chat", "--bogus", "hi"], ["eval", "--bogus"]])
def test_an_unknown_option_is_reported_with_its_subcommands_usage(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`wsd-llms chat --bogus` printed the top level's usage, `wsd-llms [-h] {chat,eval} ...`, which
    names none of the options the user was reaching for."""
    with pytest.raises(SystemExit) as exited:
        main(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith(f"usage: wsd-llms {args[0]} [-h]") and f"wsd-llms {args[0]}: error: unrecognized arguments: --bogus" in err


def test_help_and_option_errors_come_without_loading_torch() -> None:
    """`wsd-llms --help` took 7 s, all of it importing torch and transformers, which the parser never
    needs; the package's other names still import on first use."""
    import sys

    code = (
        "import sys\n"
        "from wsd_llms import cli, WSDError\n"
        "cli._parser()[0].format_help()\n"
        "assert cli.main(['chat', '--temperature', '-1', 'hi']) == 2 and cli.main(['chat', '  ']) == 2  # option errors too\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'transformers')))[:3]\n"
        "import wsd_llms\n"
        "assert 'WSDRuntime' in dir(wsd_llms) and wsd_llms.WSDRuntime.__module__ == 'wsd_llms.runtime'\n"
        "assert wsd_llms.reply.__name__ == 'wsd_llms.reply' and not hasattr(wsd_llms, 'runtime.x') and not hasattr(wsd_llms, 'nope')\n"
        "from wsd_llms import *\n"
        "assert get_runtime is wsd_llms.runtime.get_runtime and 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_reply_that_cannot_be_written_is_an_error_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """stdout on a full disk was a traceback ending in OSError; it is an error line and exit 1."""

    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(28, "No space left on device")

    runtime = Scripted()
    runtime.load = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setattr("wsd_llms.runtime.get_runtime", lambda *args: runtime)
    monkeypatch.setattr(sys, "stdout", Full())
    assert main(["chat", "hi"]) == 1
    assert "error: cannot write the reply: No space left on device" in capsys.readouterr().err


def test_a_reply_stdout_cannot_encode_is_an_error_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A Windows pipe in cp1252 had ended a reply holding an emoji with a traceback."""
    runtime = Written()
    runtime.load = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setattr("wsd_llms.runtime.get_runtime", lambda *args: runtime)
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="cp1252", write_through=True))
    assert main(["chat", "hi"]) == 1
    assert "error: cannot write the reply: stdout's encoding (cp1252) cannot hold its text; set PYTHONIOENCODING=utf-8" in capsys.readouterr().err


def test_a_reader_that_goes_away_ends_the_reply_quietly(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`wsd-llms chat ... | head -1`: exit 1 with no error line, as Rich ends a broken pipe."""

    class Gone(io.StringIO):
        def __init__(self, fd: int) -> None:
            super().__init__()
            self.fd = fd

        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            return self.fd

    runtime = Scripted()
    runtime.load = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setattr("wsd_llms.runtime.get_runtime", lambda *args: runtime)
    with open(tmp_path / "out", "w") as out:
        monkeypatch.setattr(sys, "stdout", Gone(out.fileno()))
        assert main(["chat", "hi"]) == 1
    assert "error" not in capsys.readouterr().err


class TwoWindows(Scripted):
    """WSD's windows: the draft's 1000 (the request's), the base's 4000."""

    def context_window(self, mode: str = "online") -> int:
        return 4000 if mode == "base" else 1000


def test_a_max_tokens_past_the_drafts_window_keeps_the_conversation(capsys: pytest.CaptureFixture[str]) -> None:
    """`wsd-llms chat --max-tokens 9000` on the embedded pair (draft window 8192) left out every earlier
    exchange at every turn: it kept room for all 9000 tokens in the draft's window, where the draft
    writes at most max_draft_tokens and the base writes the rest in its own window."""
    runtime = TwoWindows()
    params = {**PARAMS, "max_tokens": 2000}
    history: list[dict[str, str]] = []
    assert _interactive(Answers(["a", "b", "c", ""]), runtime, history, params) == 0  # type: ignore[arg-type]
    assert [len(call) for call in runtime.calls] == [1, 3, 5]
    assert "left out" not in capsys.readouterr().err
    one_model = TwoWindows()  # the base alone writes 2000 in its 4000: room for both exchanges
    assert _interactive(Answers(["a", "b", "c", ""]), one_model, [], {**params, "mode": "base"}) == 0  # type: ignore[arg-type]
    assert [len(call) for call in one_model.calls] == [1, 3, 5]
    draft_alone = TwoWindows()  # the draft writes the whole reply in its 1000: room capped at 750, a quarter left for the prompt
    assert _interactive(Answers(["a", "b", "c", ""]), draft_alone, [], {**params, "mode": "draft"}) == 0  # type: ignore[arg-type]
    assert [len(call) for call in draft_alone.calls] == [1, 3, 5]
