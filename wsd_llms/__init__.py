"""wsd-llms: Weak-to-Strong Decoding. A small aligned draft model starts each reply, a large base
model checks it and, where it confidently agrees, takes over and writes the rest."""

from .errors import (
    InvalidMessagesError,
    InvalidParameterError,
    ModelLoadError,
    PromptTooLongError,
    ReplyCutShortError,
    RequestFailedError,
    RequestTimeoutError,
    RequestTooLargeError,
    RuntimeClosedError,
    WSDError,
)
from .engine import RuntimeStats
from .events import Event, FinalEvent, TextDelta, Timings, Usage, WSDResult
from .messages import Message
from .params import GenerationParams
from .runtime import WSDRuntime, get_runtime
from .switch import SwitchDetector, find_switch
from .tools import react_format

__all__ = [
    "Event",
    "FinalEvent",
    "GenerationParams",
    "InvalidMessagesError",
    "InvalidParameterError",
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
    "Timings",
    "Usage",
    "WSDError",
    "WSDResult",
    "WSDRuntime",
    "find_switch",
    "get_runtime",
    "react_format",
]
