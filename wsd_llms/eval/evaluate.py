"""One evaluation end to end: run the settings, summarize, optionally judge, and assemble the report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..errors import WSDError
from .judge import Prefer, judge_pairs
from .prompts import EvalPrompt, Problem
from .report import Report
from .runner import Record, Setting, run_settings
from .signals import DEFINITIONS
from .summary import summarize_all

if TYPE_CHECKING:
    from ..runtime import WSDRuntime


def evaluate(
    runtime: WSDRuntime,
    prompts: list[EvalPrompt],
    problems: list[Problem],
    settings: list[Setting],
    main: Setting,
    *,
    max_tokens: int,
    prompts_file: str,
    concurrency: int = 8,
    records_path: Path | None = None,
    on_record: Callable[[Record], None] = lambda record: None,
    judge: tuple[str, Prefer] | None = None,
) -> Report:
    """Everything the report needs. Each record is also appended to `records_path` (JSONL) as it
    finishes, so an interrupted run keeps what it had; the file is replaced at the first record, so
    a run that ends before one leaves the last run's as it was."""
    start = time.perf_counter()
    sink: TextIO | None = None  # opened at the first record

    def keep(record: Record) -> None:
        nonlocal sink
        if records_path is not None:
            try:
                if sink is None:
                    sink = records_path.open("w", encoding="utf-8")
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
            except OSError as exc:  # --out read-only, say, or a full disk: the run ends, with the requests in flight
                raise WSDError(f"cannot write the replies to {records_path}: {exc.strerror or exc}") from exc
        on_record(record)

    try:
        records, walls = run_settings(runtime, prompts, settings, max_tokens=max_tokens, concurrency=concurrency, on_record=keep) if prompts else ([], {})
    finally:
        if sink is not None:
            sink.close()
    judged: dict[str, Any] | None = None
    if judge is not None and prompts:
        name, prefer = judge
        by_setting = {s.name: [r for r in records if r["setting"] == s.name] for s in settings}
        messages = {p.id: p.messages for p in prompts}
        judged = judge_pairs(prefer, messages, by_setting[main.name], by_setting[Setting("base").name], name)
    return {
        "meta": {
            "draft": runtime.draft_source,
            "base": runtime.base_source,
            "device": str(runtime.device),
            "prompts_file": prompts_file,
            "prompts": len(prompts),
            "max_tokens": max_tokens,
            "main_setting": main.name,
            "threshold": main.threshold,
            "window": main.window,
            "wall_s": time.perf_counter() - start,
        },
        "problems": [str(p) for p in problems],
        "definitions": DEFINITIONS,
        "settings": summarize_all(settings, records, walls),
        "judge": judged,
        "records": records,
    }
