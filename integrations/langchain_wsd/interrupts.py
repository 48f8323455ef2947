"""Ctrl-C during `batch`: LangChain runs each input's invoke in a thread pool, and the KeyboardInterrupt
reaches only the main thread, whose executor then waits for every invoke to end, the runtime decoding
each reply to its last token. Within `interruptible()` a Ctrl-C first ends the requests that the
pool's threads serve, so the interrupt reaches the caller within a step."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import FrameType

from wsd_llms.runtime import SyncStream


class _Scope:
    """The requests served under one `interruptible()`, with the thread that reads each, and whether
    a Ctrl-C ended them."""

    def __init__(self) -> None:
        self.streams: dict[SyncStream, int] = {}
        self.open = True
        self.interrupted = False

    def interrupt(self) -> None:
        """End every request another thread reads (in the main thread, its own read gets the KeyboardInterrupt)."""
        self.interrupted = True
        main = threading.main_thread().ident
        for stream, reader in tuple(self.streams.items()):  # one C call: a pool thread adding meanwhile waits for the GIL
            if reader != main:
                stream.close()


_SCOPE: ContextVar[_Scope | None] = ContextVar("langchain_wsd_interrupt_scope", default=None)


def _open_scope() -> _Scope | None:
    scope = _SCOPE.get()
    return scope if scope is not None and scope.open else None


@contextmanager
def interruptible() -> Iterator[None]:
    """While the body runs, in the main thread under Python's own SIGINT handler, a Ctrl-C ends the
    requests served in its context (LangChain's executor copies the context into its threads), then
    raises KeyboardInterrupt as that handler does. In another thread, under a handler of the
    caller's own, or inside an open scope, it changes nothing."""
    if (
        _open_scope() is not None
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    scope = _Scope()

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        scope.interrupt()
        signal.default_int_handler(signum, frame)

    _SCOPE.set(scope)
    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        scope.open = False  # a generator's scope ended in another context or thread is no longer found
        if _SCOPE.get() is scope:
            _SCOPE.set(None)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is on_interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def watched(stream: SyncStream) -> Iterator[None]:
    """Serve `stream` where a Ctrl-C in an open scope can end it: a request not yet sent when one came
    is never sent, and one it ended raises KeyboardInterrupt here, not a reply cut short."""
    scope = _open_scope()
    if scope is None:
        yield
        return
    if scope.interrupted:
        raise KeyboardInterrupt
    scope.streams[stream] = threading.get_ident()
    try:
        yield
    finally:
        scope.streams.pop(stream, None)
    if scope.interrupted:
        raise KeyboardInterrupt
