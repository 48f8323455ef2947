"""What a request streams back: text deltas tagged with their author, then one final result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

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
    """Token counts. Reply tokens are base tokens (kept draft + continuation)."""

    draft_prompt_tokens: int = 0
    base_prompt_tokens: int = 0
    draft_tokens: int = 0
    kept_draft_tokens: int = 0
    base_tokens: int = 0
    reply_tokens: int = 0


@dataclass(frozen=True)
class WSDResult:
    """One finished reply and the facts of how WSD produced it."""

    text: str
    finish_reason: Literal["stop", "length"]
    switch_point: int | None
    """Kept draft tokens (in base tokens) when a window passed; None when no switch happened."""
    draft_text: str
    """The part of `text` the draft model wrote."""
    usage: Usage
    timings: Timings
    draft_model: str
    base_model: str
    mode: str
    rollbacks: int = 0
    """How often a re-tokenization of the draft forced the base cache back (online mode)."""

    @property
    def switched(self) -> bool:
        return self.switch_point is not None

    def as_dict(self) -> dict[str, Any]:
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
