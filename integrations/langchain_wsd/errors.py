"""wsd-llms errors raised as LangChain's standard model errors (`langchain_core.exceptions`).

LangChain's agent middleware reads these: `ModelRetryMiddleware` retries only an error whose
`is_retryable` is true (a failed or timed-out request, a worker that died) and not one that fails
the same way every time (bad parameters or messages), and `SummarizationMiddleware` shortens a
summary prompt that raised `ContextOverflowError`. Each error is still the wsd-llms error it was,
as hosted providers' errors stay their SDK's errors, so code that catches either keeps working.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from langchain_core.exceptions import (
    ContextOverflowError,
    ModelAPIError,
    ModelInvalidRequestError,
    ModelNotFoundError,
    ModelTimeoutError,
)

from wsd_llms.errors import (
    InvalidMessagesError,
    InvalidParameterError,
    ModelLoadError,
    PromptTooLongError,
    RequestFailedError,
    RequestTimeoutError,
    RequestTooLargeError,
    RuntimeClosedError,
    WSDError,
)


class WSDContextOverflowError(ContextOverflowError, PromptTooLongError):
    """The prompt does not fit one of the two models' context windows."""


class WSDInvalidParameterError(ModelInvalidRequestError, InvalidParameterError):
    """A request parameter has a value outside what is allowed."""


class WSDInvalidMessagesError(ModelInvalidRequestError, InvalidMessagesError):
    """The messages cannot be turned into a prompt."""


class WSDRequestTooLargeError(ModelInvalidRequestError, RequestTooLargeError):
    """The request could never fit the runtime's cache limit."""


class WSDModelLoadError(ModelNotFoundError, ModelLoadError):
    """A model could not be located, converted or loaded."""


class WSDRequestTimeoutError(ModelTimeoutError, RequestTimeoutError):
    """The request ran past its `timeout`."""


class WSDRequestFailedError(ModelAPIError, RequestFailedError):
    """Serving the request failed (the runtime serves the others, and the next request)."""


class WSDRuntimeClosedError(ModelAPIError, RuntimeClosedError):
    """The runtime closed or its worker died while the request waited; the next call starts a new one."""


# The most specific kind first: a RequestTooLargeError is also a RequestFailedError.
_AS_LANGCHAIN: tuple[tuple[type[WSDError], type[WSDError]], ...] = (
    (PromptTooLongError, WSDContextOverflowError),
    (InvalidMessagesError, WSDInvalidMessagesError),
    (InvalidParameterError, WSDInvalidParameterError),
    (RequestTooLargeError, WSDRequestTooLargeError),
    (RequestTimeoutError, WSDRequestTimeoutError),
    (RequestFailedError, WSDRequestFailedError),
    (RuntimeClosedError, WSDRuntimeClosedError),
    (ModelLoadError, WSDModelLoadError),
)


def as_langchain_error(error: WSDError) -> WSDError:
    """`error` as the LangChain model error of its kind, with its message and traceback;
    unchanged if it has no such kind."""
    for kind, langchain_kind in _AS_LANGCHAIN:
        if isinstance(error, kind):
            return langchain_kind(*error.args).with_traceback(error.__traceback__)
    return error


@contextmanager
def langchain_errors() -> Iterator[None]:
    """Raise a wsd-llms error from within as the LangChain model error of its kind."""
    try:
        yield
    except WSDError as error:
        raise as_langchain_error(error) from error.__cause__
