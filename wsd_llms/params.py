"""Per-request parameters: one pydantic model (GenerationParams) that the runtime checks every request
against, and whose fields and checks both adapters' settings reuse (integration.WSDSettings)."""

from __future__ import annotations

import asyncio
import difflib
import json
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PydanticUserError, StrictBool, TypeAdapter, ValidationError, field_validator, model_validator
from typing_extensions import is_typeddict

from .errors import InvalidParameterError

# Temperatures below this decode greedily, as in vLLM: dividing logits by less overflows float32.
GREEDY_BELOW = 1e-5
# Stop strings one request may give (OpenAI's API takes 4): a reply looks for each at every token.
MAX_STOPS = 64
# Above this, sampling is uniform in all but name; far above it, logits divided in float32 become NaN.
MAX_TEMPERATURE = 1e4
# Beyond these, a penalized logit (divided or multiplied by the penalty, then by the temperature) may
# leave float32's range: a sampled reply's probabilities became NaN, and a grammar's one allowed id
# -inf. Within them a penalty has long since decided: 1e4 makes any id already written all but impossible.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-4, 1e4


def json_error(schema: Any) -> str | None:
    """Why a schema cannot be written as JSON (a date as a default, a set as an enum), or None."""
    try:
        json.dumps(schema, allow_nan=False)  # Infinity and NaN are not JSON (a pydantic default of inf, say)
    except (TypeError, ValueError) as exc:
        return f"hold a value JSON cannot write: {exc}"
    except RecursionError:
        return "are nested too deeply to write as JSON"
    return None


KEYWORD_CHOICES = ("auto", "any", "required", "none")  # tool_choice values that name no tool


def tool_choice_value(value: Any) -> Any:
    """A tool_choice in the runtime's terms ("auto", "required", "none" or a tool's name) from the
    forms LangChain, OpenAI and Anthropic use: None and False (auto: unset, as ChatOpenAI reads False),
    True and "any" (required), a
    {"type": "function", "function": {"name"}} or {"type": "tool" | "function", "name"} dict (the
    name), {"type": "auto" | "any" | "none"}; anything else as given, for the error that names it."""
    if value is None or value is False:
        return "auto"
    if value is True or value == "any":
        return "required"
    if isinstance(value, dict):
        function = value.get("function")
        name = (function.get("name") if isinstance(function, dict) else None) or value.get("name")
        if name is None and value.get("type") in ("auto", "any", "none"):
            return tool_choice_value(value["type"])
        return name if isinstance(name, str) else value
    return value


def tool_choice_problem(choice: Any, names: Sequence[str], tools: str = "given") -> str | None:
    """What is wrong with a tool_choice for the tools named `names` (one that asks for a call needs
    tools; a name must be one of them), or None; `tools` says how they came: "given" or "bound"."""
    value = tool_choice_value(choice)
    if value == "required" and not names:
        return f"tool_choice={choice!r} asks for a tool call, but no tools are {tools}"
    if value not in ("auto", "required", "none", *names):
        return (
            f"tool_choice={choice!r} is neither 'auto', 'required', 'any', 'none' nor a tool name "
            f"(tools {tools}: {', '.join(names) or 'none'})" + _close_choice(value, names)
        )
    return None


def _close_choice(value: Any, names: Sequence[str]) -> str:
    """did_you_mean for a tool_choice: a keyword in any case ('required' and 'any' only where there
    are tools to call), else a tool's name."""
    if not isinstance(value, str):
        return ""
    keywords = KEYWORD_CHOICES if names else ("auto", "none")
    return did_you_mean(value.lower(), keywords) or did_you_mean(value, names)


# response_format types that constrain text rather than ask for a JSON value.
TEXT_GRAMMARS = ("regex", "structural_tag")


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    """{"type": "json_object"}: any JSON object; with a "schema" (llama.cpp's server, Together's,
    Fireworks'), that schema. Any other key is refused, not left unread."""
    if extra := sorted(set(value) - {"type", "schema"}):
        raise ValueError(f'a json_object response_format takes "type" and "schema" (a JSON schema), not {", ".join(map(repr, extra))}')
    schema = value.get("schema")
    if schema is None:
        return {"type": "object"}
    if not isinstance(schema, dict):
        raise ValueError(f'a json_object response_format\'s "schema" must be a JSON schema (a dict), got {schema!r}')
    return schema


# Keys whose presence makes a dict a JSON schema of its own (not a wrapper around one).
_SCHEMA_KEYS = frozenset({
    "type", "properties", "required", "additionalProperties", "patternProperties", "$ref", "$defs", "definitions", "$schema",
    "anyOf", "oneOf", "allOf", "not", "if", "enum", "const", "items", "prefixItems", "format", "pattern", "minLength", "maxLength",
})
# Where a tool's or a named format's wrapper holds its JSON schema: OpenAI's json_schema object
# ("schema"), its functions and tools ("parameters"), Anthropic's tools ("input_schema").
_WRAPPED = ("schema", "parameters", "input_schema")


def unwrapped_format(value: Any) -> Any:
    """A response_format as the runtime reads it: a pydantic class or a TypedDict as its JSON schema;
    OpenAI's, Anthropic's and llama.cpp's wrappers ({"type": "json_schema", "json_schema": {...}},
    a function or tool {"name", "schema" | "parameters" | "input_schema"}) as the schema they hold;
    OpenAI's {"type": "text"} as None."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        return value.model_json_schema()
    if is_typeddict(value):
        try:
            return TypeAdapter(value).json_schema()
        except PydanticUserError as exc:  # typing.TypedDict before Python 3.12
            raise ValueError(f"{value.__name__} cannot be read as a schema: {exc.message}") from None
    if isinstance(value, BaseModel):
        raise ValueError(f"an instance of {type(value).__name__} is no schema: pass the class {type(value).__name__}, or a JSON schema dict")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON schema (a dict), a pydantic class or a TypedDict, not {type(value).__name__}")
    if value == {"type": "text"}:
        return None  # OpenAI's explicit plain text (no JSON schema has type "text")
    if value.get("type") == "json_object":
        return _json_object(value)
    if value.get("type") == "json_schema" and not isinstance(value.get("json_schema"), dict):
        raise ValueError('a json_schema response_format needs a "json_schema" object, as OpenAI\'s: {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}')
    if value.get("type") == "json_schema":
        inner = value["json_schema"]  # OpenAI's {"type": "json_schema", "json_schema": {"name", "schema"}}
        return inner["schema"] if isinstance(inner.get("schema"), dict) else {"type": "object"}  # no schema: a JSON object
    if value.get("type") == "function" and isinstance(value.get("function"), dict):
        value = value["function"]  # an OpenAI tool: {"type": "function", "function": {"name", "parameters"}}
    flat_tool = value.get("type") in ("function", "custom") and "name" in value  # OpenAI's Responses tools, Anthropic's custom ones
    if flat_tool or "name" in value and not _SCHEMA_KEYS & value.keys():  # a named wrapper, not a schema
        for wrapped in _WRAPPED:
            if isinstance(value.get(wrapped), dict):
                return value[wrapped]
        raise ValueError(
            f'a response_format named {value["name"]!r} holds no schema: give its JSON schema as "schema", '
            '"parameters" or "input_schema", or give the JSON schema itself'
        )
    return value


class GenerationParams(BaseModel):
    """Everything one request may set; the defaults are the paper's (τ=0.8, w=6, greedy)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_tokens: int = Field(default=256, ge=1, description="cap on the whole reply, in base tokens (the draft's with mode=\"draft\")")
    max_draft_tokens: int = Field(default=512, ge=1, description="cap on the draft, in draft tokens")
    switch_threshold: float = Field(default=0.8, gt=0.0, le=1.0, description="τ: geometric-mean probability that triggers the switch")
    switch_window: int = Field(default=6, ge=1, description="w: number of consecutive draft tokens in the window")
    temperature: float = Field(
        default=0.0, ge=0.0, le=MAX_TEMPERATURE, description=f"0 (or anything below {GREEDY_BELOW}) means greedy"
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(default=0, ge=0, description="keep the k most likely tokens; 0 keeps all")
    repetition_penalty: float = Field(
        default=1.0,
        ge=MIN_REPETITION_PENALTY,
        le=MAX_REPETITION_PENALTY,
        description="transformers' repetition penalty over the reply: above 1, ids already in the reply become less likely; 1 is off",
    )
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64, description="seed for sampling; same seed, same reply")
    stop: tuple[str, ...] = Field(default=(), description=f"strings that end the reply (not included), {MAX_STOPS} at most")
    mode: Literal["online", "staged", "base", "draft"] = Field(
        default="online",
        description="online engine, the paper's three stages, or one model alone (baselines for comparison)",
    )
    timeout: float | None = Field(default=None, gt=0.0, description="seconds before the request fails (queueing included)")
    base_template: Literal["plain", "chat"] = Field(
        default="plain", description="base prompt: the paper's plain [User]/[Assistant] template, or the base model's chat template"
    )
    response_format: dict[str, Any] | None = Field(
        default=None,
        description='a JSON schema, a pydantic model (or its schema), or {"type": "json_object"}: the reply is one such '
        'JSON value; or a text format: {"type": "regex", "pattern": ...} or an xgrammar structural tag '
        '{"type": "structural_tag", "format": {...}}',
    )
    tools: tuple[dict[str, Any], ...] = Field(
        default=(), description="tool schemas: {name, description, parameters}, or OpenAI-style {type: function, function: {...}}"
    )
    tool_choice: str = Field(default="auto", description='"auto", "required" (or "any"), "none", or the name of one tool')
    parallel_tool_calls: StrictBool = Field(default=False, description="allow several tool calls in one reply")
    continue_final_message: StrictBool = Field(
        default=True,
        description="a trailing assistant message (without tool calls) is the reply's forced start; False: it is "
        "a finished turn, and the reply is the next one (vLLM's continue_final_message)",
    )

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, value: Any) -> Any:
        value = unwrapped_format(value)
        if isinstance(value, dict) and (error := json_error(value)) is not None:
            raise ValueError(f"the schema's values {error}")
        if isinstance(value, dict) and value.get("type") == "regex" and not isinstance(value.get("pattern"), str):
            raise ValueError('a regex response_format needs a "pattern" string')
        if isinstance(value, dict) and value.get("type") == "structural_tag" and not isinstance(value.get("format"), dict):
            raise ValueError('a structural_tag response_format needs a "format" object (an xgrammar structural tag)')
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, value: Any) -> Any:
        from .tools import normalize_tools

        return () if value is None else normalize_tools(value)

    @field_validator(
        "max_tokens", "max_draft_tokens", "switch_threshold", "switch_window", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "timeout", mode="before"
    )
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool) or type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # pydantic would take True as 1
            raise ValueError("a number is needed, not a bool")
        if isinstance(value, (str, bytes)):  # pydantic would read "10" as 10: a number written as text is a caller's slip
            raise ValueError(f"a number is needed, not a {type(value).__name__}")
        if isinstance(value, numbers.Integral) and not isinstance(value, int):
            return int(value)  # numpy's integers as the ints they hold (pydantic read a uint64 beyond int64's range as a string)
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        choice = tool_choice_value(value)
        if not isinstance(choice, str):  # pydantic's "Input should be a valid string" said nothing of the forms
            raise ValueError(
                "must be 'auto', 'required' (or 'any'), 'none', a tool's name, or a dict naming a tool "
                "({'type': 'function', 'function': {'name': ...}} or {'type': 'tool', 'name': ...})"
            )
        return choice

    @model_validator(mode="before")
    @classmethod
    def _none_is_the_default(cls, data: Any) -> Any:
        """None for a parameter that has a value by default means that value, as in both adapters and
        OpenAI's API (a caller spreads an optional setting: `temperature=cfg.get("temperature")`);
        it had been refused as "Input should be a valid number"."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].default is None}
        return data

    @model_validator(mode="before")
    @classmethod
    def _tool_needed(cls, data: Any) -> Any:
        """A tool_choice that asks for a call needs tools, as OpenAI's API says (the reply would be
        prose); checked before tool_choice is read, so the error names the value as given ("any", True)."""
        if isinstance(data, dict) and not data.get("tools"):
            choice = data.get("tool_choice")
            if tool_choice_value(choice) == "required":
                raise ValueError(tool_choice_problem(choice, ()))
        return data

    @model_validator(mode="after")
    def _constraints(self) -> GenerationParams:
        names = [t["name"] for t in self.tools]
        if (problem := tool_choice_problem(self.tool_choice, names)) is not None:
            raise ValueError(problem)
        if self.response_format is not None and self.tools and self.tool_choice not in ("auto", "none"):
            raise ValueError(
                f"response_format with tools needs tool_choice 'auto' (the reply is then tool calls or the "
                f"response_format's value) or 'none', not {self.tool_choice!r}"
            )
        if self.calls_tools and self.tool_choice != "auto":
            from .tools import CALL_TAG, stop_in_forced_call

            forced = names if self.tool_choice == "required" else [self.tool_choice]
            if (stop := stop_in_forced_call(self.stop, forced)) is not None:
                asked = "a call" if self.tool_choice == "required" else f"a call of {self.tool_choice!r}"  # "any", True or a dict as given may stand for it
                raise ValueError(
                    f"stop={stop!r} would end the reply inside the opening {CALL_TAG!r} of the call it must start with "
                    f"(tool_choice asks for {asked}); leave {stop!r} out of stop"
                )
        return self

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        strings = tuple(value) if isinstance(value, Iterable) and not isinstance(value, (bytes, dict)) else None
        if strings is None or not all(isinstance(s, str) for s in strings):
            raise ValueError("must be a string or a list of strings")
        return strings

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must be non-empty")
        for i, stop in enumerate(value):  # a reply is UTF-8 text: such a stop could never match
            try:
                stop.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"stop[{i}] has an unpaired surrogate {stop[exc.start]!r} at index {exc.start}, which no reply can contain") from None
        if len(value) > MAX_STOPS:  # each is looked for at every token, on the worker every stream shares
            raise ValueError(f"{len(value)} stop strings are more than the {MAX_STOPS} allowed")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def constrained(self) -> bool:
        """Whether a grammar constrains the reply (response_format, or tools not turned off)."""
        return self.response_format is not None or self.calls_tools

    @property
    def text_format(self) -> bool:
        """Whether response_format is a text grammar (regex, structural tag) rather than a JSON schema."""
        return self.response_format is not None and self.response_format.get("type") in TEXT_GRAMMARS

    @property
    def calls_tools(self) -> bool:
        """Whether the reply may call tools (tools given, tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def free_text(self) -> bool:
        """Whether the reply may be plain text (so the plain template's role markers still end it):
        no grammar, tools on "auto" beside free text, or a text grammar (an any_text tag, a permissive
        regex), in which a model may write a next turn as it may unconstrained."""
        return not self.constrained or self.text_format or (self.response_format is None and self.tool_choice == "auto")

    def timed_out(self, since: float, now: float, grace: float = 0.0) -> bool:
        """Whether `timeout` (and `grace` more seconds) passed between `since` (the request's
        submission, time.perf_counter) and `now`."""
        return self.timeout is not None and now - since > self.timeout + grace


def parse_params(**params: Any) -> GenerationParams:
    """Validate request parameters, raising an error that names the parameter, value and rule."""
    parsed = _validated(params)
    _check_grammar(parsed)
    return parsed


async def aparse_params(**params: Any) -> GenerationParams:
    """parse_params for an async caller: a request whose grammar has not been built yet is checked
    in a thread, since the first build of a schema's grammar takes from a tenth of a second (strings
    with maxLength 2000) to seconds, and would stall the event loop; the rest are checked at once."""
    parsed = _validated(params)
    if parsed.constrained:
        from .structured import grammar_known

        if not grammar_known(parsed):
            await asyncio.to_thread(_check_grammar, parsed)
            return parsed
    _check_grammar(parsed)
    return parsed


def checked_tools(tools: Any) -> tuple[dict[str, Any], ...]:
    """`tools` as a request takes them ({name, description, parameters}), or the error it would
    raise: for an adapter that binds tools before any call (no grammar is built here)."""
    return _validated({"tools": tools}).tools


def _validated(params: dict[str, Any]) -> GenerationParams:
    try:
        return GenerationParams(**params)
    except ValidationError as exc:
        raise InvalidParameterError(describe_validation_error(exc)) from None


def _check_grammar(parsed: GenerationParams) -> None:
    """InvalidParameterError where the request's constraint cannot be compiled (structured.grammar_error)."""
    if parsed.constrained:
        from .structured import grammar_error

        error = grammar_error(parsed)
        if error is not None:
            name = "response_format" if parsed.response_format is not None else "tools"
            raise InvalidParameterError(f"invalid {name}: {error}")


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad field: `name=value: what is allowed`. A rule across fields names its own
    parameters, so its message stands alone (the input there is every parameter, tools and all)."""
    lines = []
    for err in exc.errors():
        name = ".".join(str(part) for part in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = sorted(GenerationParams.model_fields)
            lines.append(f"unknown parameter {name!r} (value {shown_value(err['input'])}){did_you_mean(name, known, parameters=True)} (allowed: {', '.join(known)})")
        elif not name:
            lines.append(f"invalid parameters: {msg}")
        else:
            lines.append(f"invalid {name}={shown_value(err['input'])}: {msg}")
    return "; ".join(lines)


def shown_value(value: Any) -> str:
    """A value as an error shows it: its repr, shortened where long (the rule matters more than a long value)."""
    try:
        shown = repr(value)
    except RecursionError:  # a value nested too deeply to show: its error says so
        return "(nested too deeply to show)"
    except Exception as exc:  # a caller's object whose repr fails: the error is about the parameter, not its repr
        return f"(a {type(value).__name__} whose repr raised {type(exc).__name__})"
    return shown if len(shown) <= 120 else shown[:100] + "..."


# Other APIs' names for our parameters (OpenAI, Anthropic, transformers, Ollama, Gemini): spelling
# alone pointed max_completion_tokens at max_draft_tokens.
OTHER_NAMES = {
    "max_completion_tokens": "max_tokens",
    "max_new_tokens": "max_tokens",
    "num_predict": "max_tokens",
    "max_output_tokens": "max_tokens",
    "stop_sequences": "stop",
    "random_seed": "seed",
    "request_timeout": "timeout",
    "repeat_penalty": "repetition_penalty",
    "num_output": "max_tokens",
    "num_ctx": "context_window",
}
# Other APIs' switches for JSON output (OpenAI-compatible servers' json_mode, Ollama's format): here a response_format.
JSON_SWITCHES = ("json_mode", "format")
# Other APIs' options this runtime does not have, and what it offers instead.
NOT_OFFERED = {
    **dict.fromkeys(("api_key", "max_retries"), "a local model has no key and no network call to retry"),
    "n": "one reply per request: send several (batch) for more",
    **dict.fromkeys(
        ("frequency_penalty", "presence_penalty", "min_p", "logit_bias", "typical_p"),
        "sampling takes temperature, top_p, top_k, repetition_penalty and seed",
    ),
    **dict.fromkeys(("logprobs", "top_logprobs"), "replies carry no log probabilities"),
    **dict.fromkeys(
        ("base_url", "api_base", "host", "keep_alive"), "the models run in this process, with no server to reach; they stay loaded until the runtime closes"
    ),
    "num_ctx": "the context window is the models' own; a prompt too long for it is refused, naming its length",
    "stopping_ids": "a reply ends at the model's end-of-turn ids and at stop strings (stop=[...])",
}
# Other APIs' bundles of request parameters: here each is an argument of its own.
BUNDLES = ("additional_kwargs", "model_kwargs", "generate_kwargs", "generation_config")
# The runtime's settings, which no request can change, and where each is set: a call's device or
# max_running had read as a typo ("unknown parameter").
RUNTIME_SETTINGS = {
    **dict.fromkeys(
        ("draft", "base", "draft_model", "base_model", "device", "dtype", "draft_revision", "base_revision", "trust_remote_code"),
        "the models and where they run are chosen once, when they load: WSDChatModel(...)/WSDLLM(...) take draft_model, "
        "base_model, device, dtype, ..., and get_runtime(...) draft, base, device, dtype, ...",
    ),
    **dict.fromkeys(
        ("max_running", "max_cached_tokens", "prefill_chunk", "prefix_cache_tokens", "lookup_tokens"),
        "a limit of the runtime every request shares: runtime.configure(...), or an adapter's wsd_runtime().configure(...)",
    ),
}


def did_you_mean(name: str, known: Iterable[str], parameters: bool = False) -> str:
    """"; did you mean 'x'?" with the known name another API's name stands for, or the known name
    closest to a mistyped one; among request `parameters` (not a tool's keys, say), what an option
    we do not offer means here, or where a runtime setting is set; or "" if none applies."""
    known = list(known)
    if OTHER_NAMES.get(name) in known:
        return f"; did you mean {OTHER_NAMES[name]!r}? (other APIs' name for it)"
    if parameters and name in JSON_SWITCHES and "response_format" in known:
        return "; did you mean response_format={'type': 'json_object'}? (or a JSON schema: {'type': 'json_schema', 'json_schema': {'schema': ...}})"
    if parameters and name in BUNDLES:
        return "; give each request parameter as an argument of its own (temperature=..., top_k=..., stop=...)"
    if parameters and name in NOT_OFFERED:
        return f" (not offered: {NOT_OFFERED[name]})"
    if parameters and name in RUNTIME_SETTINGS:
        return f" (not a request's: {RUNTIME_SETTINGS[name]})"
    # A typo is close to its name; a looser match suggests a parameter that means something else (json_mode: base_model).
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_placement(device: str, dtype: str) -> None:
    """A command line's --device and --dtype as the runtime resolves them, the error naming the
    option (the runtime's names its argument, device=). Imports torch."""
    from .loading import resolve_device, resolve_dtype

    try:
        resolved = resolve_device(device)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"--device: {exc}") from None
    try:
        resolve_dtype(dtype, resolved)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"--dtype: {exc}") from None


def check_option(option: str, **params: Any) -> None:
    """Check request parameters given on a command line, the error naming the `option` they came from."""
    try:
        parse_params(**params)
    except InvalidParameterError as exc:
        raise InvalidParameterError(f"{option}: {exc}") from None
