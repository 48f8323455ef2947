"""A request sent to the runtime's worker, and the caller's side of it: how long a waiting caller
waits before it checks on the worker, the blocking stream (`SyncStream`), and a stream joined into
its reply. The worker side is in runtime.py; the engine takes the request in from there."""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import interrupts
from .errors import RuntimeClosedError, WSDError, released
from .events import Event, FinalEvent, TextDelta, WSDResult
from .messages import Message
from .params import GenerationParams
from .sequence import CallerLeft, Sequence

if TYPE_CHECKING:
    from .runtime import WSDRuntime

POLL_S = 0.5  # seconds between checks that the worker is still alive while a caller waits
# Seconds a waiting caller leaves the worker, past a request's timeout, to end the request itself
# (it does so between steps) before the caller ends it: the worker cannot while it loads the models,
# the request's grammar compiles, or a long step runs.
TIMEOUT_GRACE = 0.05


@dataclass(eq=False)  # each is itself (kept in a set while untaken)
class Submission:
    """A request sent to the worker: what it asks, where its events go, and how far it has got."""

    messages: list[Message]
    params: GenerationParams
    deliver: Callable[[Event | BaseException], None]
    cancelled: CallerLeft  # its sequence's too, once the engine takes it
    submitted: float  # time.perf_counter() when the caller asked: a timeout counts from here
    compiled: bool = False  # its grammar was sent to compile (beside the worker, or on it); False without one
    compile_error: BaseException | None = None
    seq: weakref.ref[Sequence] | None = None  # once the engine takes it in: where a caller's timeout finds it


def wait_time(sub: Submission) -> float:
    """How long a waiting caller waits for its next event before it checks on the worker (POLL_S), or,
    if sooner, until just past its timeout and TIMEOUT_GRACE (it had fired up to a poll late)."""
    if sub.params.timeout is None:
        return POLL_S
    left = sub.submitted + sub.params.timeout + TIMEOUT_GRACE - time.perf_counter()
    return min(POLL_S, max(left, 0.0) + 0.005)


_CLOSED = object()  # put in a sync stream's inbox by close(), to wake a next() that waits


class SyncStream(Iterator[Event]):
    """A request's events for a blocking caller (WSDRuntime.stream): a generator's iteration and
    close(), but close() may come from another thread too. A generator refused that ("generator
    already executing") while its next() waited, so a request queued behind others could not be
    given up until it was admitted; here close() ends the request and wakes that next(). Once it
    ends it holds neither the runtime nor the request, as a finished generator's frame did not."""

    def __init__(self, runtime: WSDRuntime, messages: list[Message], params: GenerationParams, called: float) -> None:
        self._runtime: WSDRuntime | None = runtime
        self._request: tuple[list[Message], GenerationParams, float] | None = (messages, params, called)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sub: Submission | None = None
        self._cancelled: CallerLeft | None = None  # the request's, once it is sent
        self._ended = False
        self._reading = threading.Lock()  # held by a next(); two at once would send the request twice

    def __iter__(self) -> SyncStream:
        return self

    def __next__(self) -> Event:
        if not self._reading.acquire(blocking=False):
            if self._ended:  # a close() from another thread is letting go: iteration has ended
                raise StopIteration
            raise ValueError("this stream is being read in another thread")  # as a generator's "already executing"
        try:
            return self._next()
        except WSDError as error:
            released(error)  # a caller may keep it: the frames it left held the request (_check_waiting's)
            raise
        finally:
            self._reading.release()

    def _next(self) -> Event:
        if self._ended:
            self._let_go()
            raise StopIteration
        try:
            runtime = self._runtime
            assert runtime is not None and self._request is not None
            interrupts.check()  # a Ctrl-C in the main thread: a request not yet sent is never sent
            if self._sub is None:  # sent at the first next(), as a generator's body starts there
                self._sub = runtime._submit(*self._request, self._inbox.put)
                self._cancelled = self._sub.cancelled
            while True:
                try:
                    item = self._inbox.get(timeout=wait_time(self._sub))
                except queue.Empty:
                    interrupts.check()
                    runtime._check_waiting(self._sub)
                    continue
                if item is _CLOSED or self._ended:
                    raise StopIteration
                if isinstance(item, FinalEvent):
                    self._end()
                    self._let_go()
                return unwrap(item)
        except BaseException:  # an error it was sent, a timeout, Ctrl-C (in this thread or the main one), a close(): the request ends with it
            self._end()
            self._let_go()
            raise

    def close(self) -> None:
        """End the request (from any thread); iteration ends."""
        self._end()
        if self._reading.acquire(blocking=False):  # no next() is reading: nothing more is needed
            try:
                self._let_go()
            finally:
                self._reading.release()

    def _end(self) -> None:
        self._ended = True
        if self._cancelled is not None:
            self._cancelled.set()
        self._inbox.put(_CLOSED)  # wakes a next() that waits

    def _let_go(self) -> None:
        """Drop the runtime and the request (under `_reading`): an ended stream kept in a variable
        held the runtime, and its models, alive."""
        self._runtime = self._request = self._sub = None

    def __del__(self) -> None:  # dropped unfinished, as a generator is closed when collected
        if not getattr(self, "_ended", True):
            self.close()


def unwrap(item: Event | BaseException) -> Event:
    """An event from the worker, or the error it sent instead."""
    if isinstance(item, BaseException):
        raise item
    return item


class Joined:
    """Joins a stream's deltas and checks them against its final result."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.final: WSDResult | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self.parts.append(event.text)
        else:
            self.final = event.result

    def result(self) -> WSDResult:
        if self.final is None:
            raise RuntimeClosedError("stream ended without a final event")
        joined = "".join(self.parts)
        if joined != self.final.text:
            raise WSDError(f"internal error: streamed text {joined!r} differs from the final text {self.final.text!r}")
        return self.final


def collect(events: Iterator[Event]) -> WSDResult:
    """A stream's whole reply."""
    joined = Joined()
    for event in events:
        joined.add(event)
    return joined.result()
