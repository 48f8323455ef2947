"""Ctrl-C for requests that other threads wait on. The KeyboardInterrupt reaches only the main
thread; a thread pool's threads (LangChain's batch and RunnableParallel, a LangGraph step's
parallel nodes, a pool of the caller's own) went on reading their replies to the last token while
the pool's executor, in the main thread, waited for them to end. A thread waiting on a sync stream
now sees the main thread handle the KeyboardInterrupt and takes it too (no signal handler is
installed: asyncio.run installs its own only over Python's)."""

from __future__ import annotations

import os
import sys
import threading


def check() -> None:
    """Raise KeyboardInterrupt in a thread other than the main one while the main thread handles one
    (an executor's shutdown waits for its threads inside the `with` that the interrupt left)."""
    main = threading.main_thread()
    if threading.current_thread() is main:
        return  # its own wait gets the KeyboardInterrupt
    handled: object = sys._current_exceptions().get(main.ident or 0)
    if isinstance(handled, tuple):  # Python 3.11 gives sys.exc_info()'s triple, later ones the exception
        handled = handled[1]
    if isinstance(handled, KeyboardInterrupt):
        raise KeyboardInterrupt


def exit_now(code: int) -> None:
    """End the process at once with `code`, its output flushed: no atexit callback runs and no thread
    is joined. Nothing is left half-written: a model's cache entry is written aside and renamed, and
    its file lock ends with the process."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:  # a reader gone (BrokenPipeError) still exits
        os._exit(code)
