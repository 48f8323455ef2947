"""Runs every prompt under every setting through the shared runtime and turns each reply into a record.

A setting's prompts are submitted together from a thread pool, so the runtime batches them; settings
run one after another, so each setting's wall time (and tokens/s) is its own. A request that fails
becomes a record with an `error` and the run goes on. An interrupt (Ctrl-C, a records file that
cannot be written) ends the requests in flight too, so the process does not wait for their replies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import RuntimeClosedError, WSDError
from ..events import FinalEvent, WSDResult
from . import signals
from .prompts import EvalPrompt

if TYPE_CHECKING:
    from ..runtime import WSDRuntime

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_WINDOWS = (4, 6, 8)

Record = dict[str, Any]


@dataclass(frozen=True)
class Setting:
    """One way of answering: a model alone (`base`, `draft`) or WSD (`online`) at τ and w."""

    mode: str
    threshold: float | None = None
    window: int | None = None

    @property
    def name(self) -> str:
        if self.mode == "online":
            shown = f"{self.threshold:g}"
            if float(shown) != self.threshold:  # two thresholds that differ get two names
                shown = repr(self.threshold)
            return f"wsd τ={shown} w={self.window}"
        return f"{self.mode}-only"

    def params(self) -> dict[str, Any]:
        if self.mode == "online":
            return {"mode": "online", "switch_threshold": self.threshold, "switch_window": self.window}
        return {"mode": self.mode}


def settings_for(threshold: float, window: int, sweep: bool, thresholds: Iterable[float], windows: Iterable[int]) -> list[Setting]:
    """Base-only, draft-only, WSD at (threshold, window), and with `sweep` WSD over the grid (no duplicates)."""
    out = [Setting("base"), Setting("draft"), Setting("online", threshold, window)]
    if sweep:
        out += [Setting("online", t, w) for t in thresholds for w in windows]
    return list(dict.fromkeys(out))


def make_record(setting: Setting, prompt: EvalPrompt, result: WSDResult, count_base_tokens: Callable[[str], int]) -> Record:
    """The facts of one reply plus its quality signals."""
    u, t = result.usage, result.timings
    leak = None if setting.mode == "draft" else signals.leaked_role_marker(result.finish_reason, u.reply_tokens, count_base_tokens(result.text))
    return {
        **_ident(setting, prompt),
        "text": result.text,
        "draft_text": result.draft_text,
        "finish_reason": result.finish_reason,
        "switch_point": result.switch_point,
        "reply_tokens": u.reply_tokens,
        # usage counts a forced start (a conversation that ends with the assistant's turn) as the writing model's
        "draft_written_tokens": u.reply_tokens - u.base_tokens,
        "base_written_tokens": u.base_tokens,
        "ttft_s": t.ttft,
        "total_s": t.total,
        "repetition": signals.repetition_share(result.text),
        "degenerate": signals.is_degenerate(result.text),
        "leak": leak,
        "empty": signals.is_empty(result.text),
        "truncated": signals.is_truncated(result.finish_reason),
        "declined": signals.is_declined(result.text) if prompt.should_decline else None,
        "error": None,
    }


def error_record(setting: Setting, prompt: EvalPrompt, error: BaseException) -> Record:
    return {**_ident(setting, prompt), "error": f"{type(error).__name__}: {error}"}


def _ident(setting: Setting, prompt: EvalPrompt) -> Record:
    return {
        "setting": setting.name,
        "mode": setting.mode,
        "threshold": setting.threshold,
        "window": setting.window,
        "prompt_id": prompt.id,
        "category": prompt.category,
        "line": prompt.line,
    }


def run_settings(
    runtime: WSDRuntime,
    prompts: list[EvalPrompt],
    settings: list[Setting],
    *,
    max_tokens: int,
    concurrency: int = 8,
    on_record: Callable[[Record], None] = lambda record: None,
) -> tuple[list[Record], dict[str, float]]:
    """All records (in setting, then prompt order) and each setting's wall seconds."""
    tokenizer = runtime.load().base.tokenizer

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    records: list[Record] = []
    walls: dict[str, float] = {}
    live = _Live()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="wsd-eval")
    try:
        for setting in settings:
            start = time.perf_counter()
            futures = {pool.submit(live.ask, runtime, p.messages, max_tokens=max_tokens, **setting.params()): i for i, p in enumerate(prompts)}
            done: dict[int, Record] = {}
            for future in as_completed(futures):
                prompt = prompts[futures[future]]
                try:
                    record = make_record(setting, prompt, future.result(), count)
                except WSDError as exc:
                    record = error_record(setting, prompt, exc)
                done[futures[future]] = record
                on_record(record)
            walls[setting.name] = time.perf_counter() - start
            records += [done[i] for i in range(len(prompts))]
    except BaseException:  # interrupted: requests not yet started are dropped, and those in flight ended
        pool.shutdown(wait=False, cancel_futures=True)
        live.end_all()
        raise
    pool.shutdown()
    return records, walls


class _Live:
    """The requests in flight, each a stream that an interrupt can end from the main thread."""

    def __init__(self) -> None:
        self.streams: set[Any] = set()
        self.lock = threading.Lock()
        self.ended = False

    def ask(self, runtime: WSDRuntime, messages: Any, **params: Any) -> WSDResult:
        """One reply, as runtime.generate gives it, from a stream kept here while it runs."""
        stream = runtime.stream(messages, **params)
        with self.lock:
            if self.ended:
                stream.close()
            self.streams.add(stream)
        try:
            for event in stream:
                if isinstance(event, FinalEvent):
                    return event.result
            raise RuntimeClosedError("the request was ended before its reply")
        finally:
            with self.lock:
                self.streams.discard(stream)
            stream.close()

    def end_all(self) -> None:
        """Close every stream in flight, and any that starts later, so the runtime stops decoding them."""
        with self.lock:
            self.ended = True
            streams = list(self.streams)
        for stream in streams:
            stream.close()
