"""The errors wsd-llms raises, so callers can catch them by kind."""

from __future__ import annotations

import copy
import sys
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager


class WSDError(Exception):
    """Base class for every error raised by wsd-llms."""


class InvalidParameterError(WSDError, ValueError):
    """A request or runtime parameter has a value outside what is allowed."""


class InvalidMessagesError(WSDError, ValueError):
    """The messages of a request cannot be turned into a prompt."""


class PromptTooLongError(WSDError):
    """The prompt does not fit one of the two models' context windows. Not a ValueError, as a
    provider's context-length error is not (LangChain's ContextOverflowError, OpenAI's BadRequestError):
    LlamaIndex's refine takes a ValueError for a reply it could not parse, logs it and answers "Empty Response"."""


class ReplyCutShortError(WSDError, ValueError):
    """max_tokens, the context window or a stop string ended a reply before its structured value was whole."""


class InvalidReplyError(WSDError, ValueError):
    """A structured reply that says no one value, where a pydantic class's validation would pass
    it: it writes a key twice, of which JSON (and pydantic) keep only the last value."""


class ModelLoadError(WSDError, RuntimeError):
    """A model could not be located, converted or loaded."""


class RequestFailedError(WSDError, RuntimeError):
    """Serving one request failed; the runtime keeps serving the others."""


class RequestTooLargeError(RequestFailedError):
    """A request could never fit the runtime's cache limit."""


class RequestTimeoutError(RequestFailedError, TimeoutError):
    """A request ran past its `timeout`."""


class RuntimeClosedError(WSDError, RuntimeError):
    """The runtime was closed, or its worker died, before a request finished."""


class ToolResultWarning(UserWarning):
    """A tool result in a request's history that names no call of the turn before it (by id)."""


# Where a warning is the caller's: the first frame outside these packages (ours and the frameworks
# that call us), so that the warning points at the line that made the request, however deep.
LIBRARY_PACKAGES = ("wsd_llms", "langchain_wsd", "llama_index", "langchain_core", "langchain", "langgraph", "workflows", "asyncio", "concurrent")


def user_stacklevel() -> int:
    """The stacklevel for warnings.warn, called where this is called, that names the first frame
    outside LIBRARY_PACKAGES (Python 3.11 has no skip_file_prefixes); where no frame of the
    caller's is on the stack (a worker thread, a thread pool's), 2: the library's line that
    called, as a plain warning names it (so a filter by module still reaches it)."""
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None:
        package = str(frame.f_globals.get("__name__") or "").split(".")[0]
        if package == "threading":
            break
        if package not in LIBRARY_PACKAGES:
            return level
        frame, level = frame.f_back, level + 1
    return 2


# What ends the program, not one request: raised while the worker serves a request, these end the
# worker (which fails every request with them). Anything else fails that request alone, a
# BaseException too: a panic in a Rust tokenizer reaches Python as pyo3's PanicException, one.
EXITS = (KeyboardInterrupt, SystemExit)


def copy_of(exc: BaseException) -> BaseException:
    """A new error like `exc` (its message, cause and notes, no traceback), for one more caller it
    ends: one object raised in many callers' threads gathers all their frames in its traceback."""
    again = copy.copy(exc)
    again.__cause__ = exc.__cause__
    if hasattr(exc, "__notes__"):
        again.__notes__ = list(exc.__notes__)
    return again


def described(exc: BaseException) -> str:
    """`exc` in a line for an error message: its type, then its message where it has one. An
    error whose message cannot be made (a broken __str__) is still named by its type, so the
    message built around it reaches its caller."""
    try:
        text = str(exc)
    except Exception as broken:  # the error message is ours to send: it must not fail too
        text = f"<its message failed: {type(broken).__name__}>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def linked(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every error it chains to (causes and contexts), each once."""
    seen: set[int] = set()
    links: list[BaseException | None] = [exc]
    while links:
        link = links.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        links += [link.__cause__, link.__context__]


def detached(exc: BaseException) -> BaseException:
    """The exception (and those it chains to) without tracebacks, which hold the worker's frames, and
    through them the request's caches, for as long as a caller keeps the error (batch with
    return_exceptions, a tracer); each trace stays readable as a note."""
    for link in linked(exc):
        if link.__traceback__ is not None:
            link.add_note("raised in the wsd-llms worker:\n" + "".join(traceback.format_tb(link.__traceback__)).rstrip())
            link.__traceback__ = None
    return exc


def released(exc: BaseException) -> BaseException:
    """`exc`, the frames it has left (and those of the errors it chains to) cleared of their locals:
    a caller that keeps the error (a retry wrapper's last one, a tracer) kept what they held, such as
    a finished request's sequence. The frame that catches it, still running, keeps its own."""
    for link in linked(exc):
        traceback.clear_frames(link.__traceback__)
    return exc


@contextmanager
def needs_extra(module: str, extra: str) -> Iterator[None]:
    """A missing `module` (or a module in it) as an error that names the extra installing it: an
    adapter imported without its framework said only "No module named 'langchain_core'"."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if exc.name is None or (exc.name != module and not exc.name.startswith(f"{module}.")):
            raise
        raise ModuleNotFoundError(f"{exc.msg}; install it with: pip install 'wsd-llms[{extra}]'", name=exc.name) from exc
