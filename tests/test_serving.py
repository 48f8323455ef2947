"""Serving many requests at once: batching, admission, cancellation, timeouts, fault isolation, shutdown."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import multiprocessing
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import make_tokenizer, tiny_gemma3, tiny_llama
from machine import needs_bfloat16_kernels

from wsd_llms import (
    FinalEvent,
    InvalidParameterError,
    ModelLoadError,
    RequestFailedError,
    RequestTimeoutError,
    RequestTooLargeError,
    RuntimeClosedError,
    TextDelta,
    WSDError,
    WSDRuntime,
)
from wsd_llms import encoding, output_head, structured
from wsd_llms import runtime as runtime_module
from wsd_llms import submission
from wsd_llms.messages import normalize_messages
from wsd_llms.model_runner import ModelRunner
from wsd_llms.params import parse_params
from wsd_llms.prompts import build_prompts
from wsd_llms.sequence import Phase, Sequence

QUESTIONS = [
    "What is the capital of France?",
    "Hello there! Write a list.",
    "Count: one two three four five six seven",
    "Tell me about photosynthesis.",
    "def f(x): return x * 2",
    "Water boils at what temperature?",
    "The quick brown fox",
    "Thank you!",
]
# Different lengths and switch behaviour: early switches, late ones, and one that never switches.
SETTINGS = [
    {"max_tokens": 12, "switch_threshold": 0.5, "switch_window": 2},
    {"max_tokens": 40, "switch_threshold": 0.9, "switch_window": 3},
    {"max_tokens": 25, "switch_threshold": 1.0},
    {"max_tokens": 33, "switch_threshold": 0.5, "switch_window": 1},
    {"max_tokens": 8},
    {"max_tokens": 30, "mode": "staged", "switch_threshold": 0.5, "switch_window": 2},
    {"max_tokens": 20, "max_draft_tokens": 4},
    {"max_tokens": 36, "switch_threshold": 0.02, "switch_window": 1},
]


def _msgs(q):
    return [{"role": "user", "content": q}]


@pytest.fixture
def fresh(draft_tokenizer):
    """A private runtime (limits and failures here must not touch the shared ones). No guessed ids
    unless a test asks (lookup_tokens): the tiny draft repeats itself, and with them a long request
    that a test holds in flight would end within a fraction of a second."""
    runtimes = []

    def make(**limits):
        limits.setdefault("lookup_tokens", 0)
        rt = WSDRuntime.from_models(
            tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0),
            tiny_gemma3(make_tokenizer(420), 1, "tiny-gemma3"),
            **limits,
        )
        runtimes.append(rt)
        return rt

    yield make
    for rt in runtimes:
        rt.close()


def _concurrently(rt, jobs):
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: rt.generate(_msgs(job[0]), **job[1]), jobs))


def _texts_beside(rt, jobs, odd):
    """The replies to `jobs`, run at once beside `odd()`: one more request that fails or is
    cancelled, and checks its own outcome."""

    def job(i):
        return odd() if i == len(jobs) else rt.generate(_msgs(jobs[i][0]), **jobs[i][1]).text

    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        return list(pool.map(job, range(len(jobs) + 1)))[:-1]


class _Panic(BaseException):
    """As pyo3's PanicException, which a panic in a Rust tokenizer raises: a BaseException, not an Exception."""


@pytest.mark.parametrize("pair", ["shared_runtime", "differ_runtime"])
def test_batched_equals_sequential(pair, request):
    rt = request.getfixturevalue(pair)
    jobs = list(zip(QUESTIONS, SETTINGS))
    sequential = [rt.generate(_msgs(q), **s) for q, s in jobs]
    peak_before = rt.stats().peaks["draft_batch"]
    batched = _concurrently(rt, jobs)
    for one, many in zip(sequential, batched):
        assert many.text == one.text
        assert many.switch_point == one.switch_point
        assert many.finish_reason == one.finish_reason
    assert any(r.switch_point is not None for r in sequential) and any(r.switch_point is None for r in sequential)
    peaks = rt.stats().peaks
    assert max(peaks["draft_batch"], peak_before) > 1  # they really shared forward passes
    assert peaks["base_batch"] > 1  # scoring passes too


PICK = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"enum": [1, 2, 3]}}, "required": ["color", "n"]}
# One of each kind of request a service mixes: every mode, constrained output, a tool call,
# seeded sampling, stop strings and repetition penalties, so grammar masks and samplers run inside shared batches.
MIXED = [
    {"max_tokens": 30, "switch_threshold": 0.5, "switch_window": 2},
    {"max_tokens": 30, "mode": "staged", "switch_threshold": 0.5, "switch_window": 2, "max_draft_tokens": 40},
    {"max_tokens": 20, "mode": "base"},
    {"max_tokens": 20, "mode": "draft"},
    {"max_tokens": 60, "response_format": PICK, "switch_threshold": 0.5, "switch_window": 2},
    {"max_tokens": 80, "tools": [{"name": "pick", "parameters": PICK}], "tool_choice": "required"},
    {"max_tokens": 30, "temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": 7},
    {"max_tokens": 40, "stop": ["e", "\n"], "switch_threshold": 1.0},
    {"max_tokens": 30, "repetition_penalty": 1.5, "switch_threshold": 0.5, "switch_window": 2},  # greedy, projected in full
    {"max_tokens": 30, "repetition_penalty": 1.3, "temperature": 0.8, "seed": 3, "switch_threshold": 0.5, "switch_window": 2},
]


@pytest.mark.parametrize("pair", ["shared_runtime", "differ_runtime"])
def test_mixed_requests_batched_equal_their_lone_replies(pair, request):
    rt = request.getfixturevalue(pair)
    jobs = [(QUESTIONS[i % len(QUESTIONS)], MIXED[i % len(MIXED)]) for i in range(16)]
    alone = [rt.generate(_msgs(q), **s) for q, s in jobs]
    together = _concurrently(rt, jobs)
    for (q, s), one, many in zip(jobs, alone, together):
        assert (many.text, many.switch_point, many.finish_reason) == (one.text, one.switch_point, one.finish_reason), s
        calls = [[(c.name, c.arguments) for c in r.tool_calls] for r in (many, one)]  # ids are fresh per call
        assert (calls[0], many.parsed) == (calls[1], one.parsed), s
    assert alone[4].parse_error is None and alone[5].tool_calls[0].name == "pick"  # the constraints held
    assert rt.stats().peaks["draft_batch"] > 1


@needs_bfloat16_kernels
@pytest.mark.parametrize("lookup_tokens", [0, 4])
def test_greedy_screen_in_shared_batches_changes_no_reply(draft_tokenizer, monkeypatch, lookup_tokens):
    """A base whose head gets the bfloat16 greedy screen (output_head): the mixed requests, alone
    and together, reply as they do with the full projection; greedy ids and logits share a step's
    projection call, one id a pass and with guessed ids (several rows a request)."""
    monkeypatch.setattr(output_head, "BOUND_WORDS", 64)
    monkeypatch.setattr(output_head, "MIN_BOUND_VOCAB", 128)  # the tiny vocabulary (300 words) gets a screen
    base = tiny_llama(draft_tokenizer, 0, "tiny-base", sharpen=3.0)
    words = base.model.get_input_embeddings().weight
    base.model.get_output_embeddings().weight = words
    with torch.no_grad():
        words[-16:] = words[:16]  # ties with the words it picks most: rows the screen leaves to the full projection
    rt = WSDRuntime.from_models(tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0), base, lookup_tokens=lookup_tokens)
    try:
        head = rt.load().runners["base"].head
        assert head._screen is not None
        jobs = [(QUESTIONS[i % len(QUESTIONS)], MIXED[i % len(MIXED)]) for i in range(16)]
        replies = {}
        for on in (False, True):
            head.use_screen = on
            replies[on] = [rt.generate(_msgs(q), **s) for q, s in jobs] + _concurrently(rt, jobs)
        for off, on in zip(replies[False], replies[True]):
            assert (on.text, on.switch_point, on.finish_reason) == (off.text, off.switch_point, off.finish_reason)
        if lookup_tokens:  # guessed rows under a grammar take the full projection, masked row by row
            assert head.screened_rows > 0 and rt.stats().prompt_lookup["accepted"] > 0
        else:
            assert head.screened_rows > 50 and head.fallback_rows > 5
    finally:
        rt.close()


async def test_32_async_streams_lose_nothing(differ_runtime):
    rt = differ_runtime
    jobs = [(QUESTIONS[i % 8], {**SETTINGS[i % 8], "mode": "online"}) for i in range(32)]

    async def run(q, s):
        parts, result = [], None
        async for event in rt.astream(_msgs(q), **s):
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                result = event.result
        return "".join(parts), result

    outcomes = await asyncio.gather(*(run(q, s) for q, s in jobs))
    expected = {}
    for (q, s), (joined, result) in zip(jobs, outcomes):
        assert joined == result.text
        key = (q, tuple(sorted(s.items())))
        assert expected.setdefault(key, result.text) == result.text  # same request, same reply


async def test_agenerate_reads_its_parameters_once(shared_runtime):
    """agenerate checks its parameters once: a `stop` given as an iterator (which generate takes)
    had been used up by the check, and the request then ran with no stop strings."""
    whole = shared_runtime.generate(_msgs(QUESTIONS[0]), max_tokens=16)
    stop = whole.text.strip()[3:6]
    expected = shared_runtime.generate(_msgs(QUESTIONS[0]), max_tokens=16, stop=iter([stop]))
    assert expected.stop_reason == stop and len(expected.text) < len(whole.text)
    assert (await shared_runtime.agenerate(_msgs(QUESTIONS[0]), max_tokens=16, stop=iter([stop]))).text == expected.text


async def test_cancelling_half_leaves_the_rest_unchanged(fresh):
    rt = fresh()
    reference = await rt.agenerate(_msgs(QUESTIONS[1]), max_tokens=40, switch_threshold=0.9)
    before = rt.stats()

    async def complete():
        return (await rt.agenerate(_msgs(QUESTIONS[1]), max_tokens=40, switch_threshold=0.9)).text

    async def break_after_first_delta():
        async for event in rt.astream(_msgs(QUESTIONS[2]), max_tokens=200, switch_threshold=1.0):
            break

    async def cancelled_task():
        task = asyncio.create_task(rt.agenerate(_msgs(QUESTIONS[3]), max_tokens=200, switch_threshold=1.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    kept = [complete() for _ in range(16)]
    dropped = [break_after_first_delta() for _ in range(8)] + [cancelled_task() for _ in range(8)]
    results = await asyncio.gather(*kept, *dropped)
    assert results[:16] == [reference.text] * 16
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (rt.stats().running or rt.stats().queued):
        await asyncio.sleep(0.05)
    after = rt.stats()
    assert after.cancelled - before.cancelled == 16
    assert after.finished - before.finished == 16
    assert after.running == after.queued == 0
    assert after.cached_tokens == 0 and after.reserved_tokens == 0  # every cancelled cache was freed


async def test_cancelling_as_an_event_arrives_still_cancels(fresh, monkeypatch):
    """A task cancelled in the moment an event reaches its stream (the event is queued, the task has
    not yet woken) stops with CancelledError and its request is cancelled. Under load events arrive
    every few milliseconds, so this moment is common; Python 3.11's asyncio.wait_for returned the
    event there and dropped the cancellation, and the reply ran on to its end."""
    rt = fresh()
    target: list[asyncio.Task] = []
    put = asyncio.Queue.put_nowait

    def put_then_cancel(queue, item):  # the stream's inbox takes an event; cancel its reader at once
        put(queue, item)
        if target:
            target.pop().cancel()

    monkeypatch.setattr(asyncio.Queue, "put_nowait", put_then_cancel)
    for _ in range(3):
        task = asyncio.create_task(rt.agenerate(_msgs(QUESTIONS[3]), max_tokens=200, switch_threshold=1.0))
        await asyncio.to_thread(_wait_for, lambda: rt.stats().cached_tokens > 0)
        target.append(task)
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(_wait_for, lambda: rt.stats().running == 0)
    after = rt.stats()
    assert (after.cancelled, after.finished, after.cached_tokens) == (3, 0, 0)


def test_scoring_passes_and_probabilities_do_not_depend_on_the_load(fresh, monkeypatch):
    """An online request scores its draft in the same passes, and gets the same probabilities to the
    bit, alone (a scoring pass may start every step) and among others (every SCORING_STRIDE steps):
    each pass ends where the request's own progress put it. So no switch decision can flip with the
    load, even at a near-tie (before, a pass under load took everything stable by the next open
    step, its rows rounded differently, and a threshold at such a tie gave another reply)."""
    from wsd_llms import online

    passes: dict[tuple[int, ...], list] = {}
    score = online._Scorer.score

    def recorded(self, handoff):
        probs = yield from score(self, handoff)
        passes.setdefault(tuple(self.seq.prompts.base_ids), []).append((len(handoff.draft_ids), list(probs)))
        return probs

    monkeypatch.setattr(online._Scorer, "score", recorded)
    rt = fresh()
    settings = {"max_tokens": 60, "max_draft_tokens": 60, "switch_threshold": 1.0, "switch_window": 6}  # all scored
    jobs = [(q, settings) for q in QUESTIONS[:4]]
    alone = [rt.generate(_msgs(q), **s).text for q, s in jobs]
    by_itself, passes = passes, {}
    together = [r.text for r in _concurrently(rt, jobs)]
    assert rt.stats().peaks["draft_batch"] >= 3
    assert passes == by_itself and together == alone


def test_requests_submitted_during_a_step_all_join_the_next(fresh):
    """The worker takes in everything that arrived while it stepped, not one request per step, so
    a burst of requests prefills together."""
    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)  # load
    engine = rt.engine
    entered, release, seen = threading.Event(), threading.Event(), []
    step = engine.step

    def gated_step():
        if not release.is_set():
            entered.set()
            release.wait(10)
        seen.append(len(engine.scheduler))
        step()

    engine.step = gated_step
    blocker = rt.stream(_msgs(QUESTIONS[0]), max_tokens=30, switch_threshold=1.0)
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(next, blocker)
        assert entered.wait(10)  # the worker is inside a step
        burst = [pool.submit(rt.generate, _msgs(q), max_tokens=6) for q in QUESTIONS[1:5]]
        deadline = time.monotonic() + 10
        while rt._inbox.qsize() < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        assert all(isinstance(f.result(timeout=60).text, str) for f in burst)
        first.result(timeout=60)
        blocker.close()
    assert seen[0] == 1 and seen[1] == 5  # the blocked step, then all four new requests at once


def test_requests_sent_before_close_are_not_started(fresh, monkeypatch):
    """Requests still in the inbox when close() is called fail with RuntimeClosedError without
    being prepared (nor, on a runtime whose models are not loaded yet, loading them)."""
    rt = fresh()
    entered, release = _held_steps(rt, monkeypatch)
    prepared, prepare = [], rt.engine.prepare
    monkeypatch.setattr(rt.engine, "prepare", lambda *a, **k: prepared.append(1) or prepare(*a, **k))
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(rt.generate, _msgs(QUESTIONS[0]), max_tokens=30)
        assert entered.wait(10)  # the worker is inside a step
        waiting = pool.submit(rt.generate, _msgs(QUESTIONS[1]), max_tokens=30)
        _wait_for(lambda: rt._inbox.qsize() == 1)
        _close_mid_step(rt, pool, release, [running, waiting])
    assert prepared == [1]  # the request that was running; not the one sent before close()
    stats = rt.stats()
    assert (stats.finished, stats.failed, stats.cancelled) == (1, 2, 0)  # every request counted once


def test_requests_sent_during_a_step_or_a_load_show_as_queued(fresh, monkeypatch, draft_tokenizer):
    """stats() counts a request from the moment it is sent: while the worker is inside a step (or
    loading the models) requests wait in its inbox, and they show as queued, not nowhere."""
    rt = fresh()
    entered, release = _held_steps(rt, monkeypatch)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(rt.generate, _msgs(QUESTIONS[0]), max_tokens=30)]
        assert entered.wait(10)
        futures += [pool.submit(rt.generate, _msgs(q), max_tokens=30) for q in QUESTIONS[1:4]]
        _wait_for(lambda: rt._inbox.qsize() == 3)
        stats = rt.stats()
        assert (stats.queued, stats.running, stats.finished) == (4, 0, 1)  # the first is admitted when the step schedules
        assert stats.peaks["queued"] == 4
        release.set()
        for future in futures:
            assert future.result(timeout=60).text
    stats = rt.stats()
    assert (stats.queued, stats.running, stats.finished) == (0, 0, 5)

    # Before the models are loaded (the first request loads them in the worker).
    unloaded = WSDRuntime.from_models(tiny_llama(draft_tokenizer, 0), tiny_llama(draft_tokenizer, 1))
    built, unloaded.engine = unloaded.engine, None
    loading, loaded = threading.Event(), threading.Event()

    def slow_load():  # the first request's load lasts until the test has looked
        loading.set()
        loaded.wait(10)
        unloaded.engine = built
        return built

    monkeypatch.setattr(unloaded, "load", slow_load)
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(unloaded.generate, _msgs(q), max_tokens=5) for q in QUESTIONS[:2]]
            assert loading.wait(10)
            _wait_for(lambda: unloaded._sent == 2)  # the second caller has sent its request too
            assert unloaded.stats().queued == unloaded.stats().peaks["queued"] == 2
            loaded.set()
            for future in futures:
                future.result(timeout=60)
        assert (unloaded.stats().queued, unloaded.stats().finished) == (0, 2)
    finally:
        unloaded.close()


def test_close_during_a_load_ends_it_before_the_next_model(draft_tokenizer):
    """A load cannot be interrupted, so close() (and interpreter exit, which closes every runtime)
    would wait for both models: instead the load stops once the model in progress is in, the base
    is never loaded, and the request waiting on the load fails as closed."""
    draft = tiny_llama(draft_tokenizer, 0, "tiny-draft")
    entered, release, loads = threading.Event(), threading.Event(), []

    class SlowLoad(WSDRuntime):
        def _load(self, role: str, source: str, revision: str | None):
            loads.append(source)
            entered.set()
            assert release.wait(30)
            return draft

    rt = SlowLoad("some/draft", "some/base")
    with ThreadPoolExecutor(2) as pool:
        request = pool.submit(rt.generate, _msgs(QUESTIONS[0]), max_tokens=5)
        assert entered.wait(10)
        closing = pool.submit(rt.close)
        _wait_for(lambda: rt._closed)
        release.set()
        closing.result(timeout=10)
        with pytest.raises(RuntimeClosedError):
            request.result(timeout=10)
    assert loads == ["some/draft"] and rt.engine is None


def test_requests_left_during_a_load_count_as_left_not_queued(draft_tokenizer):
    """A request whose caller leaves while the models load (its timeout passed, its task cancelled)
    stays in the inbox until the worker is free to end it; stats() counted it as queued all the while
    (for a minute, on a slow load), and counts it now as the worker will: once, and as it left."""
    models = {"draft": tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0), "base": tiny_gemma3(make_tokenizer(420), 1, "tiny-gemma3")}
    entered, release = threading.Event(), threading.Event()

    class SlowLoad(WSDRuntime):
        def _load(self, role: str, source: str, revision: str | None):
            entered.set()
            assert release.wait(30)
            return models[role]

    async def cancelled_in_time() -> None:
        with pytest.raises(asyncio.TimeoutError):  # the task is cancelled, well before the request's own timeout
            await asyncio.wait_for(rt.agenerate(_msgs(QUESTIONS[1]), max_tokens=4, timeout=0.6), 0.2)

    rt = SlowLoad("tiny-draft", "tiny-gemma3", device="cpu", lookup_tokens=0)
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(rt.generate, _msgs(QUESTIONS[0]), max_tokens=4)
            assert entered.wait(10)
            with pytest.raises(RequestTimeoutError):
                rt.generate(_msgs(QUESTIONS[2]), max_tokens=4, timeout=0.2)
            asyncio.run(cancelled_in_time())
            time.sleep(0.6)  # past the cancelled request's timeout: it still left before it
            s = rt.stats()
            assert (s.queued, s.failed, s.cancelled, rt.loaded) == (1, 1, 1, False)
            release.set()
            assert waiting.result(timeout=30).text
        s = rt.stats()
        assert (s.queued, s.running, s.finished, s.failed, s.cancelled) == (0, 0, 1, 1, 1)
    finally:
        release.set()
        rt.close()


def test_a_runtime_shows_its_models_device_and_state(fresh):
    """What a notebook cell or a log shows of a runtime: not <WSDRuntime at 0x...>."""
    rt = fresh()
    shown = "WSDRuntime(draft='tiny-draft', base='tiny-gemma3', device='cpu', dtype='float32', {})"
    assert repr(rt) == shown.format("loaded")
    rt.close()
    assert repr(rt) == shown.format("closed")
    unloaded = WSDRuntime("my/draft", "my/base", device="cpu")
    assert repr(unloaded) == "WSDRuntime(draft='my/draft', base='my/base', device='cpu', dtype='float32', not loaded)"
    unloaded.close()


def test_load_on_a_closed_runtime_is_refused_though_its_models_are_loaded(fresh):
    """load() on a closed runtime handed out its engine, whose models a caller could then run
    beside the closed runtime's contract; it raises RuntimeClosedError as every other call does."""
    rt = fresh()
    assert rt.load() is rt.engine
    rt.close()
    with pytest.raises(RuntimeClosedError, match="this runtime is closed"):
        rt.load()


def test_requests_waiting_when_the_worker_dies_fail_and_are_counted(fresh, monkeypatch):
    """Requests still in the inbox when the worker dies fail at once with it, and stats() counts
    them as failed with the request that was running."""
    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)
    engine = rt.engine
    entered, release = threading.Event(), threading.Event()

    def dying_step():
        entered.set()
        release.wait(10)
        raise WorkerKilled("killed by the test")

    monkeypatch.setattr(engine, "step", dying_step)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the death is expected
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(rt.generate, _msgs(QUESTIONS[0]), max_tokens=30)
        assert entered.wait(10)
        waiting = [pool.submit(rt.generate, _msgs(q), max_tokens=30) for q in QUESTIONS[1:3]]
        _wait_for(lambda: rt._inbox.qsize() == 2)
        release.set()
        for future in (running, *waiting):
            with pytest.raises(RuntimeClosedError, match="worker died"):
                future.result(timeout=30)
    # each its own error: one object raised in three callers' threads gathered all their frames
    assert len({id(future.exception()) for future in (running, *waiting)}) == 3
    stats = rt.stats()
    assert (stats.finished, stats.failed, stats.cancelled, stats.running, stats.queued) == (1, 3, 0, 0, 0)


def test_a_request_the_worker_dies_taking_in_fails_with_its_cause(fresh, monkeypatch):
    """The worker dying while it takes a request in (building its prompt) fails that request with
    the cause, counted: it was in neither the engine nor the inbox, so nothing told it, its caller
    found out at its next poll without the cause (or never, once another call had started a fresh
    worker), and stats() showed it queued for good."""
    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)
    prepare = rt.engine.prepare

    def dying_prepare(messages, params, deliver):
        if messages[-1].content == "die":
            raise WorkerKilled("killed while taking a request in")
        return prepare(messages, params, deliver)

    monkeypatch.setattr(rt.engine, "prepare", dying_prepare)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the death is expected
    with pytest.raises(RuntimeClosedError, match="worker died: WorkerKilled: killed while taking a request in"):
        rt.generate(_msgs("die"), max_tokens=5)
    assert rt.generate(_msgs(QUESTIONS[0]), max_tokens=3).usage.reply_tokens <= 3  # a fresh worker serves
    stats = rt.stats()
    assert (stats.finished, stats.failed, stats.cancelled, stats.running, stats.queued) == (2, 1, 0, 0, 0)


def test_closing_a_sync_stream_frees_its_cache(fresh):
    rt = fresh()
    stream = rt.stream(_msgs(QUESTIONS[0]), max_tokens=200, switch_threshold=1.0)
    next(stream)
    assert rt.stats().cached_tokens > 0
    stream.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and rt.stats().cancelled == 0:
        time.sleep(0.01)
    assert rt.stats().cancelled == 1 and rt.stats().cached_tokens == 0


def test_timeout_fails_only_that_request(fresh):
    rt = fresh()
    with pytest.raises(RequestTimeoutError, match="^the request exceeded timeout=0.01s"):
        rt.generate(_msgs(QUESTIONS[1]), max_tokens=300, switch_threshold=1.0, timeout=0.01)
    assert rt.generate(_msgs(QUESTIONS[0]), max_tokens=5).usage.reply_tokens <= 5


def test_a_timeout_the_caller_finds_in_a_long_step_says_where_the_request_was(fresh, monkeypatch):
    """A caller whose timeout passes while the worker is in a long step ends the request itself,
    and says where it was, as the worker would: here generating, and how far it got. Its message
    had said only that the worker had not ended it."""
    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)
    engine, step = rt.engine, rt.engine.step

    def slow_once_generating():  # a long step, once the request has written a token
        step()
        if any(seq.reply.ids for seq in engine.scheduler.running):
            time.sleep(1.0)

    monkeypatch.setattr(engine, "step", slow_once_generating)
    with pytest.raises(RequestTimeoutError, match=r"^the request exceeded timeout=0.3s while generating \([1-9]\d* reply tokens so far\)$"):
        rt.generate(_msgs(QUESTIONS[1]), max_tokens=300, switch_threshold=1.0, timeout=0.3)
    monkeypatch.setattr(engine, "step", step)
    _wait_for(lambda: rt.stats().running == 0)
    assert rt.stats().failed == 1 and rt.generate(_msgs(QUESTIONS[0]), max_tokens=5).usage.reply_tokens <= 5


def _held_steps(rt, monkeypatch):
    """Load `rt`, then hold every step of its worker until `release` is set; `entered` is set as a
    step is held. Returns (entered, release)."""
    rt.generate(_msgs("Hi"), max_tokens=2)
    return _hold(rt.engine, "step", monkeypatch)


def _hold(owner, name, monkeypatch):
    """Hold every call of `owner.name` until `release` is set; `entered` is set as a call is held.
    Returns (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    real = getattr(owner, name)

    def held(*args, **kwargs):
        entered.set()
        release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, held)
    return entered, release


def _close_mid_step(rt, pool, release, futures):
    """Close `rt` while its worker is held in a step (`_held_steps`), then let the step end: each of
    `futures` fails with RuntimeClosedError."""
    closing = pool.submit(rt.close)
    _wait_for(lambda: rt._closed)
    release.set()
    for future in futures:
        with pytest.raises(RuntimeClosedError, match="closed"):
            future.result(timeout=30)
    closing.result(timeout=30)


def _wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def test_a_sync_stream_closed_from_another_thread_ends_at_once(fresh):
    """A stop button's thread closes a stream whose next() waits in the queue behind max_running:
    a generator refused that ("generator already executing"), and the request kept its place until
    it was admitted and ran. The waiting next() ends the iteration, the request counts as
    cancelled, and the running one is unaffected."""
    rt = fresh(max_running=1)
    long = rt.stream(_msgs(QUESTIONS[1]), max_tokens=400, max_draft_tokens=400, mode="draft")
    next(long)
    queued = rt.stream(_msgs(QUESTIONS[0]), max_tokens=5)
    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(lambda: list(queued))
        _wait_for(lambda: rt.stats().queued == 1)
        pool.submit(queued.close).result(timeout=5)
        assert waiting.result(timeout=5) == []
    _wait_for(lambda: rt.stats().queued == 0 and rt.stats().cancelled == 1)
    assert rt.stats().running == 1
    with ThreadPoolExecutor(2) as pool:  # two readers at once: one is refused, as a generator's would be
        started = threading.Event()
        second = rt.stream(_msgs(QUESTIONS[0]), max_tokens=5)
        reading = pool.submit(lambda: (started.set(), next(second)))
        started.wait()
        _wait_for(lambda: rt.stats().queued == 1)
        with pytest.raises(ValueError, match="being read in another thread"):
            next(second)
        second.close()
        with pytest.raises(StopIteration):
            reading.result(timeout=5)
    _wait_for(lambda: rt.stats().queued == 0 and rt.stats().cancelled == 2)
    long.close()
    _wait_for(lambda: rt.stats().running == 0)
    assert list(queued) == [] and rt.stats().cancelled == 3


def test_reading_a_stream_while_another_thread_closes_it_ends_the_iteration(fresh, monkeypatch):
    """A stop button's close() lets go of the stream under the reader's lock; a next() that came in
    that moment raised "being read in another thread", where the iteration has simply ended."""
    rt = fresh()
    stream = rt.stream(_msgs(QUESTIONS[0]), max_tokens=30, mode="draft")
    next(stream)
    letting_go, done = _hold(stream, "_let_go", monkeypatch)
    closing = threading.Thread(target=stream.close)
    closing.start()
    try:
        assert letting_go.wait(10)
        with pytest.raises(StopIteration):
            next(stream)
    finally:
        done.set()
        closing.join(10)
    _wait_for(lambda: rt.stats().running == 0)
    assert rt.stats().cancelled == 1


def test_an_idle_worker_holds_no_request(fresh):
    """The worker, idle between requests, kept the last submission that woke it: its messages,
    and an async caller's event loop and queue, until the next request came."""
    rt = fresh()
    marker = "A request nobody holds any more."

    async def ask():
        return await rt.agenerate(_msgs(marker), max_tokens=2)

    asyncio.run(ask())
    _wait_for(lambda: rt.stats().running == 0)

    def held() -> list[submission.Submission]:
        gc.collect()
        return [o for o in gc.get_objects() if type(o) is submission.Submission and any(m.content == marker for m in o.messages)]

    _wait_for(lambda: not held())
    assert rt._thread is not None and rt._thread.is_alive()  # idle, not ended


def test_a_queued_request_times_out_while_it_waits(fresh):
    """A timeout counts the queue: it fires while the request waits behind max_running, not when it
    is admitted, and the error says it was waiting, and for which limits."""
    rt = fresh(max_running=1)
    long = rt.stream(_msgs(QUESTIONS[1]), max_tokens=400, max_draft_tokens=400, mode="draft")  # 300 tokens at least, greedy
    next(long)
    t0 = time.monotonic()
    with pytest.raises(RequestTimeoutError, match=r"^the request exceeded timeout=0.3s waiting for admission \(1 running of max_running=1, max_cached_tokens="):
        rt.generate(_msgs(QUESTIONS[1]), max_tokens=5, timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    assert rt.stats().running == 1  # the long request is still going
    long.close()
    _wait_for(lambda: rt.stats().running == 0)
    assert rt.stats().failed == 1 and rt.stats().cancelled == 1


@pytest.mark.parametrize("call", ["generate", "agenerate"])
def test_a_timeout_fires_while_the_worker_cannot_step(fresh, monkeypatch, call):
    """While the worker is busy without stepping (loading the models), the waiting caller fails on
    time (it had checked only every half second, and given the worker half a second more)."""
    rt = fresh()
    load = rt.load
    monkeypatch.setattr(rt, "load", lambda: (time.sleep(3), load())[1])  # a slow first load
    t0 = time.monotonic()
    with pytest.raises(RequestTimeoutError, match="timeout=0.2s"):
        if call == "generate":
            rt.generate(_msgs(QUESTIONS[0]), max_tokens=5, timeout=0.2)
        else:
            asyncio.run(rt.agenerate(_msgs(QUESTIONS[0]), max_tokens=5, timeout=0.2))
    assert time.monotonic() - t0 < 0.9


def test_an_async_reply_that_came_in_time_is_taken_though_the_loop_was_held_past_the_timeout(fresh):
    """An event loop held up (a handler's blocking call) past a request's timeout while its reply
    arrived in time: the timer fired before the queue's get took the reply, and the caller got
    RequestTimeoutError for a request that stats() counted as finished."""
    rt = fresh()
    rt.generate(_msgs(QUESTIONS[0]), max_tokens=3)  # loaded: the reply comes in a fraction of a second

    async def main():
        async def consume():
            return [event async for event in rt.astream(_msgs(QUESTIONS[0]), max_tokens=3, timeout=0.5)]

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)  # the request is sent
        _wait_for(lambda: rt.stats().finished == 2)  # the loop held (and the reply in) past the timeout
        time.sleep(0.6)
        return await task

    events = asyncio.run(main())
    assert isinstance(events[-1], FinalEvent) and (rt.stats().finished, rt.stats().failed) == (2, 0)


def test_a_request_that_fails_as_it_starts_fails_alone(fresh):
    """A request whose program fails before its first pass (here a forced reply start that its grammar
    rejects) gets that error; the requests running beside it finish as they would alone."""
    rt = fresh()
    alone = rt.generate(_msgs(QUESTIONS[0]), max_tokens=200, switch_threshold=1.0)
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(rt.generate, _msgs(QUESTIONS[0]), max_tokens=200, switch_threshold=1.0) for _ in range(2)]
        _wait_for(lambda: rt.stats().running == 2)
        forced = [{"role": "user", "content": "Pick a number."}, {"role": "assistant", "content": "hello"}]
        with pytest.raises(InvalidParameterError, match="forced start"):
            rt.generate(forced, max_tokens=5, response_format={"type": "regex", "pattern": "[0-9]+"})
        assert [f.result(timeout=60).text for f in running] == [alone.text] * 2
    assert rt.stats().failed == 1


def test_a_caller_whose_event_loop_closed_harms_no_other_request(fresh):
    """An async caller's loop may close with its request still running (asyncio.run after a
    wait_for timeout): that request ends, and the others are served as before."""
    rt = fresh()
    alone = rt.generate(_msgs(QUESTIONS[0]), max_tokens=100, switch_threshold=1.0)
    loop = asyncio.new_event_loop()
    orphan = rt.astream(_msgs(QUESTIONS[2]), max_tokens=400, max_draft_tokens=400, mode="draft")
    loop.run_until_complete(orphan.__anext__())  # it runs
    loop.close()  # and nobody will read it again
    worker = rt.worker
    assert rt.generate(_msgs(QUESTIONS[0]), max_tokens=100, switch_threshold=1.0).text == alone.text
    _wait_for(lambda: rt.stats().cancelled == 1)
    assert rt.worker is worker and rt.stats().failed == 0 and rt.stats().cached_tokens == 0
    del orphan


# Collecting a task left pending in a closed loop raises inside asyncio ("Event loop is closed"), as for any coroutine.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_queued_request_whose_event_loop_closed_never_runs(fresh):
    """A request still queued when its caller's loop closed was found out only at its first event:
    admitted, prefilled and drafting ahead of live requests. It ends now where it waits."""
    rt = fresh(max_running=1)
    rt.generate(_msgs(QUESTIONS[1]), max_tokens=2)
    blocker = dict(max_tokens=60, max_draft_tokens=60, mode="draft")
    before = dict(rt.stats().tokens)
    alone = rt.generate(_msgs(QUESTIONS[0]), **blocker)
    fed_alone = {k: v - before[k] for k, v in rt.stats().tokens.items()}
    before = dict(rt.stats().tokens)
    with closing(rt.stream(_msgs(QUESTIONS[0]), **blocker)) as running:
        first = next(running)  # it holds the one running slot
        loop = asyncio.new_event_loop()
        orphans = [rt.astream(_msgs(question), max_tokens=40, mode="draft") for question in QUESTIONS[2:5]]
        tasks = [loop.create_task(orphan.__anext__()) for orphan in orphans]
        loop.run_until_complete(asyncio.sleep(0.05))  # sent: queued behind the running one
        assert rt.stats().queued == 3
        loop.close()  # with the tasks pending: nobody will read them again
        assert first.text + "".join(event.text for event in running if isinstance(event, TextDelta)) == alone.text
    _wait_for(lambda: rt.stats().cancelled == 3 and rt.stats().queued == 0)
    assert {k: v - before[k] for k, v in rt.stats().tokens.items()} == fed_alone  # the orphans fed nothing
    assert rt.stats().failed == 0 and rt.stats().cached_tokens == 0
    del tasks, orphans
    gc.collect()  # here, under this test's filter


def test_configure_waits_for_the_step_in_progress(fresh):
    """Limits change between steps: a step never sees two prefill_chunk values (its pieces, and the
    prefix store they go to, are cut at one), and the store is not changed under the worker."""
    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)
    engine, step = rt.engine, rt.engine.step
    inside, release = threading.Event(), threading.Event()

    def gated_step():
        inside.set()
        release.wait(10)
        step()

    engine.step = gated_step
    with ThreadPoolExecutor(2) as pool:
        reply = pool.submit(rt.generate, _msgs(QUESTIONS[0]), max_tokens=5)
        assert inside.wait(10)
        change = pool.submit(rt.configure, prefill_chunk=7, prefix_cache_tokens=0)
        time.sleep(0.2)
        assert not change.done() and engine.prefill_chunk != 7
        t0 = time.monotonic()
        rt.configure()  # nothing to change, as every adapter call's get_runtime() asks: no wait
        assert time.monotonic() - t0 < 1
        release.set()
        change.result(timeout=10)
        reply.result(timeout=60)
    assert engine.prefill_chunk == 7 and all(p.max_tokens == 0 for p in engine.prefixes.values())
    with pytest.raises(InvalidParameterError, match="max_running=0"):
        rt.configure(prefill_chunk=9, max_running=0)  # one bad value changes nothing
    assert engine.prefill_chunk == 7


def test_close_racing_new_requests_leaves_no_worker(fresh):
    """Requests submitted while the runtime closes either run on the worker that close() stops or are
    refused: none starts a worker that outlives the runtime."""
    for trial in range(8):
        rt = fresh()
        rt.generate(_msgs("Hi"), max_tokens=2)
        errors: list[BaseException] = []

        def submit():
            for _ in range(50):
                try:
                    rt.generate(_msgs("Hi"), max_tokens=2, response_format={"type": "object"})
                except RuntimeClosedError:
                    return
                except BaseException as exc:  # anything else is a failure of the test
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=submit) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.05 + 0.01 * trial)
        rt.close()
        for t in threads:
            t.join(30)
        assert not errors and rt.worker is None


EXIT_WITH_REQUESTS_IN_FLIGHT = """
import sys, threading, time
sys.path.insert(0, {tests!r})
from tiny import make_tokenizer, tiny_gemma3, tiny_llama
from wsd_llms import RuntimeClosedError, WSDRuntime
rt = WSDRuntime.from_models(tiny_llama(make_tokenizer(300), 0, "d", sharpen=3.0), tiny_gemma3(make_tokenizer(420), 1, "b"))
def go():
    try:
        for _ in rt.stream([{{"role": "user", "content": "Hello there"}}], max_tokens=400, max_draft_tokens=400, mode="draft"):
            pass
    except RuntimeClosedError:
        print("closed at exit")
for _ in range(4):
    threading.Thread(target=go, daemon=True).start()
dropped = WSDRuntime.from_models(tiny_llama(make_tokenizer(300), 0, "d", sharpen=3.0), tiny_gemma3(make_tokenizer(420), 1, "b"))
dropped.generate([{{"role": "user", "content": "Hi"}}], max_tokens=4)
del dropped  # never closed, and collected as its worker may still be ending: that worker must end before exit too
time.sleep(0.5)
"""


REQUEST_AFTER_EXIT_CLOSED_THE_RUNTIMES = """
import atexit, sys
sys.path.insert(0, {tests!r})

def last_words():  # registered before wsd_llms.runtime is imported, so it runs after the runtime's own exit callback
    from wsd_llms import WSDError
    for name, runtime in (("used", used), ("new", made())):
        try:
            runtime.generate([{{"role": "user", "content": "Bye"}}], max_tokens=4)
        except WSDError as exc:
            print(name, type(exc).__name__, exc)

atexit.register(last_words)
from tiny import make_tokenizer, tiny_gemma3, tiny_llama
from wsd_llms import WSDRuntime

def made():
    return WSDRuntime.from_models(tiny_llama(make_tokenizer(300), 0, "d", sharpen=3.0), tiny_gemma3(make_tokenizer(420), 1, "b"))

used = made()
used.generate([{{"role": "user", "content": "Hi"}}], max_tokens=4)
"""


def test_a_request_after_exit_closed_the_runtimes_is_refused_as_such(tmp_path):
    """An atexit callback registered before wsd_llms.runtime was imported runs after it has closed
    every runtime. A request made there is refused as exiting: the closed runtime's error had said to
    make a new one, and a new runtime's (get_runtime's embedded models) had failed as a model that
    cannot load ("cannot schedule new futures after interpreter shutdown")."""
    script = tmp_path / "last_words.py"
    script.write_text(REQUEST_AFTER_EXIT_CLOSED_THE_RUNTIMES.format(tests=str(Path(__file__).parent)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    refused = "RuntimeClosedError the interpreter is exiting: wsd-llms closed its runtimes, and no new request can run"
    said = [line for line in proc.stdout.splitlines() if line]  # the tiny tokenizers' trainer writes empty lines
    assert said == [f"used {refused}", f"new {refused}"], proc.stderr[-2000:]


CTRL_C_WHILE_CLOSING_AT_EXIT = """
import os, signal, sys, threading
sys.path.insert(0, {tests!r})
from tiny import make_tokenizer, tiny_gemma3, tiny_llama
from wsd_llms import WSDRuntime
rt = WSDRuntime.from_models(tiny_llama(make_tokenizer(300), 0, "d", sharpen=3.0), tiny_gemma3(make_tokenizer(420), 1, "b"))
close = rt.close
def interrupted_close():  # a Ctrl-C (a second one, say) as exit closes the runtime
    os.kill(os.getpid(), signal.SIGINT)
    close()
rt.close = interrupted_close
stream = rt.stream([{{"role": "user", "content": "Hello there"}}], max_tokens=400, max_draft_tokens=400, mode="draft")
next(stream)  # the worker is serving it as the script ends
"""


def test_a_ctrl_c_while_exit_closes_the_runtime_ends_the_process_as_interrupted(tmp_path):
    """`wsd-llms eval`, Ctrl-C twice within a moment: the second one came as exit closed the runtime,
    raised a KeyboardInterrupt in the atexit callback that left the worker alive, and the process
    aborted ("terminate called without an active exception", SIGABRT). It now ends at once, 130."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_WHILE_CLOSING_AT_EXIT.format(tests=str(Path(__file__).parent)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_a_runtime_dropped_without_close_is_freed_and_its_worker_ends(draft_tokenizer):
    """The worker holds its runtime only while it serves: a runtime nobody uses any more (made
    directly, never closed) is collected with its models, and its worker thread ends."""
    rt = WSDRuntime.from_models(tiny_llama(draft_tokenizer, 0, "d", sharpen=3.0), tiny_gemma3(make_tokenizer(420), 1, "b"))
    assert rt.generate(_msgs(QUESTIONS[0]), max_tokens=8).text
    with closing(rt.stream(_msgs(QUESTIONS[1]), max_tokens=4)) as kept:  # an ended stream left in a variable holds nothing
        list(kept)
    worker, gone = rt.worker, weakref.ref(rt)
    del rt
    _wait_for(lambda: gc.collect() >= 0 and gone() is None)  # once the worker has ended the step that finished it
    worker.join(timeout=5)
    assert not worker.is_alive()


def test_interpreter_exit_with_requests_in_flight_is_clean(tmp_path):
    """Runtimes made directly (not by get_runtime) and never closed, one in use and one dropped: exit
    stops their workers first (a worker thread alive at exit aborts the process)."""
    script = tmp_path / "exit.py"
    script.write_text(EXIT_WITH_REQUESTS_IN_FLIGHT.format(tests=str(Path(__file__).parent)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


EXIT_DURING_A_SLOW_LOAD = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
import wsd_llms.runtime
from tiny import make_tokenizer, tiny_llama
from wsd_llms import RequestTimeoutError, WSDRuntime

wsd_llms.runtime.CLOSE_WAIT_S = 0.2  # far less than the load takes, as 30 s is for a large model


class SlowLoad(WSDRuntime):
    def _load(self, role, source, revision):
        x, start = torch.randn(256, 256), time.monotonic()
        while time.monotonic() - start < 3:  # inside torch, as a real load's conversion is
            x = torch.tanh(x @ x)
        return tiny_llama(make_tokenizer(300), 0, role)


rt = SlowLoad("some/draft", "some/base")
try:
    rt.generate([{{"role": "user", "content": "Hi"}}], max_tokens=4, timeout=0.3)
except RequestTimeoutError:
    print("gave up during the load", flush=True)
"""


def test_interpreter_exit_during_a_slow_load_waits_for_the_model_in_progress(tmp_path):
    """Exit's wait for the worker has a deadline, but a load cannot be interrupted: a worker still
    inside torch when exit tears it down aborts the process (SIGABRT, seen for a 72 s load of the
    embedded pair), so exit waits for the model being loaded, and the load stops there."""
    script = tmp_path / "exit_during_load.py"
    script.write_text(EXIT_DURING_A_SLOW_LOAD.format(tests=str(Path(__file__).parent)))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "gave up during the load"  # (training the tiny tokenizer prints blank lines)
    assert 3 <= time.monotonic() - start < 30  # the draft's load, not the base's too


def _in_a_forked_child(work, seconds=60.0):
    """What `work()` returns (as JSON) when run in a child forked from this process; fails the test
    if the child hangs (the child exits at once, running none of the parent's clean-up)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            try:
                out = {"value": work()}
            except BaseException as exc:  # the parent reports it
                out = {"error": f"{type(exc).__name__}: {exc}"}
            with os.fdopen(write, "w") as pipe:
                json.dump(out, pipe)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        ready, _, _ = select.select([pipe], [], [], seconds)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        text = pipe.read() if ready else ""
    os.waitpid(pid, 0)
    assert text, f"the forked child gave no answer within {seconds} s"
    out = json.loads(text)
    assert "error" not in out, out["error"]
    return out["value"]


def test_a_forked_child_serves_with_the_parents_models_whatever_the_fork_interrupted(fresh):
    """A fork (multiprocessing's default on Linux, prefork servers) can come while the worker is mid-step,
    holding its locks, with requests in flight: the child drops the parent's requests, starts its own
    worker and serves with the models it shares with the parent; the parent goes on unharmed."""
    rt = fresh()
    expected = rt.generate(_msgs(QUESTIONS[0]), max_tokens=20).text
    in_flight = rt.stream(_msgs(QUESTIONS[1]), max_tokens=300, max_draft_tokens=300, mode="draft")
    first = next(in_flight)

    def child():
        stats = rt.stats()
        return [stats.running, stats.queued, rt.generate(_msgs(QUESTIONS[0]), max_tokens=20, timeout=30).text]

    # The locks a worker holds mid-step, taken in its order, as the fork finds them (a fork waits
    # for an encode in flight: the test below).
    with rt._step_lock, rt.engine.scheduler.lock:
        running, queued, text = _in_a_forked_child(child)
    assert (running, queued, text) == (0, 0, expected)
    rest = "".join(e.text for e in in_flight if isinstance(e, TextDelta))
    assert first.text + rest
    assert rt.generate(_msgs(QUESTIONS[0]), max_tokens=20).text == expected


def test_a_fork_while_another_thread_encodes_leaves_the_child_a_working_tokenizer():
    """The Rust tokenizer encodes without the GIL under a lock of its own: a fork in the middle of an
    encode left that lock held in the child, whose first change of the special-token flag then
    blocked for good, GIL held. A fork now waits for the encodes in flight."""
    tokenizer = make_tokenizer(420)
    text = "The capital of France is Paris. Hello there </s> " * 200
    spans = [(0, len(text))]  # encoded as text: the flag changes
    expected = encoding.encode(tokenizer, text, spans)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            encoding.encode(tokenizer, text, spans)
            encoding.encode(tokenizer, text, [])

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        for _ in range(5):
            assert _in_a_forked_child(lambda: encoding.encode(tokenizer, text, spans), seconds=10) == json.loads(json.dumps(expected))
    finally:
        stop.set()
        thread.join()


def test_a_fork_while_another_thread_builds_a_grammar_leaves_the_child_able_to_check_it():
    """A check's grammar build under way in another thread of the parent never finishes in a forked
    child: a request there with the same schema had waited for it forever (and a fork that found the
    build cache's lock held had left it held)."""
    from concurrent.futures import Future

    from wsd_llms import structured
    from wsd_llms.params import GenerationParams, parse_params

    schema = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 1401}}, "required": ["text"]}
    spec = structured.constraint_spec(GenerationParams(response_format=schema))
    with structured._built_lock:  # as a build in another thread leaves things, mid-way
        structured._building[spec] = Future()
        try:
            assert _in_a_forked_child(lambda: parse_params(response_format=schema).response_format == schema, seconds=30)
        finally:
            del structured._building[spec]


_POOL_RUNTIME = None


def _pool_reply(question):
    return _POOL_RUNTIME.generate(_msgs(question), max_tokens=16, timeout=30).text


def test_a_fork_pool_started_while_requests_run_gets_the_same_replies(fresh):
    """multiprocessing with the fork start method, started while the parent's worker is busy."""
    global _POOL_RUNTIME
    _POOL_RUNTIME = rt = fresh()
    expected = [rt.generate(_msgs(q), max_tokens=16).text for q in QUESTIONS[:4]]
    in_flight = rt.stream(_msgs(QUESTIONS[5]), max_tokens=300, max_draft_tokens=300, mode="draft")
    next(in_flight)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        assert list(pool.map(_pool_reply, QUESTIONS[:4], timeout=90)) == expected
    in_flight.close()


@pytest.mark.parametrize("fault", [RuntimeError, _Panic], ids=["error", "base-exception"])
def test_injected_forward_failure_fails_one_request(fresh, monkeypatch, fault):
    rt = fresh()
    jobs = list(zip(QUESTIONS, SETTINGS))
    expected = [rt.generate(_msgs(q), **s) for q, s in jobs]
    poison = rt.engine.draft.tokenizer.encode("zqzqzq", add_special_tokens=False)

    def poisoned(kv):
        ids = kv.ids
        return any(ids[i : i + len(poison)] == poison for i in range(len(ids)))

    real_extend, real_batch = ModelRunner.extend, ModelRunner.extend_batch

    def extend(self, kv, ids, *args):
        if poisoned(kv):
            raise fault("injected fault")
        return real_extend(self, kv, ids, *args)

    def extend_batch(self, kvs, ids, keeps, *args):
        if any(poisoned(kv) for kv in kvs):
            raise fault("injected fault")
        return real_batch(self, kvs, ids, keeps, *args)

    monkeypatch.setattr(ModelRunner, "extend", extend)
    monkeypatch.setattr(ModelRunner, "extend_batch", extend_batch)

    def poisoned_request():
        with pytest.raises(RequestFailedError, match="injected fault"):
            rt.generate(_msgs("zqzqzq please"), max_tokens=30)

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert _texts_beside(rt, jobs, poisoned_request) == [e.text for e in expected]
    assert rt.stats().failed == 1
    assert rt.stats().retried_passes >= 1  # its batch failed and ran a row at a time
    assert not [w for w in said if "batched" in str(w.message)]  # a request failed, not batching: no warning


def test_a_kept_error_does_not_keep_the_failed_request_s_caches(fresh, monkeypatch):
    """The error a failed request raises holds no worker frames (they hold its caches): a caller that
    keeps it (batch with return_exceptions, a tracer) keeps no memory; the worker's trace is a note."""
    import gc
    import weakref

    from wsd_llms.sequence import Sequence

    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)
    caches, new_cache, real_extend = [], Sequence.new_cache, ModelRunner.extend

    def recorded(self, which):
        kv = new_cache(self, which)
        caches.append(weakref.ref(kv))
        return kv

    def extend(self, kv, ids, *args, **kwargs):
        if len(kv) > 40:
            raise RuntimeError("injected fault")
        return real_extend(self, kv, ids, *args, **kwargs)

    monkeypatch.setattr(Sequence, "new_cache", recorded)
    monkeypatch.setattr(ModelRunner, "extend", extend)
    with pytest.raises(RequestFailedError, match="injected fault") as failed:
        rt.generate(_msgs(QUESTIONS[0]), max_tokens=40, switch_threshold=1.0)
    gc.collect()
    assert caches and all(ref() is None for ref in caches)
    assert any("raised in the wsd-llms worker" in note for note in failed.value.__cause__.__notes__)


def test_an_error_of_a_request_that_could_not_start_holds_none_of_the_worker_s_frames(fresh):
    """As a running request's error: one that failed as it started (its prompt too long, say) keeps
    none of the frames it was raised in, which hold what the worker had in hand (the prompt's ids,
    or a model loaded before the other failed) for as long as a caller keeps the error."""
    from wsd_llms import ModelLoadError, PromptTooLongError

    def frames(error: BaseException) -> list[str]:
        names, tb = [], error.__traceback__
        while tb is not None:
            names.append(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
        return names

    rt = fresh()
    with pytest.raises(PromptTooLongError) as too_long:
        rt.generate(_msgs("word " * 3000), max_tokens=2)
    unloadable = WSDRuntime("/no/such/draft", "/no/such/base")
    try:
        with pytest.raises(ModelLoadError) as failed_load:
            unloadable.generate(_msgs("Hi"), max_tokens=2)
    finally:
        unloadable.close()
    for error in (too_long.value, failed_load.value):
        assert not {"_accept", "prepare", "load"} & set(frames(error)), frames(error)
        assert any("raised in the wsd-llms worker" in note for note in error.__notes__)


def test_a_prompt_far_too_long_fails_before_it_is_encoded(fresh, monkeypatch):
    """Megabytes of text that cannot fit a window fail without being encoded, by a floor its bytes
    set under its tokens: the worker encodes prompts, and every stream waited for it (1.8 MB: 2 s).
    So do megabytes in a tool's description or a call's arguments (6 s), which the prompt holds as
    text, and more messages than the base window has positions, before they are even rendered (100,000:
    4 s). A prompt nearer the window is encoded and measured exactly, as before."""
    from wsd_llms import PromptTooLongError
    from wsd_llms import prompts as prompts_module

    rt = fresh()
    encoded, rendered = [], []
    encode, render = prompts_module.encode_with_marks, prompts_module._chat_template
    monkeypatch.setattr(prompts_module, "encode_with_marks", lambda tok, text, *args: (encoded.append(len(text)), encode(tok, text, *args))[1])
    monkeypatch.setattr(prompts_module, "_chat_template", lambda *args: (rendered.append(1), render(*args))[1])
    both = r"^the prompt is at least [0-9]+ draft tokens \(draft context window 512\) and at least [0-9]+ base tokens \(base context window 512\): its text is "
    with pytest.raises(PromptTooLongError, match=both + r"2[0-9]{6} bytes as the draft's and 2[0-9]{6} bytes as the base's"):
        rt.generate(_msgs("word " * 400_000), max_tokens=2)
    tool = {"name": "f", "description": "x" * 2_000_000, "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(PromptTooLongError, match=r"at least [0-9]+ base tokens \(base context window 512\)"):
        rt.generate(_msgs("Hi"), max_tokens=2, tools=[tool])
    call = {"id": "c1", "name": "f", "arguments": {"text": "x" * 2_000_000}}
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "ok", "tool_call_id": "c1"}]
    with pytest.raises(PromptTooLongError, match=r"at least [0-9]+ base tokens \(base context window 512\)"):
        rt.generate(history, max_tokens=2)
    assert encoded == []
    many = [{"role": ("user", "assistant")[i % 2], "content": ""} for i in range(600)] + [{"role": "user", "content": "Hi"}]
    with pytest.raises(PromptTooLongError, match=r"^the prompt is at least 600 base tokens \(base context window 512\): it has 601 messages"):
        rt.generate(many, max_tokens=2)
    assert len(rendered) == 3 and encoded == []  # the three before, rendered and refused; the many messages not rendered
    with pytest.raises(PromptTooLongError, match=r"^the prompt is [0-9]+ draft tokens \(draft context window 512\)"):
        rt.generate(_msgs("word " * 700), max_tokens=2)
    assert len(encoded) == 2 and min(encoded) >= 3500
    assert rt.generate(_msgs("word " * 20), max_tokens=2).usage.reply_tokens <= 2


def test_an_error_s_whole_chain_is_detached_from_the_worker_s_frames():
    """Its cause and its context both (an error raised from one while another was handled)."""
    from wsd_llms.errors import detached

    try:
        raise ValueError("cause")
    except ValueError as exc:
        cause = exc
    try:
        try:
            raise KeyError("handled")
        except KeyError:
            raise RuntimeError("failed") from cause
    except RuntimeError as exc:
        error = detached(exc)
    chain = [error, error.__cause__, error.__context__]
    assert [type(e).__name__ for e in chain] == ["RuntimeError", "ValueError", "KeyError"]
    assert all(e.__traceback__ is None and "raised in the wsd-llms worker" in e.__notes__[0] for e in chain)


def test_a_batched_pass_that_fails_after_writing_its_states_is_retried_cleanly(fresh, monkeypatch, caplog):
    """A batched pass that fails after its layers wrote every row's states (in the output projection,
    as running out of memory there would) is retried row by row from where each row was: no request
    fails, and every reply is what it is alone (before, the retry fed each row its tokens twice)."""
    rt = fresh()
    jobs = list(zip(QUESTIONS, SETTINGS))
    expected = [rt.generate(_msgs(q), **s).text for q, s in jobs]
    real, fired = ModelRunner._outputs, []

    def outputs(self, rows, keeps, lazy):
        if len(rows) > 1 and len(fired) < 3:
            fired.append(len(rows))
            raise MemoryError("injected: out of memory in the output projection")
        return real(self, rows, keeps, lazy)

    monkeypatch.setattr(ModelRunner, "_outputs", outputs)
    with caplog.at_level(logging.WARNING, logger="wsd_llms"), warnings.catch_warnings():
        warnings.simplefilter("error")  # the notice is logged from the worker: a warnings filter cannot end it
        results = _concurrently(rt, jobs)
    said = [r.getMessage() for r in caplog.records if r.name == "wsd_llms.engine"]
    assert len(fired) == 3
    assert [r.text for r in results] == expected
    assert rt.stats().failed == 0
    assert rt.stats().retried_passes == 3 == len(said)
    assert all(re.fullmatch(r"a batched \w+ pass of \d+ sequences raised MemoryError: injected.*each ran alone without error", m) for m in said)


class _Unprintable(Exception):
    def __str__(self):
        raise ValueError("no message")


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (RecursionError("injected while finishing"), r"failed: RecursionError: injected while finishing$"),
        (_Unprintable(), r"failed: _Unprintable: <its message failed: ValueError>$"),
        (MemoryError(), r"failed: MemoryError$"),
        (_Panic("injected while finishing"), r"failed: _Panic: injected while finishing$"),
    ],
    ids=["error", "unprintable", "no-message", "base-exception"],
)
def test_an_error_while_a_request_finishes_fails_that_request_alone(fresh, monkeypatch, error, said):
    """An exception while a request's result is built, after its program ended (here injected into
    reading the reply's structured fields), fails that request with the error; before, it escaped
    the step, killed the worker and failed every other request with it. The message names the
    error's type, with its text where it has one: an error whose text cannot be made (a broken
    __str__) used to fail the message's building too, killing the worker, and one with no text
    left a dangling ': '."""
    from wsd_llms import engine

    rt = fresh()
    jobs = list(zip(QUESTIONS, SETTINGS))
    expected = [rt.generate(_msgs(q), **s).text for q, s in jobs]
    worker, real = rt.worker, engine.structured_fields

    def fields(text, params, cut=False):
        if "zqzq" in params.stop:
            raise error
        return real(text, params, cut)

    monkeypatch.setattr(engine, "structured_fields", fields)

    def failing_request():
        with pytest.raises(RequestFailedError, match=said):
            rt.generate(_msgs(QUESTIONS[2]), max_tokens=30, stop=["zqzq"])

    assert _texts_beside(rt, jobs, failing_request) == expected
    assert rt.worker is worker and worker.is_alive()
    assert (rt.stats().failed, rt.stats().running, rt.stats().cached_tokens) == (1, 0, 0)


def test_a_tokenizer_panic_encoding_a_prompt_fails_that_request_alone(fresh, monkeypatch):
    """A tokenizer that panics while a request's prompt is encoded (pyo3's PanicException: a
    BaseException) fails that request, and the worker serves the others as before. Only an
    Exception used to fail a request alone: a panic ended the worker and failed every request."""
    from wsd_llms import prompts

    rt = fresh()
    jobs = list(zip(QUESTIONS, SETTINGS))
    expected = [rt.generate(_msgs(q), **s).text for q, s in jobs]
    worker, real = rt.worker, prompts.encode

    def encode(tokenizer, text, *args, **kwargs):
        if "zqzq" in text:
            raise _Panic("injected panic")
        return real(tokenizer, text, *args, **kwargs)

    monkeypatch.setattr(prompts, "encode", encode)

    def failing_request():
        with pytest.raises(RequestFailedError, match=r"could not start the request: _Panic: injected panic$"):
            rt.generate(_msgs("zqzq " + QUESTIONS[2]), max_tokens=30)

    assert _texts_beside(rt, jobs, failing_request) == expected
    assert rt.worker is worker and worker.is_alive()
    assert (rt.stats().failed, rt.stats().running, rt.stats().cached_tokens) == (1, 0, 0)


def test_a_failure_keeping_a_prompt_piece_fails_that_request_alone(fresh, monkeypatch):
    """Keeping a prefilled piece for later requests (the prefix cache copies its states) happens
    after the pass, outside its retry; running out of memory there fails that request with the
    error, and the worker and the other requests go on."""
    from wsd_llms.prefix_cache import PrefixCache

    rt = fresh(prefill_chunk=24)
    jobs = list(zip(QUESTIONS, SETTINGS))
    expected = [rt.generate(_msgs(q), **s).text for q, s in jobs]
    worker, store, engine = rt.worker, PrefixCache.store, rt.engine
    tokenizers = {id(engine.prefixes[m]): (engine.draft if m == "draft" else engine.base).tokenizer for m in ("draft", "base")}

    def failing_store(self, kv, start, chunk, marks=()):
        if "Which item is 5?" in tokenizers[id(self)].decode(kv.ids):  # the long prompt below
            raise MemoryError("injected while keeping a piece")
        return store(self, kv, start, chunk, marks)

    monkeypatch.setattr(PrefixCache, "store", failing_store)

    def failing_request():
        with pytest.raises(RequestFailedError, match="MemoryError: injected while keeping a piece"):
            rt.generate(_msgs(LONG), max_tokens=10)

    assert _texts_beside(rt, jobs, failing_request) == expected
    assert rt.worker is worker and worker.is_alive() and rt.stats().failed == 1


def test_a_failure_joining_a_prompts_piece_rows_fails_that_request_alone(fresh, monkeypatch):
    """A scoring pass cut into pieces joins the rows each piece gave after the pass, outside its
    retry; running out of memory there fails that request with the error, and the worker and the
    other requests go on."""
    from wsd_llms.engine import Engine
    from wsd_llms.output_head import HeadRows

    rt = fresh()  # the long prompt is cut at its end, where the scoring pass keeps the last row
    jobs = list(zip(QUESTIONS, SETTINGS))
    expected = [rt.generate(_msgs(q), **s).text for q, s in jobs]
    worker, then, joined = rt.worker, HeadRows.then, []

    def failing_then(self, other):
        caller = sys._getframe(1)
        if caller.f_code is Engine._advance.__code__:  # the engine's join, not a program's own
            joined.append(caller.f_locals["seq"])
            if "Which item is 5?" in caller.f_locals["seq"].prompts.base_text:  # the long prompt below
                raise MemoryError("injected while joining piece rows")
        return then(self, other)

    monkeypatch.setattr(HeadRows, "then", failing_then)

    def failing_request():
        with pytest.raises(RequestFailedError, match="MemoryError: injected while joining piece rows"):
            rt.generate(_msgs(LONG), max_tokens=10, switch_threshold=1.0)

    assert _texts_beside(rt, jobs, failing_request) == expected
    assert joined and rt.worker is worker and worker.is_alive() and rt.stats().failed == 1


def test_a_failing_cleanup_as_a_request_ends_fails_that_request_alone(fresh, monkeypatch):
    """Ending a request closes its program, which runs the program's cleanup; an error there (one
    request's `finally`, here injected) reaches that request's caller, and the worker and the
    other requests go on."""
    from wsd_llms import engine

    online = engine.PROGRAMS["online"]

    def with_cleanup(seq, draft, base):
        try:
            return (yield from online(seq, draft, base))
        finally:
            if "zqzq" in seq.params.stop:
                raise RuntimeError("injected in cleanup")

    monkeypatch.setitem(engine.PROGRAMS, "online", with_cleanup)
    rt = fresh()
    jobs = list(zip(QUESTIONS, SETTINGS))
    expected = [rt.generate(_msgs(q), **s).text for q, s in jobs]
    worker = rt.worker

    def cancelled_request():
        stream = rt.stream(_msgs(QUESTIONS[2]), max_tokens=200, switch_threshold=1.0, stop=["zqzq"])
        next(stream)
        stream.close()  # cancelled at the next step, where its cleanup raises

    assert _texts_beside(rt, jobs, cancelled_request) == expected
    _wait_for(lambda: rt.stats().cancelled == 1)
    assert rt.worker is worker and worker.is_alive()
    assert rt.generate(_msgs(QUESTIONS[0]), max_tokens=5).usage.reply_tokens <= 5


class WorkerKilled(SystemExit):
    """What ends the worker wherever it is raised: a SystemExit (errors.EXITS), where any other
    exception raised while a request is served fails that request alone."""


def test_dead_worker_fails_waiting_callers_fast_and_restarts(fresh, monkeypatch):
    rt = fresh()
    rt.generate(_msgs(QUESTIONS[0]), max_tokens=3)
    engine = rt.engine
    real_step = engine.step
    started = threading.Event()

    def dying_step():
        started.set()
        raise WorkerKilled("killed by the test")

    monkeypatch.setattr(engine, "step", dying_step)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the death is expected
    t0 = time.monotonic()
    with pytest.raises(RuntimeClosedError, match="worker died: WorkerKilled"):
        rt.generate(_msgs(QUESTIONS[1]), max_tokens=50)
    assert time.monotonic() - t0 < 5
    monkeypatch.setattr(engine, "step", real_step)
    assert rt.generate(_msgs(QUESTIONS[0]), max_tokens=3).usage.reply_tokens <= 3  # a fresh worker serves


def test_a_request_sent_as_the_dead_worker_ends_starts_a_fresh_one(fresh, monkeypatch):
    """A request submitted after the worker died, while its thread still ends (its traceback is
    printed), starts a fresh worker and is served, instead of waiting on an inbox nobody reads."""
    rt = fresh()
    rt.generate(_msgs(QUESTIONS[0]), max_tokens=3)
    engine, real_step = rt.engine, rt.engine.step
    ending, release = threading.Event(), threading.Event()

    def dying_step():
        monkeypatch.setattr(engine, "step", real_step)
        raise WorkerKilled("killed by the test")

    def slow_excepthook(args):  # the dead worker's thread, still alive while it reports its death
        ending.set()
        release.wait(10)

    monkeypatch.setattr(engine, "step", dying_step)
    monkeypatch.setattr(threading, "excepthook", slow_excepthook)
    dead = rt.worker
    with pytest.raises(RuntimeClosedError, match="worker died: WorkerKilled"):
        rt.generate(_msgs(QUESTIONS[1]), max_tokens=50)
    try:
        assert ending.wait(10) and dead.is_alive()
        assert rt.generate(_msgs(QUESTIONS[0]), max_tokens=3).usage.reply_tokens <= 3
        assert rt.worker is not dead and rt.stats().cancelled == 0
    finally:
        release.set()
        dead.join(10)  # it ends as its report returns; the leak check must not race it


def test_a_timeout_counts_as_failed_whoever_notices_it_first(fresh, monkeypatch):
    """A timeout is a failure in stats() whether the worker ends the request at it or, in a step
    longer than the caller's poll, the caller gives up first (which also cancels the request)."""
    rt = fresh()
    rt.generate(_msgs(QUESTIONS[0]), max_tokens=3)
    engine, real_step = rt.engine, rt.engine.step

    def slow_step():
        monkeypatch.setattr(engine, "step", real_step)
        time.sleep(1.5)
        real_step()

    for slow in (False, True):
        if slow:
            monkeypatch.setattr(engine, "step", slow_step)
        with pytest.raises(RequestTimeoutError):
            rt.generate(_msgs(QUESTIONS[1]), max_tokens=300, switch_threshold=1.0, timeout=0.3)
        _wait_for(lambda: rt.stats().running == 0 and rt.stats().queued == 0)
        assert (rt.stats().failed, rt.stats().cancelled) == (1 + slow, 0)


def test_a_request_past_its_timeout_when_the_worker_takes_it_fails_without_starting(fresh, monkeypatch):
    """Sent during a step longer than its timeout, with its caller not yet polling: the worker fails it
    as it takes it in, without building its prompts, and it counts as failed."""
    rt = fresh()
    rt.generate(_msgs(QUESTIONS[0]), max_tokens=3)
    engine, real_step, real_prepare, prepared = rt.engine, rt.engine.step, rt.engine.prepare, []

    stepping = threading.Event()

    def slow_step():
        stepping.set()
        time.sleep(1.5)
        real_step()

    def prepare(messages, params, deliver):
        prepared.append(params.timeout)
        return real_prepare(messages, params, deliver)

    monkeypatch.setattr(submission, "TIMEOUT_GRACE", 5.0)  # the caller would notice its timeout late
    monkeypatch.setattr(engine, "prepare", prepare)
    with closing(rt.stream(_msgs(QUESTIONS[1]), max_tokens=400, max_draft_tokens=400, mode="draft")) as long:
        next(long)
        monkeypatch.setattr(engine, "step", slow_step)
        assert stepping.wait(10)  # the worker is in a step: the next request waits in the inbox
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError, match=r"exceeded timeout=0.3s before it started"):
            rt.generate(_msgs(QUESTIONS[2]), max_tokens=5, timeout=0.3)
        assert time.monotonic() - t0 < 4
    _wait_for(lambda: rt.stats().running == 0)
    assert prepared == [None]  # the long request's only
    assert (rt.stats().finished, rt.stats().failed, rt.stats().cancelled) == (1, 1, 1)


def test_a_request_that_ends_as_its_caller_times_out_counts_as_failed(fresh, monkeypatch):
    """The caller gives up at its timeout during a step that finishes the request: the caller got
    RequestTimeoutError, so stats() counts a failure, not a finished request."""
    rt = fresh()
    rt.generate(_msgs(QUESTIONS[0]), max_tokens=1, mode="base")
    real_extend = ModelRunner.extend

    def slow_extend(self, *args, **kwargs):  # one long pass: the caller's poll comes first
        time.sleep(1.5)
        return real_extend(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "extend", slow_extend)
    with pytest.raises(RequestTimeoutError):
        rt.generate(_msgs(QUESTIONS[1]), max_tokens=1, mode="base", timeout=0.3)
    _wait_for(lambda: rt.stats().running == 0 and rt.stats().queued == 0)
    stats = rt.stats()
    assert (stats.finished, stats.failed, stats.cancelled) == (1, 1, 0)


def test_admission_queues_beyond_the_limit_and_all_finish(fresh):
    rt = fresh(max_running=2)
    jobs = [(QUESTIONS[i], {"max_tokens": 20}) for i in range(4)]
    expected = [rt.generate(_msgs(q), **s).text for q, s in jobs]
    results = _concurrently(rt, jobs)
    assert [r.text for r in results] == expected
    peaks = rt.stats().peaks
    assert peaks["running"] <= 2 and peaks["queued"] >= 1


def test_a_burst_of_requests_is_taken_in_a_few_per_step_while_others_run(fresh, monkeypatch):
    """Taking a request in (its prompts built, the prefix cache searched) costs 2-26 ms: a burst of
    hundreds taken in before one step had held running streams for seconds. While requests run, a
    step takes in ACCEPT_PER_STEP, and all finish with the replies they give alone."""
    rt = fresh(max_running=4)
    engine = rt.load()
    log: list[str] = []
    prepare, step = engine.prepare, engine.step
    monkeypatch.setattr(engine, "prepare", lambda *args: log.append("take") or prepare(*args))
    monkeypatch.setattr(engine, "step", lambda: log.append("step") or step())
    burst = 3 * runtime_module.ACCEPT_PER_STEP + 5
    with closing(rt.stream(_msgs(QUESTIONS[0]), max_tokens=200, switch_threshold=1.0)) as running:
        next(running)  # in flight
        expected = rt.generate(_msgs(QUESTIONS[1]), max_tokens=3).text
        log.clear()
        results = _concurrently(rt, [(QUESTIONS[1], {"max_tokens": 3})] * burst)
    runs = [len(run) for run in "".join("t" if entry == "take" else " " for entry in log).split()]
    assert sum(runs) == burst and max(runs) <= runtime_module.ACCEPT_PER_STEP
    assert [r.text for r in results] == [expected] * burst


def test_closing_refuses_a_queued_burst_at_once(fresh, monkeypatch):
    """The per-step cap on taking requests in does not hold a close back: what was sent before it is
    refused without another step."""
    rt = fresh(max_running=1)
    engine = rt.load()
    stepped_closed: list[bool] = []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: stepped_closed.append(rt._closed) or time.sleep(0.05) or step())  # slow: the burst stays in the inbox
    with closing(rt.stream(_msgs(QUESTIONS[0]), max_tokens=400, switch_threshold=1.0)) as running:
        next(running)
        with ThreadPoolExecutor(50) as pool:
            futures = [pool.submit(rt.generate, _msgs(QUESTIONS[1]), max_tokens=3) for _ in range(50)]
            while rt.stats().queued < 40:
                time.sleep(0.01)
            rt.close()
            errors = [f.exception(timeout=10) for f in futures]
    assert all(isinstance(e, RuntimeClosedError) for e in errors if e is not None) and not any(stepped_closed)


LONG = "Read this and answer. " + " ".join(f"item {i} is {i * 7 % 13}" for i in range(40)) + " Which item is 5?"


def test_a_long_prompt_is_fed_in_pieces_while_other_streams_decode(fresh, monkeypatch):
    rt = fresh(prefill_chunk=32)
    engine = rt.engine  # stepped by hand here: no worker runs
    widths = []
    extend, extend_batch = ModelRunner.extend, ModelRunner.extend_batch
    monkeypatch.setattr(ModelRunner, "extend", lambda self, kv, ids, keep=0, *args: widths.append(len(ids) - keep) or extend(self, kv, ids, keep, *args))
    monkeypatch.setattr(
        ModelRunner,
        "extend_batch",
        lambda self, kvs, ids, keeps, *args: widths.extend(len(r) - k for r, k in zip(ids, keeps)) or extend_batch(self, kvs, ids, keeps, *args),
    )
    short = engine.prepare(normalize_messages(_msgs(QUESTIONS[0])), parse_params(max_tokens=60, switch_threshold=1.0), lambda e: None)
    engine.add(short)
    while short.draft_tokens == 0:
        engine.step()
    long = engine.prepare(normalize_messages(_msgs(LONG)), parse_params(max_tokens=4), lambda e: None)
    engine.add(long)
    steps, drafted = 0, short.draft_tokens
    while long.draft_tokens == 0:
        engine.step()
        steps += 1
    assert steps >= len(long.prompts.draft_ids) // 32 >= 8  # the prompt went in over many steps...
    assert short.draft_tokens - drafted >= steps - 1  # ...and the short stream drafted a token in each
    assert max(widths) <= 32  # no pass fed more than a piece beyond the rows it scored
    while engine.has_work():
        engine.step()
    assert engine.stats().finished == 2


def test_a_short_prompt_does_not_wait_for_a_long_prompt_s_prefill(fresh):
    """A prompt that one step feeds whole goes before the pieces of a long prompt being fed: it
    starts at the next step rather than after the whole long prompt, and the long prompt still
    gets a piece in every step."""
    rt = fresh(prefill_chunk=32)
    engine = rt.engine  # stepped by hand here: no worker runs
    long = engine.prepare(normalize_messages(_msgs(LONG)), parse_params(max_tokens=4), lambda e: None)
    engine.add(long)
    engine.step()
    short = engine.prepare(normalize_messages(_msgs(QUESTIONS[0])), parse_params(max_tokens=4), lambda e: None)
    engine.add(short)
    fed = [len(long.pending.kv)]
    while short.draft_tokens == 0:
        engine.step()
        fed.append(len(long.pending.kv))
    assert len(fed) == 2 and long.draft_tokens == 0  # one step, while the long prompt is still being fed
    assert fed[1] > fed[0] > 0 and len(long.prompts.draft_ids) > 4 * 32
    while engine.has_work():
        engine.step()
    assert engine.stats().finished == 2


def test_a_chunked_prompt_gets_the_same_reply_alone_and_under_load(fresh):
    rt = fresh(prefill_chunk=24)
    alone = rt.generate(_msgs(LONG), max_tokens=30, switch_threshold=0.5, switch_window=2)
    jobs = [(LONG, {"max_tokens": 30, "switch_threshold": 0.5, "switch_window": 2})] + list(zip(QUESTIONS[:5], SETTINGS[:5]))
    together = _concurrently(rt, jobs)
    assert (together[0].text, together[0].switch_point) == (alone.text, alone.switch_point)
    assert alone.usage.draft_prompt_tokens > 4 * 24 and alone.usage.base_prompt_tokens > 4 * 24


def test_a_prompt_that_starts_like_an_earlier_one_feeds_only_the_rest(fresh):
    """Prefix caching: whole prefill pieces are kept, and the next turn of a conversation (whose
    prompt starts with the last one's) restores them instead of feeding them again, in both models,
    and gets the reply a runtime that keeps nothing gives."""
    settings = {"max_tokens": 30, "switch_threshold": 0.5, "switch_window": 2}
    first = _msgs(LONG)
    turn = [*first, {"role": "assistant", "content": "Item 3."}, {"role": "user", "content": "And which item is 6?"}]
    cold = fresh(prefill_chunk=24, prefix_cache_tokens=0)
    expected = cold.generate(turn, **settings)
    rt = fresh(prefill_chunk=24)
    earlier = rt.generate(first, **settings).usage
    before = rt.stats()
    got = rt.generate(turn, **settings)
    after = rt.stats()
    cached = {"draft_cached_prompt_tokens": 0, "base_cached_prompt_tokens": 0}
    assert (got.text, got.switch_point, replace(got.usage, **cached)) == (expected.text, expected.switch_point, expected.usage)
    assert after.prefix_cache["hits"] - before.prefix_cache["hits"] == 2  # the draft's prompt and the base's
    reused = after.prefix_cache["reused_tokens"] - before.prefix_cache["reused_tokens"]
    assert got.usage.draft_cached_prompt_tokens + got.usage.base_cached_prompt_tokens == reused  # each request says its own
    assert earlier.draft_cached_prompt_tokens == earlier.base_cached_prompt_tokens == expected.usage.base_cached_prompt_tokens == 0
    assert reused >= earlier.draft_prompt_tokens + earlier.base_prompt_tokens - 4 * 24  # the first prompts, in whole pieces
    fed = sum(after.tokens[k] - before.tokens[k] for k in ("draft", "score"))
    assert sum(cold.stats().tokens[k] for k in ("draft", "score")) - fed == reused
    assert 0 < after.prefix_cache["cached_tokens"] <= 2 * 4096


def test_a_shorter_prompt_is_cut_where_its_messages_start_and_it_ends_for_the_next_turn(fresh):
    """A conversation shorter than a prefill piece: its prompt is also cut where its last message
    starts and where it ends (in the base model's scoring pass too, which feeds the prompt with
    the first draft ids), so the next turn restores the whole of it in both models (and is cut
    alike for the turn after), and gets the reply a runtime that keeps nothing gives."""
    settings = {"max_tokens": 20, "switch_threshold": 0.5, "switch_window": 2}
    first = [
        {"role": "system", "content": "Read this and answer. " + " ".join(f"item {i} is {i * 7 % 13}" for i in range(8))},
        {"role": "user", "content": "Which item is 5? Think about the list before you answer it."},
    ]
    turn = [*first, {"role": "assistant", "content": "Item 5 is 9."}, {"role": "user", "content": "And item 6?"}]
    cold = fresh(prefix_cache_tokens=0)
    expected = [cold.generate(messages, **settings) for messages in (first, turn)]
    rt = fresh()
    earlier = rt.generate(first, **settings)
    before = rt.stats()
    got = rt.generate(turn, **settings)
    after = rt.stats()
    assert [(r.text, r.switch_point) for r in (earlier, got)] == [(r.text, r.switch_point) for r in expected]
    assert earlier.usage.draft_prompt_tokens < 256 and earlier.usage.base_prompt_tokens < 256  # within one piece of prefill_chunk
    reused = after.prefix_cache["reused_tokens"] - before.prefix_cache["reused_tokens"]
    marks = build_prompts(rt.engine.draft.tokenizer, rt.engine.base.tokenizer, normalize_messages(first)).marks
    whole = earlier.usage.draft_prompt_tokens + earlier.usage.base_prompt_tokens
    assert marks["draft"][-1] - marks["draft"][-2] >= 32 and marks["base"][-1] - marks["base"][-2] >= 32  # the question: a piece of its own
    assert reused == whole == got.usage.draft_cached_prompt_tokens + got.usage.base_cached_prompt_tokens  # the whole first prompt
    last = rt.generate([*turn, {"role": "assistant", "content": got.text}, {"role": "user", "content": "Thanks."}], **settings)
    assert rt.stats().prefix_cache["reused_tokens"] - after.prefix_cache["reused_tokens"] > reused  # and the first exchange
    assert last.text == cold.generate([*turn, {"role": "assistant", "content": got.text}, {"role": "user", "content": "Thanks."}], **settings).text

def test_parallel_branches_with_one_history_feed_it_once(fresh):
    """Requests that share a long start and run together (an agent's parallel branches): each piece
    one of them feeds is stored, and the others take it instead of feeding it; the replies are
    the ones a runtime that keeps nothing gives."""
    history = [*_msgs(LONG), {"role": "assistant", "content": "Item 3."}]
    branches = [[*history, {"role": "user", "content": q}] for q in QUESTIONS[:3]]
    settings = {"max_tokens": 20, "switch_threshold": 0.5, "switch_window": 2}
    cold = fresh(prefill_chunk=24, prefix_cache_tokens=0)
    expected = [cold.generate(branch, **settings) for branch in branches]
    rt = fresh(prefill_chunk=24)
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda branch: rt.generate(branch, **settings), branches))
    assert [(r.text, r.switch_point) for r in got] == [(r.text, r.switch_point) for r in expected]
    shared = expected[0].usage.draft_prompt_tokens + expected[0].usage.base_prompt_tokens
    assert rt.stats().prefix_cache["reused_tokens"] >= 2 * (shared - 4 * 24)  # two of the three fed none of it


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "512"])
def test_limits_are_checked(fresh, value):
    rt = fresh()
    for name in ("max_running", "max_cached_tokens", "prefill_chunk"):
        with pytest.raises(InvalidParameterError, match=f"invalid {name}=.*must be an integer >= 1"):
            rt.configure(**{name: value})
    if value != 0:  # keeping no prompt prefixes is allowed
        with pytest.raises(InvalidParameterError, match="invalid prefix_cache_tokens=.*must be an integer >= 0"):
            rt.configure(prefix_cache_tokens=value)
    for name in ("max_running", "max_cached_tokens", "prefill_chunk"):  # and as the runtime is made, before any request hangs on one
        with pytest.raises(InvalidParameterError, match=f"invalid {name}=.*must be an integer >= 1"):
            fresh(**{name: value})
    rt.configure(prefill_chunk=64, prefix_cache_tokens=0)
    assert rt.engine.prefill_chunk == 64
    assert all(p.max_tokens == 0 for p in rt.engine.prefixes.values())


def test_cache_token_limit_queues_and_rejects_what_never_fits(fresh):
    rt = fresh(max_cached_tokens=700)
    jobs = [(QUESTIONS[i], {"max_tokens": 20, "max_draft_tokens": 200}) for i in range(4)]
    results = _concurrently(rt, jobs)
    assert all(r.text for r in results)
    assert rt.stats().peaks["running"] < 4
    # The error gives each term with its value, so that the sum shows which budget to lower, and how far.
    online = r"\(draft prompt (\d+) \+ max_draft_tokens=300 \+ base prompt (\d+) \+ max_tokens=400 \+ 1\), more than the runtime's max_cached_tokens=700; lower max_draft_tokens or max_tokens \(to fit, max_draft_tokens \+ max_tokens <= (\d+)\), or raise max_cached_tokens"
    with pytest.raises(RequestTooLargeError, match=online) as error:
        rt.generate(_msgs(QUESTIONS[0]), max_tokens=400, max_draft_tokens=300)
    draft, base, room = map(int, re.search(online, str(error.value)).groups())
    need = int(re.search(r"may need (\d+) ", str(error.value)).group(1))
    assert need == draft + 300 + base + 400 + 1 and room == 700 - draft - base - 1
    assert rt.generate(_msgs(QUESTIONS[0]), max_tokens=room - 300, max_draft_tokens=300).text  # as much as fits runs
    rt.configure(max_cached_tokens=200)
    with pytest.raises(RequestTooLargeError, match=r"\(base prompt (\d+) \+ max_tokens=300 \+ 1\), .*; lower max_tokens \(to fit, max_tokens <= \d+\), or raise max_cached_tokens"):
        rt.generate(_msgs(QUESTIONS[0]), max_tokens=300, mode="base")
    with pytest.raises(RequestTooLargeError, match=r"\(draft prompt \d+ \+ max_tokens=300\), .*; lower max_tokens \(to fit, max_tokens <= \d+\), or raise max_cached_tokens"):
        rt.generate(_msgs(QUESTIONS[0]), max_tokens=300, mode="draft")  # the draft model alone writes max_tokens
    # staged WSD holds one cache at a time: the error names each one over the limit, and what lowers it
    with pytest.raises(RequestTooLargeError, match=r"\(base prompt \d+ \+ max_tokens=300 \+ 1\), .*; lower max_tokens \(to fit, max_tokens <= \d+\), or raise"):
        rt.generate(_msgs(QUESTIONS[0]), max_tokens=300, max_draft_tokens=10, mode="staged")
    with pytest.raises(RequestTooLargeError, match=r"\(draft prompt \d+ \+ max_draft_tokens=300\), .*; lower max_draft_tokens \(to fit, max_draft_tokens <= \d+\), or raise"):
        rt.generate(_msgs(QUESTIONS[0]), max_tokens=20, max_draft_tokens=300, mode="staged")
    both = (
        r"\(the larger of: draft prompt (\d+) \+ max_draft_tokens=300, or base prompt (\d+) \+ max_tokens=300 \+ 1\), .*; "
        r"lower max_draft_tokens and max_tokens \(to fit, max_draft_tokens <= (\d+) and max_tokens <= (\d+)\), or raise"
    )
    with pytest.raises(RequestTooLargeError, match=both) as error:
        rt.generate(_msgs(QUESTIONS[0]), max_tokens=300, max_draft_tokens=300, mode="staged")
    draft, base, draft_room, base_room = map(int, re.search(both, str(error.value)).groups())
    assert (draft_room, base_room) == (200 - draft, 200 - base - 1)
    # Where the prompts alone leave no room for a token of each budget, no budget can help.
    for mode in ("online", "staged", "base", "draft"):
        with pytest.raises(RequestTooLargeError, match=r"; its prompts leave no room for a reply: shorten the messages, or raise max_cached_tokens"):
            rt.generate(_msgs("word " * 120), max_tokens=1, max_draft_tokens=1, mode=mode)


def test_lowering_the_cache_limit_fails_queued_requests_it_can_no_longer_admit(fresh):
    """A request queued under a larger max_cached_tokens that the lowered limit could never admit
    fails at the change, as it would have at the call; one that still fits waits and runs, and the
    running request goes on."""
    rt = fresh(max_running=1)
    running = rt.stream(_msgs(QUESTIONS[1]), max_tokens=300, max_draft_tokens=300, mode="draft")  # greedy, all 300 tokens: it holds the queue
    next(running)
    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(rt.generate, _msgs(QUESTIONS[1]), max_tokens=300, max_draft_tokens=300)
        small = pool.submit(rt.generate, _msgs(QUESTIONS[2]), max_tokens=5, max_draft_tokens=5)
        _wait_for(lambda: rt.stats().queued == 2)
        rt.configure(max_cached_tokens=200)
        with pytest.raises(RequestTooLargeError, match=r"may need \d+ cached tokens .*max_cached_tokens=200"):
            big.result(timeout=10)
        assert rt.stats().queued == 1 and rt.stats().failed == 1
        text = "".join(e.text for e in running if isinstance(e, TextDelta))  # the running request goes on to its end
        assert small.result(timeout=30).usage.reply_tokens <= 5
    assert text and rt.stats().finished == 2


def test_a_budget_the_window_capped_is_named_with_what_was_asked(fresh):
    """The error's terms are the budgets the request runs with; one the context window capped says
    what the caller asked for."""
    rt = fresh(max_cached_tokens=300)
    with pytest.raises(RequestTooLargeError, match=r"base prompt \d+ \+ max_tokens=\d+ \(1000000 capped at the context window\) \+ 1\)"):
        rt.generate(_msgs(QUESTIONS[0]), max_tokens=10**6, mode="base")


def test_a_request_two_threads_end_at_once_is_ended_and_counted_once(fresh, monkeypatch):
    """A queued request that a configure() fails while a closing runtime's worker fails it too is
    counted once and its caller told once."""
    rt = fresh(max_running=1)
    step = rt.engine.step
    monkeypatch.setattr(rt.engine, "step", lambda: (time.sleep(0.01), step()))  # 300 steps outlast the test's waits on a busy machine
    running = rt.stream(_msgs(QUESTIONS[1]), max_tokens=300, max_draft_tokens=300, mode="draft")  # greedy, all 300 tokens: it holds the queue (QUESTIONS[0] ends in 7)
    next(running)
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(rt.generate, _msgs(QUESTIONS[1]), max_tokens=5)
        _wait_for(lambda: len(rt.engine.scheduler.waiting) == 1)  # taken from the inbox into the engine's queue
        with rt._step_lock:  # between steps, as configure() runs; a closing runtime's worker does not wait for it
            seq = rt.engine.scheduler.waiting[0]
            told = []
            deliver = seq.deliver
            seq.deliver = lambda item: (told.append(item), deliver(item))
            rt.engine._fail(seq, RequestFailedError("first"))
            rt.engine._fail(seq, RequestFailedError("second"))
        with pytest.raises(RequestFailedError, match="first"):
            queued.result(timeout=10)
        assert [str(e) for e in told] == ["first"] and rt.stats().failed == 1
        running.close()
    _wait_for(lambda: rt.stats().running == 0 and rt.stats().queued == 0)


def test_a_stream_checks_its_parameters_at_the_call_and_its_timeout_counts_from_it(fresh):
    """Bad parameters raise where stream()/astream() is called, not at the first event; the
    request is sent at the first event, and its timeout counts from the call."""
    rt = fresh()
    with pytest.raises(InvalidParameterError, match="temperature"):
        rt.stream(_msgs(QUESTIONS[0]), temperature=-1)
    with pytest.raises(InvalidParameterError, match="temperature"):
        rt.astream(_msgs(QUESTIONS[0]), temperature=-1)
    assert rt.stats().failed == 0 and rt.stats().queued == 0  # nothing was sent
    late = rt.stream(_msgs(QUESTIONS[0]), max_tokens=5, timeout=0.3)
    time.sleep(0.5)
    with pytest.raises(RequestTimeoutError, match="timeout=0.3s"):
        next(late)

    async def astream_late() -> None:
        events = rt.astream(_msgs(QUESTIONS[0]), max_tokens=5, timeout=0.3)
        await asyncio.sleep(0.5)
        with pytest.raises(RequestTimeoutError, match="timeout=0.3s"):
            await anext(events)

    asyncio.run(astream_late())


def test_a_closed_runtimes_successor_keeps_its_limits():
    """get_runtime after close() makes a new runtime for the models: with the limits the closed one
    was given (it had the defaults again), and the same automatic choices where none was given."""
    from wsd_llms import get_runtime

    closed = get_runtime("no/such-draft", "no/such-base", "cpu", "float32")  # nothing loads until a request
    closed.configure(max_running=3, prefill_chunk=64)
    closed.close()
    with pytest.raises(RuntimeClosedError, match="this runtime is closed"):  # not taken and lost
        closed.configure(max_running=5)
    successor = get_runtime("no/such-draft", "no/such-base", "cpu", "float32")
    try:
        assert successor is not closed and not successor._closed
        assert successor.limits == closed.limits and successor.limits["max_running"] == 3
        assert successor.limits["prefix_cache_tokens"] is None  # still chosen for the models at load
    finally:
        successor.close()


def test_get_runtime_as_another_thread_closes_the_runtime_gives_its_successor(monkeypatch):
    """get_runtime(max_running=...) configures the registry's runtime after it leaves the registry's
    lock; closed by another thread in between, it raised RuntimeClosedError, where a get_runtime
    after close() gives the successor."""
    from wsd_llms import get_runtime

    first = get_runtime("no/such-draft", "no/such-base", "cpu", "float32")  # nothing loads until a request
    real = WSDRuntime.configure

    def closed_meanwhile(self, **limits):
        if self is first:
            first.close()
        return real(self, **limits)

    monkeypatch.setattr(WSDRuntime, "configure", closed_meanwhile)
    successor = get_runtime("no/such-draft", "no/such-base", "cpu", "float32", max_running=3)
    try:
        assert successor is not first and first._closed and not successor._closed
        assert successor.limits["max_running"] == 3
    finally:
        successor.close()


def test_get_runtime_knows_a_model_or_device_however_it_is_spelt(tmp_path, monkeypatch):
    """The same files and the same device are one runtime (one copy of the weights, one set of
    limits), whatever the spelling: a relative, ./ or absolute path, "cpu" or "cpu:0" (a service
    that loaded "cuda:0" at start-up, with adapters left on "auto", had held two copies)."""
    from wsd_llms import get_runtime

    (tmp_path / "md").mkdir()
    (tmp_path / "mb").mkdir()
    monkeypatch.chdir(tmp_path)
    runtime = get_runtime("md", "mb", "cpu", "float32")  # nothing loads until a request
    try:
        assert get_runtime("./md/", str(tmp_path / "mb"), "cpu:0", "float32") is runtime
        assert get_runtime("md", "no/such-base", "cpu", "float32") is not runtime  # a repo id stays itself
        (tmp_path / "g").mkdir()
        (tmp_path / "g" / "m.gguf").touch()
        assert get_runtime("g", "mb", "cpu", "float32") is get_runtime("g/m.gguf", "mb", "cpu", "float32")  # the directory names its one .gguf
    finally:
        runtime.close()
        get_runtime("md", "no/such-base", "cpu", "float32").close()
        get_runtime("g", "mb", "cpu", "float32").close()


def test_a_closed_runtime_from_get_runtime_is_freed_once_its_caller_drops_it():
    """close() takes it out of get_runtime's registry, which had kept it, and its models, for the life
    of the process (a service that switched models kept the old ones in memory)."""
    import weakref

    from wsd_llms import get_runtime

    closed = get_runtime("no/such-draft", "no/such-base", "cpu", "float32")
    closed.close()
    ref = weakref.ref(closed)
    del closed
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("path", ["stream", "generate", "astream", "agenerate"])
def test_kept_errors_hold_neither_a_closed_runtimes_engine_nor_their_requests(draft_tokenizer, monkeypatch, path):
    """A caller may keep a request's error (a retry wrapper's last one, a tracer). The frames its
    traceback left had held the runtime, so that close() freed none of its models, and a timed-out
    request's sequence. Here: one request timed out by its caller in a long step, one ended by close()."""
    rt = WSDRuntime.from_models(
        tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0), tiny_gemma3(make_tokenizer(420), 1, "tiny-gemma3"), lookup_tokens=0
    )
    errors: list[WSDError] = []
    sequences = sum(type(o) is Sequence for o in gc.get_objects())

    def call(**params: Any) -> None:
        messages = _msgs(QUESTIONS[1])
        params = {"max_tokens": 300, "switch_threshold": 1.0, **params}

        async def drained() -> None:
            async for _ in rt.astream(messages, **params):
                pass

        try:
            if path == "stream":
                list(rt.stream(messages, **params))
            elif path == "generate":
                rt.generate(messages, **params)
            else:
                asyncio.run(drained() if path == "astream" else rt.agenerate(messages, **params))
        except WSDError as error:
            errors.append(error)

    engine, step, window = rt.engine, rt.engine.step, rt.context_window()

    def slow_once_generating() -> None:  # a long step, once the request has written a token
        step()
        if any(seq.reply.ids for seq in engine.scheduler.running):
            time.sleep(0.6)

    monkeypatch.setattr(engine, "step", slow_once_generating)
    call(timeout=0.3)
    monkeypatch.setattr(engine, "step", lambda: (step(), time.sleep(0.05)))  # slow enough for close() to come mid-reply
    threading.Timer(0.3, rt.close).start()
    call()
    assert [type(error) for error in errors] == [RequestTimeoutError, RuntimeClosedError], errors
    assert "timeout=0.3s while generating" in str(errors[0])
    _wait_for(lambda: rt.engine is None)
    gone = weakref.ref(engine)
    assert rt.stats().failed == 2 and rt.stats().cached_tokens == 0 and rt.context_window() == window  # kept after the engine went
    assert not rt.loaded
    del engine, step
    monkeypatch.undo()
    gc.collect()
    assert gone() is None
    assert sum(type(o) is Sequence for o in gc.get_objects()) == sequences


def test_a_head_too_large_for_the_room_left_is_passed_a_bounded_number_of_times():
    """Short requests that fit run past a head whose reservation does not (they had all waited
    until a long request ended), at most max_running of them while it waits; then admission
    waits for it, and it runs once enough running requests end."""
    from types import SimpleNamespace

    from wsd_llms.scheduler import Scheduler

    def request(positions: int, name: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, params=SimpleNamespace(mode="base"), cache_limits=lambda: {"base": positions}, queued=False)

    scheduler = Scheduler(max_running=3, max_cached_tokens=100)
    big, head, *short = [request(60, "big"), request(60, "head"), *(request(10, f"s{i}") for i in range(1, 6))]
    for seq in (big, head, *short):
        scheduler.add(seq)  # type: ignore[arg-type]

    def running() -> list[str]:
        return [seq.name for seq in scheduler.schedule()]

    assert running() == ["big", "s1", "s2"]  # the head does not fit beside big; two pass it
    scheduler.remove(short[0])  # type: ignore[arg-type]
    assert running() == ["big", "s2", "s3"]  # a third (max_running) passes
    scheduler.remove(short[1])  # type: ignore[arg-type]
    assert running() == ["big", "s3"]  # no more: s4 fits, but waits for the head
    scheduler.remove(big)  # type: ignore[arg-type]
    assert running() == ["s3", "head", "s4"]  # the head first, then in order
    assert [seq.name for seq in scheduler.waiting] == ["s5"] and scheduler.reserved == 80


def test_a_request_behind_a_head_too_large_is_passed_a_bounded_number_of_times_too():
    """A second large request, waiting behind a large head, is passed by the short ones that pass the
    head; once the head runs, the count goes on, rather than starting again at max_running."""
    from types import SimpleNamespace

    from wsd_llms.scheduler import Scheduler

    def request(positions: int, name: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, params=SimpleNamespace(mode="base"), cache_limits=lambda: {"base": positions}, queued=False)

    scheduler = Scheduler(max_running=3, max_cached_tokens=100)
    big, head, second, *short = [request(60, "big"), request(60, "head"), request(60, "second"), *(request(10, f"s{i}") for i in range(1, 7))]
    for seq in (big, head, second, *short):
        scheduler.add(seq)  # type: ignore[arg-type]

    def running() -> list[str]:
        return [seq.name for seq in scheduler.schedule()]

    assert running() == ["big", "s1", "s2"]  # both large ones passed twice
    scheduler.remove(short[0])  # type: ignore[arg-type]
    assert running() == ["big", "s2", "s3"]  # three times: no more
    scheduler.remove(big)  # type: ignore[arg-type]
    assert running() == ["s2", "s3", "head"]
    scheduler.remove(short[1])  # type: ignore[arg-type]
    assert running() == ["s3", "head"]  # s4 fits, but waits for the second, already passed three times
    scheduler.remove(head)  # type: ignore[arg-type]
    assert running() == ["s3", "second", "s4"]
    assert scheduler._passed == {}  # nothing kept for requests that left the queue


def test_close_ends_in_flight_work(fresh):
    rt = fresh()
    params = dict(max_tokens=300, switch_threshold=1.0, mode="draft")
    assert rt.generate(_msgs(QUESTIONS[1]), **params).finish_reason == "length"  # a reply that runs long
    errors, first = [], threading.Event()

    def long_request():
        try:
            for _ in rt.stream(_msgs(QUESTIONS[1]), **params):
                first.set()
        except RuntimeClosedError as exc:
            errors.append(exc)

    thread = threading.Thread(target=long_request)
    thread.start()
    assert first.wait(timeout=30)
    rt.close()
    thread.join(timeout=10)
    assert not thread.is_alive() and len(errors) == 1
    assert rt.worker is None
    with pytest.raises(RuntimeClosedError, match="closed"):
        rt.generate(_msgs(QUESTIONS[0]))


def test_a_snapshot_shows_an_ending_request_counted(fresh, monkeypatch):
    """stats() from another thread while the worker drops a request (here paused as it frees the
    request's caches) shows it counted, not in neither queue and in no counter: a caller that waits
    for running == 0 then reads the counters reads them right."""
    from wsd_llms.sequence import Sequence

    rt = fresh()
    freeing, release, free = threading.Event(), threading.Event(), Sequence.free

    def slow_free(self):
        if threading.current_thread() is rt.worker and not release.is_set():
            freeing.set()
            release.wait(10)
        free(self)

    monkeypatch.setattr(Sequence, "free", slow_free)
    stream = rt.stream(_msgs(QUESTIONS[0]), max_tokens=200, switch_threshold=1.0)
    next(stream)
    stream.close()
    try:
        assert freeing.wait(10)
        s = rt.stats()
        assert (s.running, s.queued, s.cancelled, s.reserved_tokens) == (0, 0, 1, 0)
    finally:
        release.set()


@pytest.mark.parametrize("mode, kind", [("staged", "check"), ("staged", "draft"), ("online", "draft")])
def test_draft_and_check_caches_are_freed_before_the_base_continues(fresh, monkeypatch, mode, kind):
    """The draft's cache, and the staged pipeline's check cache (prompt and whole draft, every base
    layer), are freed once the draft is checked, not held through the base model's continuation,
    where stats() would not count them."""
    import gc
    import weakref

    from wsd_llms.sequence import Sequence

    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)
    engine, step, new_cache = rt.engine, rt.engine.step, Sequence.new_cache
    checks, alive_while_continuing = [], []

    def recorded(self, which):
        kv = new_cache(self, which)
        if which == kind:
            checks.append(weakref.ref(kv))
        return kv

    def observed_step():
        step()
        if checks and len(alive_while_continuing) < 3 and any(seq.phase == Phase.CONTINUING for seq in engine.scheduler.running):
            gc.collect()
            alive_while_continuing.append(checks[-1]() is not None)

    monkeypatch.setattr(Sequence, "new_cache", recorded)
    monkeypatch.setattr(engine, "step", observed_step)
    result = rt.generate(_msgs(QUESTIONS[0]), mode=mode, max_tokens=60, max_draft_tokens=20, switch_threshold=1.0)
    assert result.usage.base_tokens > 10 and alive_while_continuing == [False] * 3


def test_the_staged_check_cache_counts_as_cached_tokens(fresh, monkeypatch):
    """The staged pipeline's check cache (the prompt and the draft, fed in pieces over several
    steps) counts in stats().cached_tokens while it is held."""
    import weakref

    from wsd_llms.sequence import Sequence

    rt = fresh(prefill_chunk=8)
    rt.generate(_msgs("Hi"), max_tokens=2)
    engine, step, new_cache = rt.engine, rt.engine.step, Sequence.new_cache
    checks, seen = [], []

    def recorded(self, which):
        kv = new_cache(self, which)
        if which == "check":
            checks.append(weakref.ref(kv))
        return kv

    def observed_step():
        step()
        check = checks[-1]() if checks else None
        if check is not None and len(check):
            seen.append((len(check), engine.stats().cached_tokens))

    monkeypatch.setattr(Sequence, "new_cache", recorded)
    monkeypatch.setattr(engine, "step", observed_step)
    rt.generate(_msgs(QUESTIONS[0]), mode="staged", max_tokens=30, max_draft_tokens=30)
    assert len(seen) >= 2 and all(cached >= held for held, cached in seen), seen


def test_stats_snapshot(fresh):
    rt = fresh()
    events = list(rt.stream(_msgs(QUESTIONS[0]), max_tokens=20, switch_threshold=0.5, switch_window=2))
    assert isinstance(events[-1], FinalEvent)
    s = rt.stats()
    assert (s.queued, s.running, s.finished, s.failed, s.cancelled) == (0, 0, 1, 0, 0)
    assert s.tokens["draft"] > 0 and s.tokens["score"] > 0
    assert s.cached_tokens == 0
    assert s.batch_sizes == {"draft": 0, "base": 0}  # nothing runs now, whatever the last step was
    assert s.passes["draft"] > 0 and s.passes["base"] > 0
    timings = events[-1].result.timings  # one request alone: the runtime's pass time is all its own
    assert (s.pass_seconds["draft"], s.pass_seconds["score"], s.pass_seconds["base"]) == pytest.approx(
        (timings.draft, timings.scoring, timings.base)
    )
    assert 0 < sum(s.pass_seconds.values()) <= timings.total


def test_requests_that_fail_as_the_models_fail_to_load_are_counted():
    rt = WSDRuntime("/nonexistent/draft-model", "/nonexistent/base-model", device="cpu")
    try:
        for _ in range(2):
            with pytest.raises(ModelLoadError, match="does not exist"):
                rt.generate(_msgs("hi"), max_tokens=5)
        s = rt.stats()
        assert (s.queued, s.running, s.finished, s.failed, s.cancelled) == (0, 0, 0, 2, 0)
    finally:
        rt.close()


def test_requests_sent_before_a_load_failed_fail_with_it_without_trying_again(monkeypatch):
    """A burst of requests that waited on one load that failed fails with its error (each a copy of
    its own), without a load for each of them one after another; a request sent after the failure
    tries again. One whose caller gave up before its turn loads nothing."""
    attempts: list[float] = []

    def failing_load(source, **kwargs):
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            _wait_for(lambda: rt.stats().queued == 5)  # every request of the burst sent
        raise RuntimeError("out of memory (the test's)")

    monkeypatch.setattr(runtime_module, "load_model", failing_load)
    rt = WSDRuntime("/nonexistent/draft-model", "/nonexistent/base-model", device="cpu")
    try:
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(rt.generate, _msgs(q), max_tokens=5) for q in QUESTIONS[:5]]
            errors = [future.exception(timeout=30) for future in futures]
        assert all(isinstance(e, ModelLoadError) and "out of memory (the test's)" in str(e) for e in errors)
        assert len(attempts) == 1 and len({id(e) for e in errors}) == 5
        assert len({len(getattr(e, "__notes__", ())) for e in errors}) == 1  # each with its own trace notes, none gathered
        with pytest.raises(ModelLoadError, match="out of memory"):
            rt.generate(_msgs("hi"), max_tokens=5)
        assert len(attempts) == 2
        s = rt.stats()
        assert (s.queued, s.running, s.finished, s.failed, s.cancelled) == (0, 0, 0, 6, 0)
    finally:
        rt.close()


def test_a_snapshot_taken_as_the_models_finish_loading_counts_the_first_request(draft_tokenizer, monkeypatch):
    """stats() that finds no engine holds the lock the engine is set under: the worker cannot set it
    and take the first request meanwhile, which the snapshot would then count nowhere."""
    from wsd_llms.engine import RuntimeStats

    models = {"draft": tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0), "base": tiny_gemma3(make_tokenizer(420), 1, "tiny-gemma3")}
    rt = WSDRuntime("tiny-draft", "tiny-gemma3", device="cpu", lookup_tokens=0)
    monkeypatch.setattr(rt, "_load", lambda role, source, revision: models["draft" if source == "tiny-draft" else "base"])
    main, empty = threading.current_thread(), RuntimeStats.empty.__func__

    def empty_while_the_worker_loads(cls):
        if threading.current_thread() is main:  # give the worker time to set the engine and take the request
            deadline = time.monotonic() + 1.0
            while rt._taken == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
        return empty(cls)

    monkeypatch.setattr(RuntimeStats, "empty", classmethod(empty_while_the_worker_loads))
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(rt.generate, _msgs(QUESTIONS[0]), max_tokens=8)
            _wait_for(lambda: rt._sent == 1)
            s = rt.stats()
            assert s.queued + s.running + s.finished == 1
            assert future.result(timeout=30).text
    finally:
        rt.close()


def test_stats_does_not_wait_for_a_request_being_prepared(fresh, monkeypatch):
    """The worker builds a new request's prompts (a long prompt takes seconds to tokenize) and starts
    its program (a grammar may compile there) outside the lock stats() takes: a metrics call from
    another thread or an event loop does not stall meanwhile, and sees the request queued."""
    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)
    entered, release, prepare = threading.Event(), threading.Event(), rt.engine.prepare

    def held_prepare(*args, **kwargs):
        entered.set()
        release.wait(10)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(rt.engine, "prepare", held_prepare)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(rt.generate, _msgs(QUESTIONS[0]), max_tokens=4)
        assert entered.wait(10)
        start = time.perf_counter()
        s = rt.stats()
        assert time.perf_counter() - start < 1.0 and (s.queued, s.running) == (1, 0)
        release.set()
        assert future.result(timeout=30).text
    assert rt.stats().finished == 2


ADAPTER_ENDINGS = ["lc-stream-break", "lc-astream-break", "lc-ainvoke-cancel", "lc-timeout", "li-stream_chat-break", "li-astream_chat-break", "li-achat-cancel", "li-timeout"]


@pytest.mark.parametrize("ending", ADAPTER_ENDINGS)
async def test_adapter_calls_end_their_requests(fresh, monkeypatch, ending):
    """Each way a LangChain or LlamaIndex caller stops listening (leaving a stream's loop, cancelling
    the task, a timeout) cancels its request in the runtime and frees its caches; the reply is not
    written to the end."""
    from langchain_wsd import WSDChatModel
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.wsd import WSDLLM

    from wsd_llms.integration import WSDSettings

    rt = fresh()
    monkeypatch.setattr(WSDSettings, "wsd_runtime", lambda self: rt)
    long = {"max_tokens": 200, "switch_threshold": 1.0}
    question = QUESTIONS[0]
    chat, llm, messages = WSDChatModel(**long), WSDLLM(**long), [ChatMessage(role="user", content=question)]
    if ending == "lc-stream-break":
        for _ in chat.stream(question):
            break
    elif ending == "lc-astream-break":
        async for _ in chat.astream(question):
            break
    elif ending == "li-stream_chat-break":
        for _ in llm.stream_chat(messages):
            break
    elif ending == "li-astream_chat-break":
        async for _ in await llm.astream_chat(messages):
            break
    elif ending.endswith("-cancel"):
        task = asyncio.create_task(chat.ainvoke(question) if ending.startswith("lc") else llm.achat(messages))
        await asyncio.to_thread(_wait_for, lambda: rt.stats().cached_tokens > 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        with pytest.raises(RequestTimeoutError):
            chat.invoke(question, timeout=0.05) if ending.startswith("lc") else llm.chat(messages, timeout=0.05)
    await asyncio.to_thread(_wait_for, lambda: rt.stats().running == 0)
    after = rt.stats()
    ended = after.failed if ending.endswith("timeout") else after.cancelled
    assert (ended, after.finished, after.cached_tokens, after.reserved_tokens) == (1, 0, 0, 0)


@pytest.mark.parametrize("mode", ["online", "staged", "base", "draft"])
def test_usage_counts_the_prompt_taken_from_the_prefix_cache(fresh, mode):
    """A request's usage says how much of each model's prompt came from the prefix cache: none for a
    prompt seen first, the stored pieces for one that starts like it. In the staged pipeline the
    base model's second prefill of the prompt, which takes what its first pass stored, does not
    count again."""
    settings = {"max_tokens": 12, "switch_threshold": 0.5, "switch_window": 2, "mode": mode}
    rt = fresh(prefill_chunk=24)
    first = rt.generate(_msgs(LONG), **settings).usage
    assert (first.draft_cached_prompt_tokens, first.base_cached_prompt_tokens) == (0, 0)
    before = rt.stats().prefix_cache["reused_tokens"]
    again = rt.generate([*_msgs(LONG), {"role": "assistant", "content": "Item 3."}, {"role": "user", "content": "And 6?"}], **settings).usage
    cached = {"draft": again.draft_cached_prompt_tokens, "base": again.base_cached_prompt_tokens}
    runs = {"online": ("draft", "base"), "staged": ("draft", "base"), "base": ("base",), "draft": ("draft",)}[mode]
    prompt = {"draft": first.draft_prompt_tokens, "base": first.base_prompt_tokens}
    for model in ("draft", "base"):
        assert (prompt[model] - 24 < cached[model] <= prompt[model]) if model in runs else cached[model] == 0, (model, cached)
    if mode != "staged":  # staged's second base prefill reuses too, uncounted
        assert sum(cached.values()) == rt.stats().prefix_cache["reused_tokens"] - before


def test_adapters_report_the_prompt_taken_from_the_prefix_cache(fresh, monkeypatch):
    """LangChain's `input_token_details["cache_read"]` and LlamaIndex's `raw["usage"]["cache_read_tokens"]`
    are the base prompt positions the runtime restored: none the first time, most of it the next."""
    from langchain_wsd import WSDChatModel
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.wsd import WSDLLM

    from wsd_llms.integration import WSDSettings

    rt = fresh(prefill_chunk=24)
    monkeypatch.setattr(WSDSettings, "wsd_runtime", lambda self: rt)
    settings = {"max_tokens": 8, "switch_threshold": 0.5, "switch_window": 2}
    chat, llm = WSDChatModel(**settings), WSDLLM(**settings)
    first = chat.invoke(LONG).usage_metadata
    second = chat.invoke(LONG + " Answer briefly.").usage_metadata
    third = llm.chat([ChatMessage(role="user", content=LONG + " Answer at once.")]).raw["usage"]
    assert first["input_token_details"]["cache_read"] == 0
    # the user's message ends differently: the whole 24-token pieces before that are restored
    assert first["input_tokens"] - 2 * 24 < second["input_token_details"]["cache_read"] < second["input_tokens"]
    assert first["input_tokens"] - 2 * 24 < third["cache_read_tokens"] < third["input_tokens"] and third["draft"]["cache_read_tokens"] > 0


def test_the_draft_model_alone_reserves_its_reply_and_holds_no_more(fresh):
    """mode="draft" writes the reply into the draft cache: admission reserves the prompt and
    max_tokens (not max_draft_tokens, which that mode never drafts), so a short reply fits a small
    limit, and a long one never holds more positions than it reserved."""
    rt = fresh(max_cached_tokens=300)
    assert rt.generate(_msgs(QUESTIONS[0]), mode="draft", max_tokens=5).usage.reply_tokens > 0  # max_draft_tokens is 512
    most = []
    for _ in rt.stream(_msgs(QUESTIONS[0]), mode="draft", max_tokens=120, max_draft_tokens=1, stop=["zzzz"]):
        stats = rt.stats()
        most.append((stats.cached_tokens, stats.reserved_tokens))
    assert max(cached for cached, _ in most) > 60  # a long reply
    assert all(cached <= reserved for cached, reserved in most)


@pytest.mark.parametrize("calls", ["sync", "async"])
def test_a_new_grammar_compiles_before_the_worker_takes_its_request(fresh, monkeypatch, calls):
    """Compiling a request's grammar (up to 1.4 s for a new schema over the embedded base's words)
    runs beside the worker, so the streams already running never wait for it: here a compile is
    held until a plain request sent after it has finished, with the reply it gets alone. Meanwhile
    the request counts as queued."""
    rt = fresh()
    alone = rt.generate(_msgs(QUESTIONS[0]), max_tokens=10)
    entered, release = threading.Event(), threading.Event()
    real = structured.compiled_grammar

    def held(model, spec):
        if threading.current_thread() is not rt.worker:
            entered.set()
            assert release.wait(20), "the held compile was never released"
        return real(model, spec)

    monkeypatch.setattr(structured, "compiled_grammar", held)
    monkeypatch.setattr(runtime_module, "compiled_grammar", held)
    digits = {"max_tokens": 5, "response_format": {"type": "regex", "pattern": "[0-9]+"}}
    try:
        if calls == "sync":
            with ThreadPoolExecutor(1) as pool:
                constrained = pool.submit(rt.generate, _msgs("Pick a number."), **digits)
                assert entered.wait(10), "the grammar was not compiled beside the worker"
                assert rt.stats().queued == 1
                plain = rt.generate(_msgs(QUESTIONS[0]), max_tokens=10)
                release.set()
                number = constrained.result(timeout=60)
        else:

            async def both():
                constrained = asyncio.create_task(rt.agenerate(_msgs("Pick a number."), **digits))
                deadline = time.monotonic() + 10
                while not entered.is_set():
                    assert time.monotonic() < deadline, "the grammar was not compiled beside the worker"
                    await asyncio.sleep(0.01)
                plain = await rt.agenerate(_msgs(QUESTIONS[0]), max_tokens=10)
                release.set()
                return plain, await constrained

            plain, number = asyncio.run(both())
    finally:
        release.set()
    assert plain.text == alone.text
    assert re.fullmatch("[0-9]+", number.text)


def test_requests_given_up_in_the_inbox_count_as_their_callers_left_them(fresh, monkeypatch):
    """A request still in the inbox as the runtime closes counts as cancelled if its caller
    cancelled it there, as failed if its timeout passed there, and as failed otherwise, as
    requests the worker takes are counted (engine.given_up)."""
    rt = fresh()
    entered, release = _held_steps(rt, monkeypatch)

    async def cancelled_in_the_inbox():
        task = asyncio.create_task(rt.agenerate(_msgs(QUESTIONS[3]), max_tokens=30))
        while rt._inbox.qsize() < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(rt.generate, _msgs(QUESTIONS[0]), max_tokens=30)
        assert entered.wait(10)  # the worker is inside a step
        waiting = pool.submit(rt.generate, _msgs(QUESTIONS[1]), max_tokens=30)
        timed_out = pool.submit(rt.generate, _msgs(QUESTIONS[2]), max_tokens=30, timeout=0.2)
        _wait_for(lambda: rt._inbox.qsize() == 2)
        asyncio.run(cancelled_in_the_inbox())
        with pytest.raises(RequestTimeoutError):
            timed_out.result(timeout=30)
        _close_mid_step(rt, pool, release, [running, waiting])
    stats = rt.stats()
    assert (stats.finished, stats.failed, stats.cancelled, stats.queued, stats.running) == (1, 3, 1, 0, 0)


@pytest.mark.parametrize("ending", ["compiles", "fails to compile", "dies compiling", "times out", "is cancelled", "runtime closes"])
def test_a_request_compiling_its_grammar_is_counted_however_it_ends(fresh, monkeypatch, ending):
    """While its grammar compiles beside the worker a request counts as queued (or, once its caller
    has left, as it will end); then it runs, or fails with the compile's error (whatever it is), or
    ends at its timeout, its cancellation or close(), which waits for the compile to end; it is
    counted once as finished, failed or cancelled."""
    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)
    entered, release = threading.Event(), threading.Event()
    real = structured.compiled_grammar

    def held(model, spec):
        entered.set()
        assert release.wait(20), "the held compile was never released"
        if ending == "fails to compile":
            raise RuntimeError("no grammar today")
        if ending == "dies compiling":
            raise WorkerKilled("killed mid-compile")
        return real(model, spec)

    monkeypatch.setattr(runtime_module, "compiled_grammar", held)
    digits = {"max_tokens": 5, "response_format": {"type": "regex", "pattern": "[0-9]+"}}
    if ending == "times out":
        digits["timeout"] = 0.2

    async def cancelled_while_compiling():
        task = asyncio.create_task(rt.agenerate(_msgs("Pick a number."), **digits))
        while not entered.is_set():
            assert not task.done(), task.exception()  # failed before its compile: say so rather than wait for the suite's timeout
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        with ThreadPoolExecutor(2) as pool:
            if ending == "is cancelled":
                asyncio.run(cancelled_while_compiling())
                outcome = None
            else:
                outcome = pool.submit(rt.generate, _msgs("Pick a number."), **digits)
                assert entered.wait(10)
            s = rt.stats()  # one whose caller left counts as it will end, though it still compiles
            assert (s.queued, s.cancelled) == ((0, 1) if ending == "is cancelled" else (1, 0))
            if ending == "times out":
                with pytest.raises(RequestTimeoutError):
                    outcome.result(timeout=10)
                s = rt.stats()
                assert (s.queued, s.failed) == (0, 1)
            if ending == "runtime closes":
                closing = threading.Thread(target=rt.close)
                closing.start()
                with pytest.raises(RuntimeClosedError):
                    outcome.result(timeout=10)
                assert closing.is_alive()  # close() waits for the compile
            release.set()
            if ending == "runtime closes":
                closing.join(10)
                assert not [t for t in threading.enumerate() if t.name == "wsd-llms-compile"]
                assert rt.stats().queued == 0
            if ending == "compiles":
                assert re.fullmatch("[0-9]+", outcome.result(timeout=60).text)
            if ending == "fails to compile":
                with pytest.raises(RequestFailedError, match="could not start the request: RuntimeError: no grammar today"):
                    outcome.result(timeout=60)
            if ending == "dies compiling":
                with pytest.raises(RequestFailedError, match="could not start the request: WorkerKilled: killed mid-compile"):
                    outcome.result(timeout=60)
    finally:
        release.set()
    expected = {"compiles": (2, 0, 0), "fails to compile": (1, 1, 0), "dies compiling": (1, 1, 0), "times out": (1, 1, 0), "is cancelled": (1, 0, 1), "runtime closes": (1, 1, 0)}
    _wait_for(lambda: rt.stats().queued == 0)
    stats = rt.stats()
    assert (stats.finished, stats.failed, stats.cancelled, stats.running) == (*expected[ending], 0)


def test_a_request_refused_as_close_lets_go_of_the_engine_is_counted(fresh, monkeypatch):
    """A request whose grammar compiled beside the worker while the runtime closed is refused by the
    compile's thread. Had it read the engine just before the worker let go of it, it counted itself
    into that engine after its last snapshot, and stats() lost it (failed + finished one short)."""
    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)
    entered, release, at_lock = threading.Event(), threading.Event(), threading.Event()
    real_compile, lock = structured.compiled_grammar, rt.engine.scheduler.lock

    def held(model, spec):
        entered.set()
        assert release.wait(20), "the held compile was never released"
        return real_compile(model, spec)

    class LateLock:  # the compile's thread reaches the engine's lock only once the engine is let go of
        def __enter__(self):
            if threading.current_thread().name == "wsd-llms-compile":
                at_lock.set()
                _wait_for(lambda: rt.engine is None)
            return lock.__enter__()

        def __exit__(self, *exc):
            return lock.__exit__(*exc)

    real_let_go = rt._let_go_of_models

    def let_go_once_the_compile_holds_the_engine():
        at_lock.wait(10)
        real_let_go()

    monkeypatch.setattr(runtime_module, "compiled_grammar", held)
    monkeypatch.setattr(rt.engine.scheduler, "lock", LateLock())
    monkeypatch.setattr(rt, "_let_go_of_models", let_go_once_the_compile_holds_the_engine)
    try:
        with ThreadPoolExecutor(2) as pool:
            refused = pool.submit(rt.generate, _msgs("Pick a number."), max_tokens=5, response_format={"type": "regex", "pattern": "[0-9]+"})
            assert entered.wait(10)
            closing = pool.submit(rt.close)
            _wait_for(lambda: rt._closed)
            release.set()
            with pytest.raises(RuntimeClosedError):
                refused.result(timeout=20)
            closing.result(timeout=20)
    finally:
        release.set()
    assert rt.engine is None and at_lock.is_set()
    stats = rt.stats()
    assert (stats.queued, stats.running, stats.finished, stats.failed, stats.cancelled) == (0, 0, 1, 1, 0)


def test_a_request_whose_caller_was_told_the_runtime_closed_counts_failed(fresh, monkeypatch):
    """A running request's caller that learns of close() before the worker ends the request (the
    step in flight is long) leaves with RuntimeClosedError, which says where the request was (it
    said "waiting" of a request streaming its reply); the request counts as failed, as the runtime
    ended it, not as cancelled."""
    rt = fresh()
    entered, release = _held_steps(rt, monkeypatch)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(rt.generate, _msgs(QUESTIONS[0]), max_tokens=30)
        assert entered.wait(10)
        closing = pool.submit(rt.close)
        with pytest.raises(RuntimeClosedError, match=r"^this runtime was closed while this request was queued for admission$"):
            running.result(timeout=10)  # the caller polled and left before the step (which admits it) ended
        release.set()
        closing.result(timeout=30)
    stats = rt.stats()
    assert (stats.finished, stats.failed, stats.cancelled, stats.running, stats.queued) == (1, 1, 0, 0, 0)


def test_closing_mid_stream_says_the_request_was_generating(fresh, monkeypatch):
    """A caller reading a stream when close() comes, in a long step, is told the request was
    generating and how far it got (it was told the request was "waiting")."""
    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)
    engine, hold, entered, release = rt.engine, threading.Event(), threading.Event(), threading.Event()
    step = engine.step

    def held_step():
        if hold.is_set():
            entered.set()
            release.wait(20)
        step()

    monkeypatch.setattr(engine, "step", held_step)
    stream = rt.stream(_msgs(QUESTIONS[0]), max_tokens=200)
    next(stream)
    hold.set()
    assert entered.wait(10)
    with ThreadPoolExecutor(1) as pool:
        closing = pool.submit(rt.close)
        with pytest.raises(RuntimeClosedError, match=r"^this runtime was closed while this request was generating \(\d+ reply tokens so far\)$"):
            for _ in stream:
                pass
        release.set()
        closing.result(timeout=30)
    assert (rt.stats().failed, rt.stats().running) == (1, 0)


@pytest.mark.parametrize("beside", ["none allowed", "no thread"])
def test_a_grammar_compiles_on_the_worker_when_none_can_beside_it(fresh, monkeypatch, beside):
    """With MAX_COMPILES 0, or when no thread can start, the worker compiles the grammar itself as
    it takes the request, which is served as before."""
    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)
    if beside == "none allowed":
        monkeypatch.setattr(runtime_module, "MAX_COMPILES", 0)
    else:
        def no_thread(self):
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", no_thread)
    compiled_on = []
    real = structured.compiled_grammar
    monkeypatch.setattr(structured, "compiled_grammar", lambda model, spec: compiled_on.append(threading.current_thread()) or real(model, spec))
    number = rt.generate(_msgs("Pick a number."), max_tokens=5, response_format={"type": "regex", "pattern": "[0-9]+"})
    assert re.fullmatch("[0-9]+", number.text)
    assert compiled_on and set(compiled_on) == {rt.worker}
    stats = rt.stats()
    assert (stats.finished, stats.failed, stats.queued) == (2, 0, 0)


@pytest.mark.parametrize("ending", ["compiled", "runtime closes"])
def test_grammars_past_max_compiles_wait_for_a_compile_thread_not_the_worker(fresh, monkeypatch, ending):
    """Past MAX_COMPILES compiling at once, a request's grammar waits for the first compile thread
    to finish, in order, and is compiled there: never on the worker, whose streams go on. Closing
    the runtime meanwhile fails the waiting request, counted, and leaves no thread behind."""
    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)
    monkeypatch.setattr(runtime_module, "MAX_COMPILES", 1)
    entered, release = threading.Event(), threading.Event()
    compiled = []
    real = structured.compiled_grammar

    def held(model, spec):
        entered.set()
        assert release.wait(20), "the held compile was never released"
        compiled.append((spec, threading.current_thread()))
        return real(model, spec)

    monkeypatch.setattr(runtime_module, "compiled_grammar", held)
    patterns = ["[0-9]+", "[a-c]+", "[x-z]+"]
    with ThreadPoolExecutor(len(patterns)) as pool:
        outcomes = []
        for pattern in patterns:
            outcomes.append(pool.submit(rt.generate, _msgs("Pick one."), max_tokens=5, response_format={"type": "regex", "pattern": pattern}))
            assert entered.wait(10)
            _wait_for(lambda: rt.stats().queued == len(outcomes))
        assert len([t for t in threading.enumerate() if t.name == "wsd-llms-compile"]) == 1
        assert rt.generate(_msgs(QUESTIONS[0]), max_tokens=3).text  # served while the grammars wait
        if ending == "runtime closes":
            closing = threading.Thread(target=rt.close)
            closing.start()
            for outcome in outcomes:
                with pytest.raises(RuntimeClosedError):
                    outcome.result(timeout=10)
            release.set()
            closing.join(10)
            assert not closing.is_alive() and not [t for t in threading.enumerate() if t.name == "wsd-llms-compile"]
            stats = rt.stats()
            assert (stats.queued, stats.finished, stats.failed) == (0, 2, 3)
            return
        release.set()
        for pattern, outcome in zip(patterns, outcomes):
            assert re.fullmatch(pattern, outcome.result(timeout=60).text)
    assert [next(p for p in patterns if p in spec) for spec in dict.fromkeys(spec for spec, _ in compiled)] == patterns  # in order
    assert len({thread for _, thread in compiled}) == 1 and rt.worker not in {thread for _, thread in compiled}
    stats = rt.stats()
    assert (stats.queued, stats.finished, stats.failed) == (0, 5, 0)


def test_a_request_no_worker_can_start_for_is_not_counted(fresh, monkeypatch):
    """If no worker thread can start (the process's thread limit), the call raises and the request
    was never sent: stats() does not show it queued, and the next call is served."""
    rt = fresh()

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", no_thread)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            rt.generate(_msgs("Hi"), max_tokens=2)
        assert rt.stats().queued == 0
    assert rt.generate(_msgs("Hi"), max_tokens=2).text
    stats = rt.stats()
    assert (stats.queued, stats.finished, stats.failed) == (0, 1, 0)


def test_sending_a_request_does_not_wait_for_a_grammar_compiling_on_the_worker(fresh, monkeypatch):
    """While the worker compiles a grammar itself (no room beside it), taking the scheduler's lock,
    another caller's request is still sent at once: an async caller's event loop runs on."""
    rt = fresh()
    rt.generate(_msgs("Hi"), max_tokens=2)
    monkeypatch.setattr(runtime_module, "MAX_COMPILES", 0)
    entered, release = threading.Event(), threading.Event()
    real = structured.compiled_grammar

    def held(model, spec):
        entered.set()
        assert release.wait(20)
        return real(model, spec)

    monkeypatch.setattr(structured, "compiled_grammar", held)
    digits = {"max_tokens": 5, "response_format": {"type": "regex", "pattern": "[0-9]+"}}

    async def both():
        constrained = asyncio.create_task(rt.agenerate(_msgs("Pick a number."), **digits))
        while not entered.is_set():
            assert not constrained.done(), constrained.exception()  # failed before its compile: say so rather than wait for the suite's timeout
            await asyncio.sleep(0.01)
        plain = asyncio.create_task(rt.agenerate(_msgs(QUESTIONS[0]), max_tokens=5))
        t0 = time.monotonic()
        await asyncio.sleep(0.05)  # the plain request is sent meanwhile
        paused = time.monotonic() - t0
        release.set()
        return paused, await constrained, await plain

    timer = threading.Timer(5.0, release.set)  # if the loop were blocked, this alone would free it
    timer.start()
    try:
        paused, number, plain = asyncio.run(both())
    finally:
        timer.cancel()
        timer.join()  # a cancelled Timer's thread ends a moment later: not a leak
        release.set()
    assert paused < 2.0
    assert re.fullmatch("[0-9]+", number.text) and plain.text


@pytest.mark.parametrize(("mode", "running_phase"), [("online", Phase.DRAFTING), ("staged", Phase.DRAFTING), ("base", Phase.CONTINUING), ("draft", Phase.DRAFTING)])
def test_a_sequence_reads_waiting_only_while_queued(fresh, mode, running_phase):
    """A request's phase says what it is doing: waiting while queued (its program has already
    started, to check the request), then its program's phase once admitted, finished at the end."""
    rt = fresh(max_running=1)
    engine = rt.engine  # stepped by hand here: no worker runs
    first, second = (
        engine.prepare(normalize_messages(_msgs(q)), parse_params(max_tokens=6, mode=mode, switch_threshold=1.0), lambda e: None) for q in QUESTIONS[:2]
    )
    engine.add(first)
    engine.add(second)
    assert (first.phase, second.phase) == (Phase.WAITING, Phase.WAITING)
    engine.step()
    assert (first.phase, second.phase) == (running_phase, Phase.WAITING)
    while engine.has_work():
        engine.step()
    assert (first.phase, second.phase) == (Phase.FINISHED, Phase.FINISHED)
