"""`wsd-llms eval`: the command-line front of the evaluation (arguments, progress bar, output files).

Exit status: 0 when every prompt line was usable and every request succeeded; 1 when the input had
bad lines or some requests failed (the report is still written, with those listed), or the models
could not load or the report could not be written; 2 for bad options or a prompt file with no prompts
to run (nothing is written then: a report already in --out stays as it was).
"""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..console import make_console
from ..errors import InvalidMessagesError, InvalidParameterError, ModelLoadError, WSDError
from ..params import check_option, check_placement
from ..prompts import require_chat_template
from .prompts import DEFAULT_PROMPTS, load_prompts
from .report import headers, headline_rows, write_all
from .runner import DEFAULT_THRESHOLDS, DEFAULT_WINDOWS, Record, Setting, settings_for


def _listed(kind: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    """An argparse type for a comma-separated list of `kind` values (at least one)."""

    def parse(text: str) -> list[Any]:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            values = []
        if not values:  # an empty list would sweep nothing, silently
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}")
        return values

    return parse


_floats, _ints = _listed(float, "numbers"), _listed(int, "integers")


def _check_options(args: argparse.Namespace) -> None:
    """Each option's value as the runtime takes it, the error naming the option (before any model loads)."""
    checks = [("--threshold", {"switch_threshold": args.threshold}), ("--window", {"switch_window": args.window}), ("--max-tokens", {"max_tokens": args.max_tokens})]
    checks += [("--thresholds", {"switch_threshold": t}) for t in args.thresholds or ()] + [("--windows", {"switch_window": w}) for w in args.windows or ()]
    for flag, params in checks:
        check_option(flag, **params)
    if args.concurrency < 1:
        raise InvalidParameterError(f"--concurrency: invalid concurrency={args.concurrency}: must be an integer >= 1")


def add_parser(sub: Any) -> None:
    """Register `eval` on the CLI's subparsers."""
    p = sub.add_parser("eval", help="run a prompt set through base-only, draft-only and WSD, and write a report")
    p.add_argument("--prompts", type=Path, help=f"JSONL, one {{\"context\": [messages]}} per line (default: the bundled set, {DEFAULT_PROMPTS.name})")
    p.add_argument("--threshold", type=float, default=0.8, help="τ of the main WSD setting (default 0.8)")
    p.add_argument("--window", type=int, default=6, help="w of the main WSD setting (default 6)")
    p.add_argument("--sweep", action="store_true", help="also run WSD over the grid of --thresholds × --windows")
    p.add_argument("--thresholds", type=_floats, help="sweep thresholds, comma-separated (default 0.5,0.6,0.7,0.8,0.9); implies --sweep")
    p.add_argument("--windows", type=_ints, help="sweep windows, comma-separated (default 4,6,8); implies --sweep")
    p.add_argument("--max-tokens", type=int, default=128, help="reply budget in base tokens, in draft tokens for draft-only replies (default 128)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once, batched by the runtime (default 8)")
    p.add_argument("--judge", help="a local chat model (HF repo id, directory, .gguf or embedded:...) to judge WSD vs base-only")
    p.add_argument("--out", type=Path, default=Path("wsd-eval"), help="output directory (default ./wsd-eval)")
    models = p.add_argument_group("models")
    models.add_argument("--draft", help="aligned draft model (default: embedded SmolLM2-135M-Instruct)")
    models.add_argument("--base", help="base model (default: embedded Gemma-3-270M)")
    models.add_argument("--device", default="auto")
    models.add_argument("--dtype", default="auto")


def run(args: argparse.Namespace) -> int:
    console, errors = make_console(), make_console(stderr=True)
    main = Setting("online", args.threshold, args.window)
    sweep = args.sweep or args.thresholds is not None or args.windows is not None  # a grid given is a grid to run
    settings = settings_for(args.threshold, args.window, sweep, args.thresholds or DEFAULT_THRESHOLDS, args.windows or DEFAULT_WINDOWS)
    try:
        _check_options(args)
    except WSDError as exc:
        errors.print(Text(f"error: {exc}", style="bold red"))
        return 2
    prompts, problems = load_prompts(args.prompts)
    for problem in problems:
        errors.print(Text(f"{args.prompts or DEFAULT_PROMPTS}: {problem}", style="yellow"))
    if not prompts:
        errors.print(Text(f"error: no prompts to run; nothing was written to {args.out}", style="bold red"))
        return 2
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    written: list[Record] = []
    made: list[Path] = []
    try:
        from ..loading import check_source, load_model  # here, not at the top: `wsd-llms --help` need not wait for torch (seconds)
        from ..runtime import get_runtime
        from .evaluate import evaluate
        from .judge import logit_judge

        check_placement(args.device, args.dtype)
        runtime = get_runtime(args.draft, args.base, args.device, args.dtype)
        if args.judge:  # an unknown embedded name or a missing path fails before the pair loads
            try:
                check_source(args.judge)
            except ModelLoadError as exc:
                raise ModelLoadError(f"--judge: {exc}") from None
        made = _missing_dirs(args.out)  # before the models load, so that an --out that cannot be written fails at once
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            if not os.access(args.out, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "Permission denied")
        except OSError as exc:
            raise InvalidParameterError(f"cannot write the report to --out {args.out}: {exc.strerror or exc}") from exc
        errors.print(Text("loading the models ...", style="dim"))
        runtime.load()  # before records.jsonl is opened: a model that cannot load leaves --out as it was
        judge = None
        if args.judge:
            model = load_model(args.judge, device=runtime.device, dtype=runtime.dtype, role="judge")
            require_chat_template(model.tokenizer, args.judge, "judge")  # it reads the replies as a chat: before the run, not after
            judge = (args.judge, logit_judge(model))
        with Progress(*columns, console=errors, transient=False) as progress:  # stdout: the table and the report's path
            task = progress.add_task(f"{len(settings)} settings × {len(prompts)} prompts", total=len(settings) * len(prompts))
            source = str(args.prompts) if args.prompts else f"the bundled set ({DEFAULT_PROMPTS.name})"

            def advance(record: Record) -> None:
                written.append(record)
                progress.advance(task)

            report = evaluate(
                runtime, prompts, problems, settings, main,
                max_tokens=args.max_tokens, prompts_file=source, concurrency=args.concurrency,
                records_path=args.out / "records.jsonl", on_record=advance, judge=judge,
            )
    except (InvalidParameterError, InvalidMessagesError) as exc:
        errors.print(Text(f"error: {exc}", style="bold red"))
        return 2
    except WSDError as exc:
        errors.print(Text(f"error: {exc}", style="bold red"))
        return 1
    except KeyboardInterrupt:
        said = f"the replies so far ({len(written)}) are in {args.out / 'records.jsonl'}" if written else "before any reply was written"
        errors.print(Text(f"interrupted: {said}"))
        return 130
    finally:
        _unmake_out(made)  # a run that wrote nothing leaves no --out it made (a model that could not load, say)
    try:
        paths = write_all(report, args.out)
    except OSError as exc:
        errors.print(Text(f"error: cannot write the report to {args.out}: {exc}; the replies are in {args.out / 'records.jsonl'}", style="bold red"))
        return 1
    _print_table(console, report)
    console.print(Text(f"report: {paths['html']}  (also {paths['json'].name}, {paths['md'].name}, records.jsonl)"))
    failed = [r for r in report["records"] if r["error"] is not None]
    if failed:  # the exit status says a request failed: stderr says which and why (the report lists them all)
        first = failed[0]
        errors.print(Text(
            f"error: {len(failed)} request(s) failed; the first: {first['setting']} on prompt {first['prompt_id']}: {first['error']}",
            style="bold red",
        ))
    return 1 if problems or failed else 0


def _missing_dirs(out: Path) -> list[Path]:
    """The directories that creating `out` makes, deepest first (as mkdir walks it: `x/../y` makes x too)."""
    return [path for path in (out, *out.parents) if not path.exists()]


def _unmake_out(made: list[Path]) -> None:
    """Take back those of the directories this run made that it wrote nothing into, deepest first."""
    for path in made:
        try:
            path.rmdir()  # an empty directory only
        except OSError:  # it holds the run's files, or is the `..` of another one made: it stays
            continue


def _print_table(console: Console, report: dict[str, Any]) -> None:
    table = Table(*headers(), title="per setting")
    for row in headline_rows(report):
        table.add_row(*row)
    console.print(table)
