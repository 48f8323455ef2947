"""What a request streams back: text deltas tagged with their author, then one final result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .messages import ToolCall
from .tools import InvalidToolCall

Source = Literal["draft", "base"]


@dataclass(frozen=True)
class Timings:
    """Seconds: to first token, in draft forwards, in base scoring, in base decoding, in total."""

    ttft: float | None = None
    draft: float = 0.0
    scoring: float = 0.0
    base: float = 0.0
    total: float = 0.0


@dataclass(frozen=True)
class Usage:
    """Token counts. Reply tokens are base tokens (kept draft + continuation; the draft's with
    mode="draft", where the whole reply is the kept draft). A model the mode does not run read no
    prompt tokens."""

    draft_prompt_tokens: int = 0
    base_prompt_tokens: int = 0
    draft_tokens: int = 0
    kept_draft_tokens: int = 0
    base_tokens: int = 0
    reply_tokens: int = 0
    draft_cached_prompt_tokens: int = 0
    base_cached_prompt_tokens: int = 0
    """Prompt positions each model took from the prefix cache instead of computing them (in its
    first pass over the prompt: the staged pipeline's second base prefill does not count)."""


@dataclass(frozen=True)
class WSDResult:
    """One finished reply and the facts of how WSD produced it."""

    text: str
    finish_reason: Literal["stop", "length"]
    switch_point: int | None
    """Kept draft tokens (in base tokens) when a window passed; None when none did: the draft was
    kept as far as it went (whole, to a stop string, or as far as the base's grammar takes it;
    `usage.kept_draft_tokens` says how far)."""
    draft_text: str
    """The part of `text` the draft model wrote."""
    usage: Usage
    timings: Timings
    draft_model: str
    base_model: str
    mode: str
    rollbacks: int = 0
    """How often a re-tokenization of the draft forced the base cache back (online mode)."""
    content: str | None = None
    """The reply's text outside tool calls (equal to `text` when the request has no tools)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """The tool calls the reply made that parse and fit their tool's schema, in order."""
    invalid_tool_calls: tuple[InvalidToolCall, ...] = ()
    """Calls that do not parse or validate: raw text and error (never dropped silently)."""
    parsed: Any = None
    """With `response_format`: the reply as a JSON value, if it parses and fits the schema (else None,
    as an invalid call is not among `tool_calls`: `parse_error` says why, and `text` holds the reply)."""
    parse_error: str | None = None
    """With `response_format`: why the reply does not parse or validate (None when it does)."""
    stop_reason: str | None = None
    """The `stop` string the reply ended at (as vLLM's stop_reason), else None: it ended at the
    model's end of turn, the template's role marker, or its budget."""

    @property
    def switched(self) -> bool:
        """Whether the base model took over at a switch point."""
        return self.switch_point is not None

    @property
    def message_content(self) -> str:
        """The reply as a chat message's content: `content`, or `text` in a result made without one
        (the runtime always sets it; the adapters read this)."""
        return self.text if self.content is None else self.content

    def as_dict(self) -> dict[str, Any]:
        """Every field, nested ones as dicts (for JSON)."""
        return asdict(self)


@dataclass(frozen=True)
class TextDelta:
    """A piece of final reply text and the model that wrote it."""

    text: str
    source: Source
    type: Literal["text"] = field(default="text", init=False)


@dataclass(frozen=True)
class FinalEvent:
    """The last event of every successful stream."""

    result: WSDResult
    type: Literal["final"] = field(default="final", init=False)


Event = TextDelta | FinalEvent
