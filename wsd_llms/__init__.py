"""wsd-llms: Weak-to-Strong Decoding. A small aligned draft model starts each reply, a large base
model checks it and, where it confidently agrees, takes over and writes the rest.

The errors are imported at once; the rest on first use (`from wsd_llms import WSDRuntime` works as
ever), so that `wsd-llms --help` and code that only catches these errors do not wait for torch."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .errors import (
    InvalidMessagesError,
    InvalidParameterError,
    InvalidReplyError,
    ModelLoadError,
    PromptTooLongError,
    ReplyCutShortError,
    RequestFailedError,
    RequestTimeoutError,
    RequestTooLargeError,
    RuntimeClosedError,
    ToolResultWarning,
    WSDError,
)

if TYPE_CHECKING:
    from .engine import RuntimeStats
    from .events import Event, FinalEvent, TextDelta, Timings, Usage, WSDResult
    from .messages import Message
    from .params import GenerationParams
    from .runtime import WSDRuntime, get_runtime
    from .switch import SwitchDetector, find_switch
    from .tools import react_format

# The module each name that is imported on first use comes from.
_LAZY = {
    "RuntimeStats": ".engine",
    **dict.fromkeys(("Event", "FinalEvent", "TextDelta", "Timings", "Usage", "WSDResult"), ".events"),
    "Message": ".messages",
    "GenerationParams": ".params",
    "WSDRuntime": ".runtime",
    "get_runtime": ".runtime",
    "SwitchDetector": ".switch",
    "find_switch": ".switch",
    "react_format": ".tools",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name.isidentifier() and importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule, as `wsd_llms.runtime` found it when all were imported
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once: later lookups find it as a module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Event",
    "FinalEvent",
    "GenerationParams",
    "InvalidMessagesError",
    "InvalidParameterError",
    "InvalidReplyError",
    "Message",
    "ModelLoadError",
    "PromptTooLongError",
    "ReplyCutShortError",
    "RequestFailedError",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "RuntimeStats",
    "RuntimeClosedError",
    "SwitchDetector",
    "TextDelta",
    "ToolResultWarning",
    "Timings",
    "Usage",
    "WSDError",
    "WSDResult",
    "WSDRuntime",
    "find_switch",
    "get_runtime",
    "react_format",
]
