"""`wsd-llms chat`: stream a WSD reply in the terminal, showing what the draft and the base wrote."""

from __future__ import annotations

import argparse
import io
import os
import sys
from contextlib import closing
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from . import interrupts
from .console import make_console
from .errors import InvalidMessagesError, InvalidParameterError, PromptTooLongError, RequestFailedError, WSDError
from .events import FinalEvent, TextDelta, WSDResult
from .messages import unicode_error
from .eval import command as eval_command
from .params import check_option, check_placement, parse_params

if TYPE_CHECKING:
    from .runtime import WSDRuntime

STYLES = {"draft": "bold cyan", "base": "green"}


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that gives each option's default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command line's parser, and its subcommands' by name."""
    parser = argparse.ArgumentParser(prog="wsd-llms", description="Weak-to-Strong Decoding in the terminal.")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser(
        "chat", help="ask a question (or chat interactively with no question)", formatter_class=_Defaults,
        description="Stream a WSD reply: the reply on stdout, the legend and a line of facts on stderr.",
    )
    chat.add_argument("question", nargs="?", help="one question; leave out for an interactive chat")
    chat.add_argument("--system", help="a system prompt")
    models = chat.add_argument_group("models")
    models.add_argument("--draft", help="aligned draft model: HF repo id, directory or .gguf (default: embedded SmolLM2-135M-Instruct)")
    models.add_argument("--base", help="base model: HF repo id, directory or .gguf (default: embedded Gemma-3-270M)")
    models.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    models.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32), float32, float16, bfloat16 or float64")
    wsd = chat.add_argument_group("switch and sampling")
    wsd.add_argument("--threshold", type=float, default=0.8, dest="switch_threshold", metavar="TAU", help="the base takes over where its tokens' probabilities reach this")
    wsd.add_argument("--window", type=int, default=6, dest="switch_window", metavar="W", help="over this many draft tokens in a row")
    wsd.add_argument("--max-tokens", type=int, default=256, metavar="N", help="reply budget, in base tokens (draft tokens with --mode draft)")
    wsd.add_argument("--max-draft-tokens", type=int, default=512, metavar="N", help="how far the draft may write before the base takes over")
    wsd.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 is greedy")
    wsd.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling")
    wsd.add_argument("--top-k", type=int, default=0, metavar="K", help="0 keeps every token")
    wsd.add_argument(
        "--repetition-penalty", type=float, default=1.0, metavar="R", help="above 1, tokens already in the reply are less likely (1 is off)"
    )
    wsd.add_argument("--seed", type=int, help="the same seed gives the same sampled reply")
    wsd.add_argument(
        "--mode", choices=["online", "staged", "base", "draft"], default="online",
        help="online or staged WSD (the same reply), or one model alone: base or draft",
    )
    eval_command.add_parser(sub)
    return parser, sub.choices


FLAGS = {
    "switch_threshold": "--threshold", "switch_window": "--window", "max_tokens": "--max-tokens", "max_draft_tokens": "--max-draft-tokens",
    "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
    "repetition_penalty": "--repetition-penalty", "seed": "--seed", "mode": "--mode",
}


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in FLAGS}


def _check_options(args: argparse.Namespace) -> None:
    """Each option's value as the runtime takes it, the error naming the option (before any model loads)."""
    for name, flag in FLAGS.items():
        check_option(flag, **{name: getattr(args, name)})
    parse_params(**_params(args))


def stats_line(result: WSDResult) -> str:
    """One line of facts about a finished reply: where WSD switched and who wrote how much, or
    which model answered alone."""
    u, t = result.usage, result.timings
    if result.mode in ("base", "draft"):
        where, parts = f"{result.mode} model alone", ""
    else:
        where = f"switch after {result.switch_point} draft tokens" if result.switched else "no switch (the whole draft kept"
        if not result.switched:  # the base continues after a whole draft too (DESIGN 3.5-6), unless the draft ended the reply
            where += ", then the base went on)" if u.base_tokens else ")"
        parts = f" (draft {u.kept_draft_tokens}, base {u.base_tokens})"
    rate = u.reply_tokens / t.total if t.total else 0.0
    ttft = f"{t.ttft:.2f}s" if t.ttft is not None else "-"
    return (
        f"{where} | reply {u.reply_tokens} tokens{parts} | "
        f"finish {result.finish_reason} | first token {ttft} | total {t.total:.2f}s | {rate:.1f} tok/s"
    )


def stream_reply(console: Console, runtime: WSDRuntime, messages: list[dict[str, str]], params: dict[str, Any]) -> WSDResult:
    """Print the reply as it streams: on a terminal, draft text and base text in two styles with a
    marker at the hand-over; in a pipe or a file, the reply's text exactly as written. Then its facts
    on stderr. A reply that fails after some text ends its line, so the error starts a line of its own."""
    terminal = console.file.isatty()  # not Rich's is_terminal, which FORCE_COLOR sets
    last_source = None
    with closing(runtime.stream(messages, **params)) as events:  # closing cancels the request (Ctrl-C)
        try:
            for event in events:
                if isinstance(event, TextDelta):
                    if not terminal:  # Rich would expand tabs, drop control characters such as \r, and colour it under FORCE_COLOR
                        console.file.write(event.text)
                        console.file.flush()
                    else:  # rendered by Rich, written here: Rich clears what it wrote after writing, so a Ctrl-C in the write left it to show again in the next turn's reply
                        with console.capture() as shown:
                            if last_source == "draft" and event.source == "base":
                                console.print(Text(" ▸ ", style="bold magenta"), end="")
                            console.print(Text(event.text, style=STYLES[event.source]), end="", soft_wrap=True)
                        console.file.write(shown.get())
                        console.file.flush()
                    last_source = event.source
                elif isinstance(event, FinalEvent):
                    console.print()
                    make_console(stderr=True).print(Text(stats_line(event.result), style="dim"))
                    return event.result
        except (WSDError, KeyboardInterrupt) as exc:
            if last_source is not None:  # the reply's line ends, so what follows starts a line of its own
                console.print()
            elif isinstance(exc, KeyboardInterrupt):  # the ^C's line ends on stderr: stdout holds replies alone
                make_console(stderr=True).print()
            raise
    raise WSDError("the stream ended without a result")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; an unknown option is reported with its subcommand's usage (argparse's
    parse_args reports it with the top level's, which lists no option of `chat` or `eval`)."""
    parser, commands = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.command == "eval":
        return eval_command.run(args)
    console, errors = make_console(), make_console(stderr=True)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    runtime, asked = None, False
    try:
        _check_options(args)  # a bad option fails before any model loads, and before torch imports
        if args.question is not None and not args.question.strip():  # `chat "$Q"` with Q unset, say
            raise InvalidMessagesError("the question is empty; leave it out for an interactive chat")
    except WSDError as exc:
        errors.print(Text(f"error: {exc}", style="bold red"))
        return 2
    try:
        from .runtime import get_runtime  # here, not at the top: `wsd-llms --help` need not wait for torch (seconds)
    except KeyboardInterrupt:  # while torch imports: an interrupted exit, not a traceback
        return 130
    try:
        check_placement(args.device, args.dtype)
        runtime = get_runtime(args.draft, args.base, args.device, args.dtype)
        if args.mode in ("online", "staged") and console.file.isatty():  # the styles it explains are a terminal's, and WSD's
            errors.print(Text.assemble(("draft model", STYLES["draft"]), "  ▸ switch  ", ("base model", STYLES["base"])))
        runtime.load()  # before the first request, so that its first-token time and tok/s are the reply's own
        if args.question is not None:
            asked = True
            stream_reply(console, runtime, history + [{"role": "user", "content": args.question}], _params(args))
            return 0
        return _interactive(console, runtime, history, _params(args))
    except WSDError as exc:
        errors.print(Text(f"error: {exc}", style="bold red"))
        return 2 if isinstance(exc, (InvalidParameterError, InvalidMessagesError, PromptTooLongError)) else 1  # usage, or a failure
    except BrokenPipeError:  # `wsd-llms chat ... | head`: the reader has gone, so end quietly, as Rich does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and the interpreter's flush at exit fails no more
        return 1
    except (OSError, UnicodeEncodeError) as exc:  # stdout on a full disk, or in an encoding without the reply's characters
        if isinstance(exc, UnicodeEncodeError):
            why = f"stdout's encoding ({getattr(sys.stdout, 'encoding', None) or exc.encoding}) cannot hold its text; set PYTHONIOENCODING=utf-8"
        else:
            why = exc.strerror or str(exc)
        errors.print(Text(f"error: cannot write the reply: {why}", style="bold red"))
        return 1
    except KeyboardInterrupt:
        if not asked:  # the ^C's line ends on stderr (stream_reply ends a reply's): stdout holds the reply alone
            errors.print()
        if runtime is not None and not runtime.loaded:  # a model load cannot be interrupted, and a normal exit
            interrupts.exit_now(130)  # would wait for it (atexit closes the runtime and joins its worker, up to a minute)
        return 130


def _outgrows(runtime: WSDRuntime, turn: list[dict[str, str]], params: dict[str, Any]) -> bool:
    """Whether `turn` leaves the context window too little room for a whole reply (runtime.reply_room:
    in WSD the base writes past the draft's window, so --max-tokens above it needs no more room there)."""
    from .runtime import reply_room

    room = reply_room(params["mode"], params["max_tokens"], params["max_draft_tokens"], runtime.context_window)
    return runtime.window_tokens(turn, **params) + room > runtime.context_window(params["mode"])


def _interactive(console: Console, runtime: WSDRuntime, history: list[dict[str, str]], params: dict[str, Any]) -> int:
    """Chat until an empty line or Ctrl-D. Ctrl-C during a reply stops it, and a turn that fails is
    reported; either way that turn is dropped and the chat goes on. A conversation grown past the
    context window drops its oldest exchanges (the system message stays) until the turn fits with
    room for a whole reply (runtime.reply_room); a question that does not fit alone is reported, and
    the history kept."""
    notes = make_console(stderr=True)
    if isinstance(sys.stdin, io.TextIOWrapper):  # bytes that are not UTF-8 read as escapes, for the check below (a strict reader raised)
        sys.stdin.reconfigure(errors="surrogateescape")
    notes.print(Text("interactive chat: empty line or Ctrl-D to quit, Ctrl-C to stop a reply", style="dim"))
    system = 1 if history and history[0]["role"] == "system" else 0  # the system message stays
    if sys.stdin is None:  # closed (`<&-`): no question can come
        return 0
    typed = sys.stdin.isatty()
    while True:
        try:
            notes.print(Text("you> ", style="bold"), end="")  # on stderr: stdout holds the replies alone
            question = console.input().strip()
        except EOFError:  # Ctrl-D: the shell's prompt on a line of its own
            notes.print()
            return 0
        if not typed:  # a terminal shows what is typed; a piped line is shown here, as read, so stderr reads as the chat
            notes.file.write(question.encode("utf-8", "replace").decode() + "\n")
            notes.file.flush()
        if not question:
            return 0
        if not question.isascii() and unicode_error(question) is not None:  # read with surrogateescape: a byte that was not UTF-8
            notes.print(Text("error: this line is not valid UTF-8 (this turn is dropped)", style="bold red"))
            continue
        kept = list(history)
        while True:
            turn = [*kept, {"role": "user", "content": question}]
            replying = False
            try:
                if len(kept) - system >= 2 and _outgrows(runtime, turn, params):
                    kept[system : system + 2] = []  # the oldest question and its reply go, so the reply is not cut short
                    continue
                replying = True
                result = stream_reply(console, runtime, turn, params)
            except KeyboardInterrupt:
                if not replying:  # the ^C's line ends here (stream_reply ends its own)
                    notes.print()
                notes.print(Text("(stopped; this turn is dropped)", style="dim"))
            except PromptTooLongError as exc:
                if len(kept) - system >= 2:  # the oldest question and its reply go, and the turn is tried again
                    kept[system : system + 2] = []
                    continue
                notes.print(Text(f"error: {exc} (this turn is dropped)", style="bold red"))
            except (InvalidMessagesError, RequestFailedError) as exc:
                notes.print(Text(f"error: {exc} (this turn is dropped)", style="bold red"))
            else:
                if dropped := (len(history) - len(kept)) // 2:
                    notes.print(Text(f"(the conversation outgrew the context window: its oldest {dropped} exchange(s) were left out)", style="dim"))
                history[:] = [*turn, {"role": "assistant", "content": result.text}]
            break


if __name__ == "__main__":
    sys.exit(main())
