"""The shared runtime: one per (draft, base, device, dtype) in a process, with one worker thread.

Requests come from any thread or event loop and go back as events: `stream` is a blocking
iterator, `astream` an async iterator that never blocks the event loop. Models load on the first
request, in the worker thread; a request's grammar compiles beside it.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
import queue
import signal
import threading
import time
import warnings
import weakref
from collections import Counter, deque
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import torch

from . import interrupts, submission
from .encoding import encode_text
from .engine import MODELS, Engine, RuntimeStats, given_up
from .errors import (
    EXITS,
    InvalidParameterError,
    ModelLoadError,
    RequestFailedError,
    RequestTimeoutError,
    RuntimeClosedError,
    ToolResultWarning,
    WSDError,
    copy_of,
    described,
    detached,
    released,
    user_stacklevel,
)
from .events import Event, FinalEvent, WSDResult
from .loading import (
    EMBEDDED_BASE,
    EMBEDDED_DRAFT,
    LoadedModel,
    context_window,
    gguf_context_window,
    gguf_header,
    hub_cached,
    hub_reachable,
    load_model,
    local_path,
    local_source,
    model_source,
    named_by,
    pinned,
    repo_id_hint,
    resolve_device,
    resolve_dtype,
)
from .messages import Message, normalize_messages, results_naming_no_call
from .params import GenerationParams, aparse_params, parse_params
from .prompts import base_prompt_tokens, draft_prompt_tokens, require_chat_template
from .scheduler import MAX_CACHED_TOKENS, MAX_RUNNING
from .sequence import CallerLeft
from .structured import compiled_grammar, constraint_spec
from .submission import (
    POLL_S,
    Joined,
    Submission,
    SyncStream,
    collect,
    unwrap,
    wait_time,
)

Messages = Seq[Mapping[str, Any] | Message]
# Threads compiling grammars beside the worker at once, per runtime; requests past them wait for one
# of them, in order (0: the worker compiles each grammar itself, as it does when no thread can start).
MAX_COMPILES = 4
# Submissions taken in (prompts built, prefix cache searched) between two steps while requests run:
# a burst of 300 had held running streams for seconds (taking in one costs 2-26 ms with its prompt's
# length); the rest wait in the inbox, counted as queued, in order.
ACCEPT_PER_STEP = 16
# Seconds close() (and interpreter exit) waits for a worker ending its step, and for compiles; a
# model's load cannot be interrupted, so a load in progress is waited for to its end whatever this
# says (a worker thread still inside torch when exit tears it down aborts the process).
CLOSE_WAIT_S = 30.0


AUTO_LIMITS = ("prefill_chunk", "lookup_tokens", "prefix_cache_tokens")  # None at construction: chosen for the device and models


def _check_limits(values: dict[str, int | None], unset: Iterable[str]) -> None:
    """InvalidParameterError for a limit that is not an integer of at least its least value (0 for
    prefix_cache_tokens and lookup_tokens, 1 for the rest); those named in `unset` may be None."""
    for name, value in values.items():
        if value is None and name in unset:
            continue
        least = 0 if name in ("prefix_cache_tokens", "lookup_tokens") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise InvalidParameterError(f"invalid {name}={value!r}: must be an integer >= {least}")


def _check_loading_options(draft_revision: Any, base_revision: Any, trust_remote_code: Any) -> None:
    """InvalidParameterError for a revision that is not a str or None, or a trust_remote_code that is
    not a bool (the string "no" is truthy: it would have let a repository's code run)."""
    for name, value in (("draft_revision", draft_revision), ("base_revision", base_revision)):
        if value is not None and not isinstance(value, str):
            raise InvalidParameterError(f"invalid {name}={value!r}: must be a branch, tag or commit as a str, or None")
    if not isinstance(trust_remote_code, bool):
        raise InvalidParameterError(f"invalid trust_remote_code={trust_remote_code!r}: must be True or False")


def measured_length(n: int, window: int, own: int) -> int:
    """A prompt of `n` tokens of a model whose window is `own`, measured against a window `window` <= `own`:
    (n + 1) * window / own, rounded up, less one, which is below `window` exactly when n < own (it fits)."""
    return -(-(n + 1) * window // own) - 1


MIN_PROMPT_ROOM = 1024  # the least room reply_room leaves a prompt, in a window of 4096 or more


def reply_room(mode: str, max_tokens: int, max_draft_tokens: int, window_of: Callable[[str], int], fitted: int | None = None) -> int:
    """How much of a request's window (`window_of(mode)`: WSDRuntime.context_window, or a reading
    that never waits) to leave for a reply, for a caller that fits a prompt to it (LlamaIndex's
    num_output, the CLI's history): max_tokens where one model writes the reply. In WSD the draft
    writes at most max_draft_tokens in that window, the smaller, and the base the rest in its own,
    so the window need hold only that much of a longer max_tokens. A prompt keeps at least a
    quarter of the window prompts are fitted to (`fitted`, else the request's) or MIN_PROMPT_ROOM
    tokens, the fewer: a reply longer than the rest is cut at the window's end anyway (max_tokens is
    capped to what is left), and a packer left no room had failed."""
    window = window_of(mode)
    if len(_models_of(mode)) == 1:
        room = max_tokens
    else:
        room = max(min(max_tokens, max_draft_tokens), max_tokens - (window_of("base") - window))
    fitted = window if fitted is None else min(fitted, window)
    return min(room, fitted - min(fitted // 4, MIN_PROMPT_ROOM))


def _models_of(mode: str) -> tuple[str, ...]:
    """The models a request in `mode` runs, or InvalidParameterError naming the modes."""
    if mode not in MODELS:
        raise InvalidParameterError(f"invalid mode={mode!r}: must be one of {', '.join(map(repr, MODELS))}")
    return MODELS[mode]


class Limits(TypedDict, total=False):
    """The limits WSDRuntime takes (see its arguments), for from_models."""

    max_running: int
    max_cached_tokens: int
    prefill_chunk: int | None
    prefix_cache_tokens: int | None
    lookup_tokens: int | None


class WSDRuntime:
    """Owns the two models and the worker thread that runs the step loop."""

    instances: weakref.WeakSet[WSDRuntime] = weakref.WeakSet()

    def __init__(
        self,
        draft: str | os.PathLike[str] | None = None,
        base: str | os.PathLike[str] | None = None,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        *,
        draft_revision: str | None = None,
        base_revision: str | None = None,
        trust_remote_code: bool = False,
        max_running: int = MAX_RUNNING,
        max_cached_tokens: int = MAX_CACHED_TOKENS,
        prefill_chunk: int | None = None,
        prefix_cache_tokens: int | None = None,
        lookup_tokens: int | None = None,
    ) -> None:
        self.draft_source = model_source("draft", draft, EMBEDDED_DRAFT)
        self.base_source = model_source("base", base, EMBEDDED_BASE)
        # Where each loads from: a local path as it resolves now, so that a later os.chdir() does not
        # load another directory's model (the sources keep the caller's spelling, for display).
        self._from = {"draft": pinned(self.draft_source), "base": pinned(self.base_source)}
        _check_loading_options(draft_revision, base_revision, trust_remote_code)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self._revisions = (draft_revision, base_revision)
        self._trust_remote_code = trust_remote_code
        self.limits: dict[str, Any] = {  # int, or None for a limit the engine sets itself (AUTO_LIMITS)
            "max_running": max_running,
            "max_cached_tokens": max_cached_tokens,
            "prefill_chunk": prefill_chunk,
            "prefix_cache_tokens": prefix_cache_tokens,
            "lookup_tokens": lookup_tokens,
        }
        _check_limits(self.limits, unset=AUTO_LIMITS)
        self._unstarted: Counter[str] = Counter()  # requests that ended before there was an engine (a load failed), by outcome
        self._start_clean()
        self._closed = False
        self.engine: Engine | None = None
        self._final_stats: RuntimeStats | None = None  # the engine's last counts, once closing let go of it (stats() reads them)
        self._context_windows_read: dict[str, int] = {}
        self._tokenizers: dict[str, Any] = {}  # read without the weights, before a load
        WSDRuntime.instances.add(self)

    def __repr__(self) -> str:
        """Which models, where, and whether they are loaded: what a notebook cell or a log shows of a runtime."""
        state = "closed" if getattr(self, "_closed", False) else "loaded" if getattr(self, "engine", None) else "not loaded"  # (half made too)
        dtype = str(self.dtype).removeprefix("torch.")
        return f"WSDRuntime(draft={self.draft_source!r}, base={self.base_source!r}, device={str(self.device)!r}, dtype={dtype!r}, {state})"

    def _start_clean(self) -> None:
        """No worker, no submissions, every lock free: at creation, and in a forked child."""
        self._inbox: queue.SimpleQueue[Submission | None] = queue.SimpleQueue()
        weakref.finalize(self, self._inbox.put, None).atexit = False  # collected: its idle worker wakes and ends
        self._lock = threading.Lock()  # loading, and reading a model's config or tokenizer alone
        self._worker_lock = threading.Lock()  # starting the worker and closing, so that no request slips between
        self._step_lock = threading.Lock()  # held by the worker for each step; configure() changes limits between steps
        self._thread: threading.Thread | None = None
        # Submissions put in the inbox, and those the worker has taken from it (queued in the engine,
        # or counted as ended): the difference is queued too in stats(), while models load or a step runs.
        self._sent = self._taken = 0
        self._untaken: set[Submission] = set()  # those sent and not yet taken (so counted as queued)
        self._counts_lock = threading.Lock()  # stats() against the worker counting a request before there is an engine
        self._peak_queued = 0  # the most queued at once, counting the inbox (the engine sees only its own queue)
        self._compiles: set[threading.Thread] = set()  # compiling beside the worker (under the worker lock)
        self._to_compile: deque[Submission] = deque()  # waiting for one of them (under the worker lock)
        self._in_hand: Submission | None = None  # the submission the worker is taking in
        self._load_failed: tuple[float, BaseException] | None = None  # when the last load failed, and why
        self._loading = False  # a model is loading (under self._lock): close() waits for it to end

    def _after_fork(self) -> None:
        """In a forked child (multiprocessing's default on Linux, prefork servers and task queues): the
        parent's worker did not come along, and a lock it held mid-step would stay held forever. Start
        clean; the loaded models stay, shared with the parent until either writes to them, and the
        parent's requests are dropped unsaid (their callers are in the parent)."""
        self._start_clean()
        if self.engine is not None:
            self.engine.forget_requests()

    @classmethod
    def from_models(cls, draft: LoadedModel, base: LoadedModel, **limits: Unpack[Limits]) -> WSDRuntime:
        """A runtime over models you already loaded (not shared through get_runtime), with the limits WSDRuntime takes."""
        require_chat_template(draft.tokenizer, draft.name)
        runtime = cls(draft.name, base.name, str(base.device), base.dtype, **limits)
        runtime.engine = Engine(draft, base, **runtime.limits)
        return runtime

    # ------------------------------------------------------------ public API

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    def stream(self, messages: Messages, **params: Any) -> SyncStream:
        """Blocking iterator of events: TextDelta pieces, then one FinalEvent. The messages and
        parameters are checked here, so bad ones raise at the call; the request is sent at the first
        `next()`, and its `timeout` counts from this call. `close()` ends the request, from any
        thread (a stop button's), and a `next()` waiting meanwhile ends the iteration."""
        return SyncStream(self, *self._checked(messages, params))

    def astream(self, messages: Messages, **params: Any) -> AsyncGenerator[Event, None]:
        """Async iterator of events; waiting never blocks the event loop. Checked at the call, sent
        at the first `__anext__()`, as `stream` is."""
        return self._astream(*self._checked(messages, params))

    async def _astream(self, messages: list[Message], params: GenerationParams, called: float) -> AsyncGenerator[Event, None]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Event | BaseException] = asyncio.Queue()

        def deliver(item: Event | BaseException) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        sub = self._submit(messages, params, called, deliver, loop)
        try:
            while True:
                try:  # not asyncio.wait_for: in Python 3.11 it drops a cancellation that comes as an item arrives
                    async with asyncio.timeout(wait_time(sub)):
                        item = await inbox.get()
                except TimeoutError:  # an event that came meanwhile is taken first, as a SimpleQueue's get does
                    if inbox.empty():  # (the loop, held up past the timeout, fired it before the get took one)
                        self._check_waiting(sub)
                    continue
                yield unwrap(item)
                if isinstance(item, FinalEvent):
                    return
        except WSDError as error:
            released(error)  # a caller may keep it
            raise
        finally:
            sub.cancelled.set()

    def generate(self, messages: Messages, **params: Any) -> WSDResult:
        """The whole reply at once (built from the same stream)."""
        return collect(self.stream(messages, **params))

    async def agenerate(self, messages: Messages, **params: Any) -> WSDResult:
        """The whole reply at once, awaited (built from the async stream). A new schema's grammar is
        built off the event loop first; the stream then gets the values as checked, so that one
        given as an iterator (a `stop`) is not read twice (the second read found it empty)."""
        normalize_messages(messages)  # bad messages first, as astream checks them
        parsed = await aparse_params(**params)
        joined = Joined()
        async for event in self.astream(messages, **{name: getattr(parsed, name) for name in params}):
            joined.add(event)
        return joined.result()

    def load(self) -> Engine:
        """Load both models now (normally done by the worker on the first request); any failure is
        a WSDError (ModelLoadError naming the cause: out of memory on the device, say). Outside
        inference mode, where the worker calls it from: weights made as inference tensors fail a
        mixture-of-experts model's first forward pass (Mixtral's, Qwen-MoE's, DeepSeek-V3's)."""
        with self._lock, torch.inference_mode(False):
            self._check_open()  # a closed runtime's engine is not handed out for more work
            if self.engine is None:
                # One after the other: transformers' model loading is not thread-safe. A close()
                # meanwhile ends the load at the next model, so that exit waits for one load at most.
                try:
                    self._loading = True
                    draft = self._load("draft", self._from["draft"], self._revisions[0])
                    require_chat_template(draft.tokenizer, draft.name)
                    self._check_open()
                    base = self._load("base", self._from["base"], self._revisions[1])
                    self._check_open()
                    with self._step_lock:  # so that a configure() meanwhile is not lost
                        engine = Engine(draft, base, **self.limits)
                        with self._counts_lock:  # a snapshot sees no engine and the runtime's counts, or the engine's
                            self.engine = engine
                except WSDError:
                    raise
                except Exception as exc:
                    raise ModelLoadError(f"the models could not load: {described(exc)}") from exc
                finally:
                    self._loading = False
            return self.engine

    def configure(
        self,
        max_running: int | None = None,
        max_cached_tokens: int | None = None,
        prefill_chunk: int | None = None,
        prefix_cache_tokens: int | None = None,
        lookup_tokens: int | None = None,
    ) -> None:
        """Change the limits: concurrent sequences, cache tokens reserved for them, prompt tokens fed
        per step, prompt positions kept across requests per model (0 keeps none), and ids a
        decode pass guesses (prompt lookup, in drafts and continuations; 0 guesses none)."""
        values = {
            "max_running": max_running,
            "max_cached_tokens": max_cached_tokens,
            "prefill_chunk": prefill_chunk,
            "prefix_cache_tokens": prefix_cache_tokens,
            "lookup_tokens": lookup_tokens,
        }
        _check_limits(values, unset=values)
        if all(value is None for value in values.values()):
            return  # nothing to change (get_runtime() calls this for every adapter call): no wait for the step
        self._check_open()  # a closed runtime's limits are lost with it (its successor keeps those it closed with)
        with self._step_lock:  # between two steps: a step sees one set of limits throughout
            for name, value in values.items():
                if value is None:
                    continue
                self.limits[name] = value
                if self.engine is not None:
                    self.engine.configure(name, value)

    def stats(self) -> RuntimeStats:
        """A snapshot: requests queued/running/finished/failed/cancelled, tokens per phase, batch sizes,
        cache use, passes per model and seconds in passes per phase."""
        with self._counts_lock:  # the engine is set under it: none now means none until this snapshot is taken
            engine = self.engine
            if engine is None:
                return self._with_runtime_counts(self._final_stats or RuntimeStats.empty())
        with engine.scheduler.lock:  # under which the worker takes a submission and queues (or counts) it
            return self._with_runtime_counts(engine.stats())

    def _with_runtime_counts(self, stats: RuntimeStats) -> RuntimeStats:
        """The engine's snapshot (or an empty one) with what the runtime counts itself: requests in the
        inbox, those that ended before there was an engine, and the peak of queued requests. One in
        the inbox whose caller has left counts as it will once the worker takes it (cancelled, or
        failed at its timeout), not as queued: a load of a minute had shown them queued throughout."""
        now = time.perf_counter()
        left = Counter(given_up(sub.params, sub.submitted, now, sub.cancelled) for sub in list(self._untaken) if sub.cancelled.is_set())
        return replace(
            stats,
            queued=stats.queued + self._sent - self._taken - left.total(),
            finished=stats.finished + self._unstarted["finished"],
            failed=stats.failed + self._unstarted["failed"] + left["failed"],
            cancelled=stats.cancelled + self._unstarted["cancelled"] + left["cancelled"],
            peaks={**stats.peaks, "queued": max(stats.peaks["queued"], self._peak_queued)},
        )

    def _note_queued(self) -> None:
        """Raise the peak of queued requests to what is queued now, inbox included (as stats() counts);
        under the worker lock, so that callers sending at once do not lose each other's count. It
        does not wait for the scheduler's lock, which the worker holds while it takes a request in
        (a grammar compiling on the worker among that): the engine's queue is read as it stands."""
        engine = self.engine
        waiting = 0 if engine is None else len(engine.scheduler.waiting)
        self._peak_queued = max(self._peak_queued, waiting + self._sent - self._taken)

    @property
    def worker(self) -> threading.Thread | None:
        """The worker thread, while one runs."""
        return self._thread if self._thread is not None and self._thread.is_alive() else None

    def context_window(self, mode: str = "online") -> int:
        """The context window a request in `mode` has: the smallest of the models it runs (in their
        own tokens), from the loaded models or else from their configs alone."""
        return min(self._context_windows(_models_of(mode)).values())

    def known_context_window(self, mode: str = "online") -> int | None:
        """`context_window(mode)` if it can be told at once, else None (a hub model not in the hub's
        cache): nothing is downloaded or converted (a GGUF or embedded model's window before its
        first load is read from its header), and no load in progress is waited for."""
        try:
            return min(self._context_windows(_models_of(mode), at_once=True).values())
        except ModelLoadError:
            return None

    def _context_windows(self, models: Seq[str], at_once: bool = False) -> dict[str, int]:
        """The windows of `models` (a mode's), reading no other model's config."""
        if self.engine is not None:
            return {model: self.engine.model(model).context_window for model in models}
        from transformers import AutoConfig

        for model in models:
            if model not in self._context_windows_read:
                try:
                    self._context_windows_read[model] = context_window(self._read(model, AutoConfig, at_once))
                except ModelLoadError:
                    if not at_once or (window := self._gguf_window(model)) is None:
                        raise
                    self._context_windows_read[model] = window
        return {model: self._context_windows_read[model] for model in models}

    def _gguf_window(self, model: str) -> int | None:
        """The window a GGUF model (an embedded one too) not converted yet will have, from its header:
        an event loop asking for it (LlamaIndex's metadata, on every call) must not wait the half
        minute a conversion takes."""
        header = gguf_header(self._from[model])
        return None if header is None else gguf_context_window(header)

    def tokenizer(self, model: str = "base") -> Any:
        """A model's tokenizer ("base": usage is counted in it; "draft"), from the loaded model or
        else read alone, without the weights. The worker encodes with the same object: encode
        through wsd_llms.encoding (or window_tokens), which keeps threads' encodes apart."""
        if model not in ("base", "draft"):
            raise InvalidParameterError(f"invalid model={model!r}: must be 'base' or 'draft'")
        if self.engine is not None:
            return self.engine.model(model).tokenizer
        if model not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[model] = self._read(model, AutoTokenizer)
        return self._tokenizers[model]

    def encoder(self, model: str = "base") -> Callable[[str], list[int]]:
        """Text to ids in a model's tokenizer ("base" or "draft"), safe to call beside the worker (it
        takes the tokenizer's encode lock; the tokenizer's own `.encode` from another thread can flip
        the flag a prompt's encode runs under): e.g. LlamaIndex's `Settings.tokenizer`."""
        return functools.partial(encode_text, self.tokenizer(model))

    def window_tokens(self, messages: Messages, **params: Any) -> int:
        """The messages' length against `context_window(mode)`, for a counter that trims to that window
        (LangChain's get_num_tokens_from_messages): each model the mode runs counts their prompt, the
        template and the tools' block with tools, in its own tokens, scaled by that window over its own
        (a base with 4x the draft's window counts about a quarter); the largest count is the length,
        and the prompt fits exactly when it is below the window (at most `context_window(mode) - 1`,
        LangChain's max_input_tokens). Each message counts as a turn, a trailing assistant message
        too (prompts.base_prompt_tokens). Reads the tokenizers and the configs of the mode's models
        and loads no weights (an embedded or GGUF model is converted first if it has not been); no
        messages take 0."""
        parsed = parse_params(**params)
        models = _models_of(parsed.mode)
        if isinstance(messages, (list, tuple)) and not messages:
            return 0
        normalized = normalize_messages(messages, request=False)
        tools = parsed.tools if parsed.calls_tools else ()
        counts = {
            "draft": lambda: draft_prompt_tokens(self.tokenizer("draft"), normalized, tools),
            "base": lambda: base_prompt_tokens(self.tokenizer("base"), normalized, parsed.base_template, tools),
        }
        windows = self._context_windows(models)
        window = min(windows.values())
        return max(measured_length(counts[model](), window, windows[model]) for model in models)

    def _read(self, model: str, auto: Any, at_once: bool = False) -> Any:
        """One model's config or tokenizer without its weights (`auto`: AutoConfig or AutoTokenizer).
        A local model (a directory, a converted GGUF or embedded model) is read at once, even while
        the models load (a token count on an event loop must not wait for the weights); the rest
        waits for a load in progress and may be downloaded or converted; with `at_once` (a config),
        only the hub's cache is read, at once, else ModelLoadError."""
        source, revision = self._from[model], self._revisions[0 if model == "draft" else 1]
        try:
            ready = local_source(source, build=False)
        except ModelLoadError:  # not converted yet
            if at_once:
                raise
            ready = None
        if ready is not None:  # whole: a conversion writes aside and renames (a hub snapshot fills file by file)
            return self._from_pretrained(model, source, auto, str(ready), None)
        if at_once:  # a repo id: its config in the hub's cache, which a download puts in place whole
            return self._from_pretrained(model, source, auto, str(hub_cached(source, revision)), None)
        with self._lock:
            local = local_source(source)
            if local is not None:
                return self._from_pretrained(model, source, auto, str(local), None)
            return self._from_pretrained(model, source, auto, source, revision, is_repo_id=True, offline=not hub_reachable())

    def _from_pretrained(
        self, model: str, source: str, auto: Any, where: str, revision: str | None, is_repo_id: bool = False, offline: bool = False
    ) -> Any:
        """A config or tokenizer; `is_repo_id`: read from the hub (or its cache); `offline`: from the
        hub's cache alone, at once, as a load reads it where the hub cannot be reached (the hub client
        retries an unreachable host for most of a minute, on every token count)."""
        try:
            read = auto.from_pretrained(where, revision=revision, trust_remote_code=self._trust_remote_code, **({"local_files_only": True} if offline else {}))
        except OSError as exc:
            hint = repo_id_hint(source, offline) if is_repo_id else ""
            raise ModelLoadError(f"could not read {model} model {source!r}{hint}: {exc}") from exc
        return named_by(read, where, self.draft_source if model == "draft" else self.base_source)  # as the loaded model's is

    def _check_open(self) -> None:
        """Refuse new work once closed, or once interpreter exit has closed every runtime."""
        if _exiting:  # a request from an atexit callback that runs after _close_all: no model may load now
            raise RuntimeClosedError("the interpreter is exiting: wsd-llms closed its runtimes, and no new request can run")
        if self._closed:
            raise RuntimeClosedError(
                "this runtime is closed; make a new one (wsd_llms.get_runtime(), or WSDRuntime.from_models for models you loaded)"
            )

    def close(self) -> None:
        """Stop the worker; requests still waiting fail with RuntimeClosedError. The runtime lets go
        of its models and caches once no worker runs (what holds it, a variable or a kept error's
        traceback, holds them no longer); a runtime from get_runtime also leaves its registry."""
        with self._worker_lock:
            self._closed = True
            self._inbox.put(None)
            threads = [self._thread, *self._compiles]
        _unregister(self)
        deadline = time.monotonic() + CLOSE_WAIT_S
        for thread in threads:  # compiles too: a thread inside xgrammar at interpreter exit aborts it
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=max(deadline - time.monotonic(), 0))
                while thread.is_alive() and self._loading:  # it stops once the model in progress is in
                    thread.join(timeout=POLL_S)
        if not any(thread is not None and thread.is_alive() for thread in threads):  # else the worker lets go as it ends
            self._let_go_of_models()

    def _let_go_of_models(self) -> None:
        """Drop the engine of a closed runtime, with its models, caches and prefix cache, once nothing
        runs on it; stats() keeps its last counts and context_window() the windows."""
        engine = self.engine
        if engine is None:
            return
        self._context_windows_read.update(self._context_windows(MODELS["online"]))
        with engine.scheduler.lock:  # a request counted into the engine is in the snapshot, or sees it gone (_end_unstarted)
            final = engine.stats()
            with self._counts_lock:
                self._final_stats, self.engine = final, None

    # ------------------------------------------------------------ worker

    def _load(self, role: str, source: str, revision: str | None) -> LoadedModel:
        shown = self.draft_source if role == "draft" else self.base_source  # the caller's spelling, in results
        return load_model(
            source, device=self.device, dtype=self.dtype, revision=revision, trust_remote_code=self._trust_remote_code, role=role, name=shown
        )

    @staticmethod
    def _checked(messages: Messages, params: dict[str, Any]) -> tuple[list[Message], GenerationParams, float]:
        """The messages and parameters checked and normalized (bad ones raise), and when the caller asked."""
        called = time.perf_counter()
        normalized, parsed = normalize_messages(messages), parse_params(**params)
        for mismatch in results_naming_no_call(normalized):
            warnings.warn(f"{mismatch}; the prompt pairs results with calls by place", ToolResultWarning, stacklevel=user_stacklevel())
        return normalized, parsed, called

    def _submit(
        self,
        normalized: list[Message],
        parsed: GenerationParams,
        submitted: float,
        deliver: Callable[[Event | BaseException], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Submission:
        """Send a request to the worker; `loop`: an async caller's event loop, whose closing ends the request."""
        cancelled = CallerLeft(loop)

        def guarded(item: Event | BaseException) -> None:
            try:
                deliver(item)
            except RuntimeError:  # the caller's event loop has closed: nobody is waiting, so the request ends
                cancelled.set()

        with self._worker_lock:  # against close(): a request either reaches a live worker or is refused
            self._check_open()
            sub = Submission(normalized, parsed, guarded, cancelled, submitted)
            self._start_worker()  # if no thread can start, the request was never sent
            self._sent += 1  # before the worker can take it
            self._untaken.add(sub)
            self._inbox.put(sub)
            self._note_queued()
        return sub

    def _start_worker(self) -> None:
        """Start a worker if none is alive (under the worker lock)."""
        if self._thread is None or not self._thread.is_alive():
            thread = threading.Thread(target=_work, args=(weakref.ref(self), self._inbox), name="wsd-llms-worker", daemon=True)
            thread.start()
            self._thread = thread
            _workers.add(thread)

    def _compile_aside(self, engine: Engine, sub: Submission | None) -> None:
        """Compile a request's grammar for the models its mode runs (thread "wsd-llms-compile"), then
        send it back to the worker, which finds the grammar cached; then the next request waiting
        for a compile thread, if any. The first grammar for a tokenizer builds xgrammar's table of
        its words (over a second for the embedded base's 262k), a later schema 5-130 ms; on the
        worker every running stream would wait for it (benchmarks/bench_grammar_pause.py).
        Meanwhile the request counts as queued; a compile that fails fails the request when the
        worker takes it again, and one whose caller left is not compiled."""
        while sub is not None:
            if not sub.cancelled.is_set():
                try:
                    spec = constraint_spec(sub.params)
                    assert spec is not None  # only a constrained request compiles aside
                    for model in MODELS[sub.params.mode]:
                        compiled_grammar(engine.model(model), spec)
                except BaseException as exc:  # whatever it is, it goes back to the request
                    sub.compile_error = exc
            with self._worker_lock:
                if self._closed:
                    self._compiles.discard(threading.current_thread())
                    for left in (sub, *self._to_compile):
                        self._refuse(left, RuntimeClosedError("this runtime was closed while the request's grammar compiled"))
                    self._to_compile.clear()
                    return
                try:
                    self._start_worker()  # the worker may have died meanwhile
                except RuntimeError as exc:  # no thread can start: the request fails, counted
                    self._refuse(sub, _start_error(exc))
                else:
                    self._inbox.put(sub)
                sub = self._to_compile.popleft() if self._to_compile else None
                if sub is None:  # ended under the lock: a request queued after this starts a thread of its own
                    self._compiles.discard(threading.current_thread())

    def _compile_beside(self, engine: Engine, sub: Submission) -> bool:
        """Have a request's grammar compiled beside the worker (`_compile_aside`): by a new thread,
        or, when MAX_COMPILES are compiling, by the first of them to finish. False when none can be
        (MAX_COMPILES is 0, no thread can start, or the runtime is closing: close() has listed the
        threads it waits for): the worker compiles it then."""
        thread = threading.Thread(target=self._compile_aside, args=(engine, sub), name="wsd-llms-compile", daemon=True)
        with self._worker_lock:
            if self._closed or not MAX_COMPILES:
                return False
            if len(self._compiles) >= MAX_COMPILES:
                self._to_compile.append(sub)
                return True
            try:
                thread.start()
            except RuntimeError:  # the process's thread limit
                return False
            self._compiles.add(thread)
            _workers.add(thread)
        return True

    def _check_waiting(self, sub: Submission) -> None:
        """While a caller waits: fail at once if the worker stopped, or if the request's timeout passed
        and the worker, busy without stepping (loading the models), has not failed it itself."""
        thread = self._thread
        seq, engine = sub.seq() if sub.seq is not None else None, self.engine
        if self._closed or thread is None or not thread.is_alive():
            sub.cancelled.told_closed = True
            stopped = "this runtime was closed" if self._closed else "the wsd-llms worker stopped"
            if seq is None:
                raise RuntimeClosedError(f"{stopped} before the worker took this request in")
            where = "was queued for admission" if seq.queued else f"was generating ({len(seq.reply.ids)} reply tokens so far)"
            raise RuntimeClosedError(f"{stopped} while this request {where}")
        if sub.params.timed_out(sub.submitted, time.perf_counter(), grace=submission.TIMEOUT_GRACE):  # read from its module: a test sets it there
            sub.cancelled.set()
            where = (
                engine.timed_out_where(seq)  # as the worker says it, in a step that outlasted the timeout
                if seq is not None and engine is not None
                else " before the worker took it in (loading the models, compiling its grammar, or a long step)"
            )
            raise RequestTimeoutError(f"the request exceeded timeout={sub.params.timeout}s{where}")

    def _guarded_run(self, item: Submission | None) -> bool:
        """Serve from `item` until idle (True) or closed (False); if the step loop dies, fail every
        request at once (the next call starts a new worker)."""
        try:
            return self._run(item)
        except BaseException as exc:
            with self._worker_lock:  # a request submitted after this starts a fresh worker; one before it fails here
                if self._thread is threading.current_thread():
                    self._thread = None
                self._fail_all(f"the wsd-llms worker died: {described(exc)}")
            raise

    def _run(self, item: Submission | None | Literal[False]) -> bool:
        with torch.inference_mode():
            while True:
                # What was submitted since the last step joins the next one (their prefills batch), up
                # to ACCEPT_PER_STEP of them while requests run.
                taken = 0
                while item is not False:
                    if item is None:
                        self._fail_all("the runtime was closed")
                        self._let_go_of_models()
                        return False
                    if self._closed:  # sent before close(): it fails with the rest, without loading models or starting
                        self._refuse(item, RuntimeClosedError("the runtime was closed"))
                    else:  # in hand until counted: if the worker dies while taking it in, it fails with the rest
                        self._in_hand = item
                        self._accept(item)
                        self._in_hand = None
                    taken += 1
                    item = False if taken >= ACCEPT_PER_STEP and self._streams_running() else self._next_submission()
                if self.engine is None or not self.engine.has_work():
                    return True
                with self._step_lock:
                    self.engine.step()
                item = self._next_submission()

    def _streams_running(self) -> bool:
        """Whether requests are running (not only waiting) and the runtime is open: a step then waits
        on the submissions taken in before it. Closing refuses all that were sent before it at once."""
        return not self._closed and self.engine is not None and bool(self.engine.scheduler.running)

    def _next_submission(self) -> Submission | None | Literal[False]:
        """The next submission, None when closing, False when there is none."""
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return False

    def _accept(self, sub: Submission) -> None:
        """Take a submission into the engine: queued, or (cancelled, or failing as it starts) counted.
        One with a grammar goes aside first, and comes back once the grammar is compiled."""
        if self._given_up(sub):  # before the models load for it
            return
        try:
            engine = self._engine_for(sub)
        except Exception as exc:  # no models: the request fails
            self._end_unstarted(sub, "failed", _start_error(exc))
            return
        if not sub.compiled and sub.params.constrained and not sub.cancelled.is_set():
            sub.compiled = True  # from here on it compiles once, beside the worker or on it
            if self._compile_beside(engine, sub):
                return  # still in the inbox's count: it comes back once compiled
        if self._given_up(sub):
            return
        if sub.compile_error is not None:
            self._end_unstarted(sub, "failed", _start_error(sub.compile_error))
            return
        try:  # outside the scheduler's lock, which stats() waits for: prompts built, a grammar compiled on the worker
            seq = engine.prepare(sub.messages, sub.params, sub.deliver)
            seq.cancelled, seq.created, sub.seq = sub.cancelled, sub.submitted, weakref.ref(seq)
            engine.start(seq)
        except BaseException as exc:  # a bad request must not kill the worker; it fails alone
            if isinstance(exc, EXITS):
                raise
            self._end_unstarted(sub, "failed", _start_error(exc))
            return
        with engine.scheduler.lock:  # taken and queued in one move, as stats() sees it
            self._taken += 1
            self._untaken.discard(sub)
            try:
                engine.scheduler.add(seq)
            except BaseException as exc:  # one that could never fit
                if isinstance(exc, EXITS):
                    raise
                engine.count("failed")
                sub.deliver(_start_error(exc))

    def _given_up(self, sub: Submission) -> bool:
        """Whether a submission ends here, counted, as cancelled (or given up on at its timeout) before
        it reached the worker, or past its timeout, which its caller has not noticed yet."""
        if sub.cancelled.is_set():
            self._end_unstarted(sub, given_up(sub.params, sub.submitted, time.perf_counter(), sub.cancelled))
            return True
        if sub.params.timed_out(sub.submitted, time.perf_counter()):
            self._end_unstarted(sub, "failed", RequestTimeoutError(f"the request exceeded timeout={sub.params.timeout}s before it started"))
            return True
        return False

    def _engine_for(self, sub: Submission) -> Engine:
        """The engine, loaded if need be. A load that fails fails the requests sent before it failed,
        each with a copy of its error, without another try each (a burst of requests that waited on
        one failed load had retried it one after another); a request sent after it tries again."""
        failed = self._load_failed
        if self.engine is None and failed is not None and sub.submitted <= failed[0]:
            raise copy_of(failed[1])
        try:
            return self.load()
        except Exception as exc:  # kept as it is; each caller gets a copy, whose traceback holds only its own frames
            self._load_failed = (time.perf_counter(), detached(exc))
            raise copy_of(exc) from exc.__cause__

    def _end_unstarted(self, sub: Submission, outcome: str, error: BaseException | None = None) -> None:
        """Count a request that ends before it runs (taken from the inbox and counted in one move, as
        stats() sees it; by the runtime while there is no engine), and tell its caller why, if anyone waits."""
        while True:
            engine = self.engine
            with self._counts_lock if engine is None else engine.scheduler.lock:
                if engine is not self.engine:  # let go of as this waited for its lock (a close): counted by the runtime
                    continue
                self._taken += 1
                self._untaken.discard(sub)
                if engine is None:
                    self._unstarted[outcome] += 1
                else:
                    engine.count(outcome)
            break
        if error is not None:
            sub.deliver(error)

    def _fail_all(self, reason: str) -> None:
        """Fail every request the worker holds (running, waiting, in hand, in the inbox), each with an
        error of its own (RuntimeClosedError(reason)): one object raised in many callers' threads
        would gather all their frames in its traceback, and hold each caller's memory for the others."""
        engine = self.engine
        if engine is not None:
            for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
                if engine._drop(seq, _ended_by_runtime(seq.params, seq.created, seq.cancelled)):
                    seq.deliver(RuntimeClosedError(reason))
        in_hand, self._in_hand = self._in_hand, None
        if in_hand is not None:
            self._refuse(in_hand, RuntimeClosedError(reason))
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item:
                self._refuse(item, RuntimeClosedError(reason))

    def _refuse(self, item: Submission, error: BaseException) -> None:
        """Fail a request the engine never took (still in the inbox, or compiling its grammar, as the
        runtime closed or its worker died), counted as failed like the requests that were running,
        or as its caller left it if it had already given up on it (as `_accept` counts it)."""
        self._end_unstarted(item, _ended_by_runtime(item.params, item.submitted, item.cancelled), error)


def _ended_by_runtime(params: GenerationParams, since: float, left: CallerLeft) -> str:
    """How a request the runtime ended (closing, or its worker dying) counts: failed, or as its
    caller left it if it had already given up on it (engine.given_up)."""
    return given_up(params, since, time.perf_counter(), left) if left.is_set() else "failed"


def _start_error(exc: BaseException) -> WSDError:
    """What a caller gets for a request that could not start: our own errors as they are, another
    as the cause of a RequestFailedError (that request failed; the runtime serves the rest); detached
    from the worker's frames, which hold what the worker had in hand (a prompt's ids, a model loaded
    before the other failed) for as long as a caller keeps the error."""
    if isinstance(exc, WSDError):
        return detached(exc)  # type: ignore[return-value]
    error = RequestFailedError(f"could not start the request: {described(exc)}")
    error.__cause__ = detached(exc)
    return error


def _work(ref: weakref.ref[WSDRuntime], inbox: queue.SimpleQueue[Submission | None]) -> None:
    """The worker thread. It holds its runtime only while serving, so a runtime dropped without
    close() (nobody can be waiting on it then) is freed with its models, and its worker ends."""
    while True:
        item = inbox.get()
        runtime = ref()
        if runtime is None or not runtime._guarded_run(item):
            return
        del runtime, item  # an idle worker holds neither: the request's messages, or its caller's event loop


_registry: dict[tuple, WSDRuntime] = {}
_closed_limits: dict[tuple, dict[str, Any]] = {}  # a closed runtime's, for its successor
_registry_lock = threading.Lock()


def _same_source(source: str) -> str:
    """A model source as the registry knows it: a local path by the files it resolves to ("md", "./md/"
    and its absolute path load the same files, and so do a directory holding one .gguf and that
    file), anything else (a repo id) as it is."""
    path = Path(source).expanduser()
    if not path.exists():
        return source
    try:
        named = local_path(source)
    except ModelLoadError:  # its load says what is wrong with it; the path as given names it here
        named = None
    return str((named or path).resolve())


def _same_device(device: torch.device) -> str:
    """A device as the registry knows it: "cpu" for any CPU index, and a CUDA device by its index,
    the current one where none is given ("auto" and "cuda" are "cuda:0" unless another is set)."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device() if torch.cuda.is_initialized() else 0}"
    return str(device)


def _unregister(runtime: WSDRuntime) -> None:
    """Take a closed runtime out of the registry (it held it, and its models, for the life of the
    process), keeping the limits it was given for the runtime get_runtime makes next for its key."""
    with _registry_lock:
        for key, registered in list(_registry.items()):
            if registered is runtime:
                del _registry[key]
                _closed_limits[key] = dict(runtime.limits)


def get_runtime(
    draft: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    draft_revision: str | None = None,
    base_revision: str | None = None,
    trust_remote_code: bool = False,
    max_running: int | None = None,
    max_cached_tokens: int | None = None,
    prefill_chunk: int | None = None,
    prefix_cache_tokens: int | None = None,
    lookup_tokens: int | None = None,
) -> WSDRuntime:
    """The process's runtime for these models (created on first call, loaded on first request; after
    `close()`, a new one with the closed one's limits, loaded again on its first request).

    `max_running`, `max_cached_tokens`, `prefill_chunk`, `prefix_cache_tokens` and `lookup_tokens`,
    when given, set the runtime's limits.
    """
    dev = resolve_device(device)
    _check_loading_options(draft_revision, base_revision, trust_remote_code)
    key = (
        _same_source(model_source("draft", draft, EMBEDDED_DRAFT)),
        _same_source(model_source("base", base, EMBEDDED_BASE)),
        _same_device(dev),
        str(resolve_dtype(dtype, dev)),
        draft_revision,
        base_revision,
        trust_remote_code,
    )
    while True:
        with _registry_lock:
            runtime = _registry.get(key)
            if runtime is None or runtime._closed:  # a closed one's successor keeps the limits it was given
                limits = runtime.limits if runtime is not None else _closed_limits.pop(key, {})
                runtime = _registry[key] = WSDRuntime(
                    draft,
                    base,
                    device,
                    dtype,
                    draft_revision=draft_revision,
                    base_revision=base_revision,
                    trust_remote_code=trust_remote_code,
                    **limits,
                )
        try:
            runtime.configure(
                max_running=max_running,
                max_cached_tokens=max_cached_tokens,
                prefill_chunk=prefill_chunk,
                prefix_cache_tokens=prefix_cache_tokens,
                lookup_tokens=lookup_tokens,
            )
        except RuntimeClosedError:  # closed by another thread since: its successor, as after a close()
            continue
        return runtime


def _after_fork_in_child() -> None:
    """Every runtime in a forked child starts clean (WSDRuntime._after_fork); so does the registry's lock."""
    global _registry_lock
    _registry_lock = threading.Lock()
    for runtime in list(WSDRuntime.instances):
        runtime._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


_workers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()  # every worker and compile started, while it runs
_exiting = False  # set by _close_all at interpreter exit


@atexit.register
def _close_all() -> None:
    """At interpreter exit, stop every worker, and let every compile end, before torch's threads are
    torn down (a worker thread alive then aborts the process, and one inside xgrammar too). A Ctrl-C
    meanwhile ends the process at once, as interrupted (130): raised in here, it left the workers
    alive, and the process aborted (SIGABRT) on a second Ctrl-C just after the first. A request made
    after it (from an atexit callback registered before this module was imported, which runs later)
    is refused: a worker started then aborts the process."""
    global _exiting
    _exiting = True
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda signum, frame: interrupts.exit_now(128 + signum))
    for runtime in list(WSDRuntime.instances):  # those made directly too, not only get_runtime's
        runtime.close()
    for thread in list(_workers):  # those of runtimes collected just now are ending
        thread.join(timeout=CLOSE_WAIT_S)
