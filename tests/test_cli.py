"""`wsd-llms chat` streams a reply with the draft and base parts marked and ends with a stats line.

One run goes through a real process, as a user runs it; the rest call `main` in this process, where
the default models resolve to the same process-wide runtime the other embedded tests load once (a
process of their own each cost ~13 s of imports and loading, ~30 s on a slow machine)."""

import io
import os
import subprocess
import sys

import pytest

from wsd_llms.cli import main
from wsd_llms.runtime import get_runtime

pytestmark = pytest.mark.embedded


def test_one_question_in_a_pipe():
    """stdout holds the reply alone (no legend, marker or facts: a reply piped to a file is the reply);
    stderr the line of facts, one line though Rich wraps at 80 columns in a pipe, and no legend for
    styles a pipe does not get."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run(
        [sys.executable, "-m", "wsd_llms.cli", "chat", "What is the capital of France?", "--max-tokens", "24"],
        capture_output=True, text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "▸" not in out.stderr + out.stdout
    assert "Paris" in out.stdout and len(out.stdout.strip().splitlines()) == 1
    stats = [line for line in out.stderr.splitlines() if "| reply " in line]
    assert len(stats) == 1 and "tok/s" in stats[0] and len(stats[0]) > 80


def _chat(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str, stdin: str = "") -> tuple[int, str, str]:
    """`wsd-llms chat ARGS` in this process, with `stdin` as what is typed: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_interactive_keeps_history_and_a_failing_turn_is_reported(monkeypatch, capsys):
    """A question past the draft's 8192-token window fails that turn only; the next one is asked
    with the turns before it, the failed one dropped."""
    runtime, asked = get_runtime(), []
    stream = runtime.stream
    monkeypatch.setattr(runtime, "stream", lambda messages, **params: asked.append(messages) or stream(messages, **params))
    stdin = "My name is Ada.\n" + "word " * 9000 + "\nWhat is my name?\n\n"
    code, out, err = _chat(monkeypatch, capsys, "--max-tokens", "16", stdin=stdin)
    assert code == 0, err
    assert "error:" in err and "context window" in err and "this turn is dropped" in err
    assert err.count("| reply ") == 2 and "you> " not in out  # stdout: the replies alone
    first_reply = asked[-1][1]["content"]
    assert out.startswith(first_reply + "\n") and first_reply
    assert [m["content"] for m in asked[-1]] == ["My name is Ada.", first_reply, "What is my name?"]
    assert len(asked) == 3  # the long question is asked alone (the history gives way first), and does not fit alone either


@pytest.mark.parametrize(
    ("option", "named"),
    [(("--dtype", "int8"), "error: --dtype: invalid dtype='int8'; allowed: auto"), (("--device", "meta"), "error: --device: invalid device='meta'")],
)
def test_bad_model_settings_are_reported(monkeypatch, capsys, option, named):
    """Named by the option (the runtime's error names its argument, dtype=), before any model loads."""
    code, out, err = _chat(monkeypatch, capsys, "hi", *option)
    assert code == 2 and named in err.replace("\n", "") and "error:" not in out  # stdout: replies only


def test_bad_option_is_reported(monkeypatch, capsys):
    code, out, err = _chat(monkeypatch, capsys, "hi", "--threshold", "2")
    assert code == 2
    assert "error: --threshold: invalid switch_threshold=2.0" in err and not out  # before the models load


def test_interactive_mode_refuses_a_bad_option_before_loading(monkeypatch, capsys):
    code, out, err = _chat(monkeypatch, capsys, "--window", "0", stdin="hi\n\n")
    assert code == 2 and "switch_window" in err and "you>" not in out


@pytest.mark.parametrize("mode", ["base", "draft"])
def test_one_model_alone(mode, monkeypatch, capsys):
    code, out, err = _chat(monkeypatch, capsys, "What is the capital of France?", "--max-tokens", "12", "--mode", mode)
    assert code == 0, err
    assert f"{mode} model alone | reply " in err and "(draft " not in err  # no switch or split to report


def test_the_end_of_input_ends_an_interactive_chat(monkeypatch, capsys):
    """Ctrl-D (or a piped script's end, with no empty line) ends the chat after the turns before it."""
    code, out, err = _chat(monkeypatch, capsys, "--max-tokens", "4", stdin="Hello.\n")
    assert code == 0, err
    assert err.count("| reply ") == 1 and err.endswith("you> \n")  # the shell's prompt on a line of its own
