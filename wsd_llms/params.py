"""Per-request parameters, validated once with pydantic and shared by both adapters."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidParameterError


class GenerationParams(BaseModel):
    """Everything one request may set; the defaults are the paper's (τ=0.8, w=6, greedy)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(256, ge=1, description="cap on the whole reply, in base tokens")
    max_draft_tokens: int = Field(512, ge=1, description="cap on the draft, in draft tokens")
    switch_threshold: float = Field(0.8, gt=0.0, le=1.0, description="τ: geometric-mean probability that triggers the switch")
    switch_window: int = Field(6, ge=1, description="w: number of consecutive draft tokens in the window")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 keeps all")
    seed: int | None = Field(None, description="seed for sampling; same seed, same reply")
    stop: tuple[str, ...] = Field((), description="strings that end the reply (not included)")
    mode: Literal["online", "staged", "base", "draft"] = Field(
        "online",
        description="online engine, the paper's three stages, or one model alone (baselines for comparison)",
    )
    timeout: float | None = Field(None, gt=0.0, description="seconds before the request fails (queueing included)")
    base_template: Literal["plain", "chat"] = Field(
        "plain", description="base prompt: the paper's plain [User]/[Assistant] template, or the base model's chat template"
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        return value

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def parse_params(**params: Any) -> GenerationParams:
    """Validate request parameters, raising an error that names the parameter, value and rule."""
    try:
        return GenerationParams(**params)
    except ValidationError as exc:
        raise InvalidParameterError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad field: `name=value: what is allowed`."""
    lines = []
    for err in exc.errors():
        name = ".".join(str(part) for part in err["loc"]) or "params"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown parameter {name!r} (value {err['input']!r})")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"invalid {name}={err['input']!r}: {msg}")
    return "; ".join(lines)
