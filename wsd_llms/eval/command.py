"""`wsd-llms eval`: the command-line front of the evaluation (arguments, progress bar, output files).

Exit status: 0 when every prompt line was usable and every request succeeded; 1 when the input had
bad lines or some requests failed (the report is still written, with those listed); 2 for bad options.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..console import make_console
from ..errors import WSDError
from ..loading import load_model
from ..params import parse_params
from ..prompts import require_chat_template
from ..runtime import get_runtime
from .evaluate import evaluate
from .judge import logit_judge
from .prompts import DEFAULT_PROMPTS, load_prompts
from .report import headers, headline_rows, write_all
from .runner import DEFAULT_THRESHOLDS, DEFAULT_WINDOWS, Setting, settings_for


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_parser(sub: Any) -> None:
    """Register `eval` on the CLI's subparsers."""
    p = sub.add_parser("eval", help="run a prompt set through base-only, draft-only and WSD, and write a report")
    p.add_argument("--prompts", type=Path, help=f"JSONL, one {{\"context\": [messages]}} per line (default: the bundled set, {DEFAULT_PROMPTS.name})")
    p.add_argument("--threshold", type=float, default=0.8, help="τ of the main WSD setting (default 0.8)")
    p.add_argument("--window", type=int, default=6, help="w of the main WSD setting (default 6)")
    p.add_argument("--sweep", action="store_true", help="also run WSD over the grid of --thresholds × --windows")
    p.add_argument("--thresholds", type=_floats, default=list(DEFAULT_THRESHOLDS), help="sweep thresholds, comma-separated (default 0.5,0.6,0.7,0.8,0.9)")
    p.add_argument("--windows", type=_ints, default=list(DEFAULT_WINDOWS), help="sweep windows, comma-separated (default 4,6,8)")
    p.add_argument("--max-tokens", type=int, default=128, help="reply budget in base tokens (default 128)")
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
    settings = settings_for(args.threshold, args.window, args.sweep, args.thresholds, args.windows)
    try:
        for setting in settings:
            parse_params(max_tokens=args.max_tokens, **setting.params())
        if args.concurrency < 1:
            raise WSDError(f"invalid concurrency={args.concurrency}: must be an integer >= 1")
    except WSDError as exc:
        errors.print(Text(f"error: {exc}", style="bold red"))
        return 2
    prompts, problems = load_prompts(args.prompts)
    for problem in problems:
        errors.print(Text(f"{args.prompts or DEFAULT_PROMPTS}: {problem}", style="yellow"))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        runtime = get_runtime(args.draft, args.base, args.device, args.dtype)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WSDError(f"cannot write the report to --out {args.out}: {exc.strerror or exc}") from exc
        with Progress(*columns, console=errors, transient=False) as progress:  # stdout: the table and the report's path
            task = progress.add_task(f"{len(settings)} settings × {len(prompts)} prompts", total=len(settings) * len(prompts))
            judge = None
            if args.judge:
                model = load_model(args.judge, device=runtime.device, dtype=runtime.dtype)
                require_chat_template(model.tokenizer, args.judge, "judge")  # it reads the replies as a chat: before the run, not after
                judge = (args.judge, logit_judge(model))
            source = str(args.prompts) if args.prompts else f"the bundled set ({DEFAULT_PROMPTS.name})"
            report = evaluate(
                runtime, prompts, problems, settings, main,
                max_tokens=args.max_tokens, prompts_file=source, concurrency=args.concurrency,
                records_path=args.out / "records.jsonl", on_record=lambda record: progress.advance(task), judge=judge,
            )
    except WSDError as exc:
        errors.print(Text(f"error: {exc}", style="bold red"))
        return 2
    except KeyboardInterrupt:
        errors.print(Text(f"interrupted: the replies so far are in {args.out / 'records.jsonl'}"))
        return 130
    paths = write_all(report, args.out)
    _print_table(console, report)
    console.print(Text(f"report: {paths['html']}  (also {paths['json'].name}, {paths['md'].name}, records.jsonl)"))
    failed = any(s["errors"] for s in report["settings"])
    return 1 if problems or failed else 0


def _print_table(console: Console, report: dict[str, Any]) -> None:
    table = Table(*headers(), title="per setting")
    for row in headline_rows(report):
        table.add_row(*row)
    console.print(table)
