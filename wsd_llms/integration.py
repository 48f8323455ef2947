"""What both framework adapters share: one definition of their settings, content checks, metadata.

`WSDSettings` is the constructor of `WSDChatModel` and `WSDLLM`: the models, the device, and
the default of every request parameter (the fields of GenerationParams, reused, not copied).
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import importlib.util
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, create_model, field_serializer, field_validator, model_validator

from .errors import InvalidMessagesError, InvalidParameterError, ModelLoadError
from .events import WSDResult
from .loading import check_source, model_source, pinned, resolve_device, resolve_dtype
from .messages import ToolCall
from .params import TEXT_GRAMMARS, GenerationParams, aparse_params, did_you_mean, parse_params, shown_value, tool_choice_value, unwrapped_format
from .runtime import WSDRuntime, get_runtime
from .structured import load_reply_json
from .tools import CALL_TAG, InvalidToolCall, begun_calls, calls_in_order, reads_as_calls, render_invalid_call, text_before_calls

MODEL_PROVIDER = "wsd"


def can_constrain() -> bool:
    """Whether tools and response_format work here: they need xgrammar and jsonschema (the structured extra)."""
    return all(importlib.util.find_spec(name) is not None for name in ("xgrammar", "jsonschema"))


def _reused(decorator: Any) -> Any:
    """One of GenerationParams' field validators, for the same field here (the bound method, reused)."""
    check = decorator.func
    return field_validator(*decorator.info.fields, mode=decorator.info.mode)(classmethod(lambda cls, value: check(value)))


# Where the adapters' defaults differ from a runtime call's. A trailing assistant message in framework
# code is a finished turn (an agent's answer before a handoff or a review step), as OpenAI's models and
# the local peers (ChatHuggingFace, HuggingFaceLLM) read it: the reply is the next turn. A forced start
# (the runtime's default, DESIGN 3.1) is opt-in, continue_final_message=True, by call or constructor.
ADAPTER_DEFAULTS = {"continue_final_message": False}


def _adapter_field(name: str, info: Any) -> Any:
    """A GenerationParams field as an adapter's default: a copy, with the adapters' own default where they differ."""
    field = copy.copy(info)
    if name in ADAPTER_DEFAULTS:
        field.default = ADAPTER_DEFAULTS[name]
    return field


if TYPE_CHECKING:  # what type checkers see: the same fields, each with a default (create_model's class is opaque to them);
    _GenerationDefaults = GenerationParams  # its properties (greedy, calls_tools, ...) too, which the adapters lack
else:
    _GenerationDefaults = create_model(
        "_GenerationDefaults",
        __config__=ConfigDict(protected_namespaces=(), allow_inf_nan=GenerationParams.model_config["allow_inf_nan"]),
        # So that a default takes what a call takes: a pydantic class as response_format, tool_choice=None, ...
        __validators__={
            name: _reused(decorator)
            for name, decorator in GenerationParams.__pydantic_decorators__.field_validators.items()
            if "stop" not in decorator.info.fields
        },
        **{
            name: (info.annotation, _adapter_field(name, info))
            for name, info in GenerationParams.model_fields.items()
            if name != "stop"
        },
    )


# Other integrations' arguments that name a model (ChatOllama's model, HuggingFaceLLM's model_name and tokenizer_name).
MODEL_ARGUMENTS = frozenset({"model", "model_name", "model_id", "tokenizer_name"})


# Per-call arguments that only shape a hosted model's HTTP request, which framework code passes whatever
# the model (LlamaIndex's DocumentContextExtractor sends extra_headers): no request here has them, so
# they are dropped. (extra_body is not: it carries generation parameters, which must not pass unread.)
TRANSPORT_ARGUMENTS = frozenset({"extra_headers", "extra_query"})


class WSDSettings(_GenerationDefaults):
    """Models, device and request defaults; a call may override the request defaults, not the models or device."""

    # What the constructor takes, as type checkers see it (wider than GenerationParams' stored types: the
    # ignores below); the validators store each as the runtime takes it.
    if TYPE_CHECKING:
        draft_model: str | os.PathLike[str] | None = None
        base_model: str | os.PathLike[str] | None = None
        device: str | torch.device = "auto"
        dtype: str | torch.dtype = "auto"
        tools: Sequence[Any] = ()  # type: ignore[assignment]  # the framework's own tools too (framework_tool)
        tool_choice: str | dict[str, Any] | bool | None = "auto"  # type: ignore[assignment]  # OpenAI's and Anthropic's dicts too, as a call's
    else:
        draft_model: str | None = Field(default=None, description="aligned draft model (repo id, directory, .gguf); None = embedded")
        base_model: str | None = Field(default=None, description="base model (repo id, directory, .gguf); None = embedded")
        device: str = Field(default="auto", description="auto, cpu, cuda, cuda:1, ... (or a torch.device)")
        dtype: str = Field(default="auto", description="auto, float32, float16, bfloat16, float64 (or a torch.dtype)")
    draft_revision: str | None = None
    base_revision: str | None = None
    trust_remote_code: StrictBool = Field(default=False, description="run a model repo's own code (a bool, not a string)")
    if TYPE_CHECKING:
        stop: str | Sequence[str] | None = None  # type: ignore[assignment]
    else:  # after trust_remote_code, as it always was: the fields' order is the constructor's signature and a dump's keys
        stop: list[str] | None = Field(default=None, description="strings that end the reply")
    response_format: dict[str, Any] | type[BaseModel] | None = Field(  # type: ignore[assignment]
        default=None, description=f"{GenerationParams.model_fields['response_format'].description}; a pydantic class is kept as given"
    )

    unused_arguments: ClassVar[tuple[str, ...]] = ()
    """Arguments a framework's models conventionally take that mean nothing here: accepted and dropped."""
    refused_arguments: ClassVar[tuple[str, ...]] = ()
    """Fields the framework's base class has that this model refuses a value for: not offered as allowed."""

    @model_validator(mode="before")
    @classmethod
    def _known_arguments(cls, data: Any) -> Any:
        """Refuse an argument this class does not have, naming it: a typo must not pass unnoticed
        (LangChain's models ignore unknown arguments, so `temprature=0.9` would change nothing)."""
        if isinstance(data, Mapping):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = sorted(set(data) - known - set(cls.unused_arguments))
            if unknown:
                offered = known - set(cls.refused_arguments)  # a near miss of a refused one is not offered

                def hint(name: str) -> str:
                    return "; name the models with draft_model and base_model" if name in MODEL_ARGUMENTS else did_you_mean(name, offered, parameters=True)

                allowed = f" (allowed: {', '.join(sorted(set(cls.model_fields) - set(cls.refused_arguments)))})"
                if len(unknown) == 1:
                    raise ValueError(f"unknown argument {unknown[0]!r} (value {shown_value(data[unknown[0]])}){hint(unknown[0])}{allowed}")
                hints = (f"{name!r} (value {shown_value(data[name])}){re.sub('^; ', ': ', hint(name))}" for name in unknown)  # each its own
                raise ValueError(f"unknown arguments {'; '.join(hints)}{allowed}")
            # None is "not given", as in a call (LangChain code passes max_tokens=None and the like)
            data = {
                name: value
                for name, value in data.items()
                if name not in cls.unused_arguments and not (value is None and name in GenerationParams.model_fields)
            }
        return data

    @field_validator("draft_model", "base_model", mode="before")
    @classmethod
    def _model_name(cls, value: Any, info: ValidationInfo) -> Any:
        """A model as the runtime takes it, checked when the model is built as far as that costs nothing
        (a blank name, a path with no model there, a GGUF file transformers cannot read failed only at
        the first call), and a local path as it resolves now (an absolute path): every call finds its
        runtime by this name, and a relative one named another directory, or none, after os.chdir()."""
        if value is None:
            return None
        try:
            source = model_source(info.field_name or "model", value, "")
            check_source(source)
        except (InvalidParameterError, ModelLoadError) as exc:
            raise ValueError(str(exc)) from None
        return pinned(source)

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, value: Any) -> Any:
        """A response_format checked as a call's is; a pydantic class stays itself, not its schema:
        LangChain parses a reply into it, and rebuilds a model from its fields (configurable_fields)."""
        checked = GenerationParams.__pydantic_decorators__.field_validators["_response_format"].func(value)
        return value if isinstance(value, type) and issubclass(value, BaseModel) else checked

    @field_serializer("response_format")
    def _written_as_schema(self, value: Any) -> Any:
        """A pydantic class written as its JSON schema: what a dump (LlamaIndex's to_dict, a cache key) can hold."""
        return unwrapped_format(value) if isinstance(value, type) else value

    @field_validator("tools", mode="before")
    @classmethod
    def _framework_tools(cls, value: Any) -> Any:
        """Constructor tools in the framework's own forms, as its calls take them (framework_tool)."""
        if isinstance(value, (list, tuple)):
            try:
                return [tool if isinstance(tool, dict) else cls.framework_tool(tool, i) for i, tool in enumerate(value)]
            except TypeError as exc:  # a ValidationError naming the field, as pydantic makes of a ValueError
                raise ValueError(str(exc)) from None
        return value

    @classmethod
    def _call_tools(cls, tools: list[Any] | tuple[Any, ...]) -> list[Any]:
        """A call's tools in the framework's forms as dicts, as the constructor's are; one that is no
        such tool stays as given, for the call's check to refuse (this runs for tracing too, which must not raise)."""
        converted = []
        for i, tool in enumerate(tools):
            try:
                converted.append(tool if isinstance(tool, dict) else cls.framework_tool(tool, i))
            except (TypeError, ValueError):  # e.g. a bare function given to LlamaIndex: "tools[i] must be a dict, got function"
                converted.append(tool)
        return converted

    @classmethod
    def framework_tool(cls, tool: Any, index: int) -> Any:
        """One of the framework's tools (not a dict) as the runtime's dict form; here as given, which
        the runtime's check then names as no tool."""
        return tool

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        value = _stops(value) if isinstance(value, str) else value
        if isinstance(value, (list, tuple)):  # as a call's stop is checked (params._stop_nonempty)
            GenerationParams._stop_nonempty(tuple(value))
        return value

    @field_validator("device", "dtype", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        """A torch.device or torch.dtype by its name, as the runtime takes them (they were refused as
        'not a valid string', though HF code passes torch_dtype=torch.bfloat16); None is auto."""
        if value is None:
            return "auto"
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        return str(value) if isinstance(value, torch.device) else value

    @field_validator("device", "dtype")
    @classmethod
    def _resolvable(cls, value: str, info: ValidationInfo) -> str:
        """A device or dtype the runtime can resolve, checked when the model is built, not at its first call."""
        try:
            resolve_device(value) if info.field_name == "device" else resolve_dtype(value, resolve_device("cpu"))
        except (InvalidParameterError, ModelLoadError) as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _defaults_make_a_request(self) -> WSDSettings:
        """Defaults checked together, as a call checks them, when the model is built: a response_format
        that makes no grammar would otherwise fail every call, not the constructor."""
        try:
            parse_params(**self.wsd_params_unchecked())
        except InvalidParameterError as exc:
            raise ValueError(str(exc)) from None
        return self

    def wsd_runtime(self) -> WSDRuntime:
        """The shared runtime for these models (nothing loads until its first request)."""
        return get_runtime(
            self.draft_model,
            self.base_model,
            self.device,
            self.dtype,
            draft_revision=self.draft_revision,
            base_revision=self.base_revision,
            trust_remote_code=self.trust_remote_code,
        )

    def wsd_params(self, stop: Iterable[str] | None = None, **overrides: Any) -> dict[str, Any]:
        """Request parameters: these defaults, then per-call overrides (None means "not given").

        A call's `stop` replaces the constructor's (`stop=[]`: none), as every other parameter does and
        as ChatOpenAI's and LlamaIndex's OpenAI do; a request for a JSON value or a forced tool call
        takes none of the constructor's (the grammar ends the value: a ReAct agent's "Observation:" or a one-line stop
        would cut it short). A call that forces a tool call takes none of the constructor's
        `response_format` either (its reply is the call, not a value). Unknown names raise an error naming them.
        """
        return self.wsd_request(stop, **overrides)[0]

    def wsd_request(self, stop: Iterable[str] | None = None, **overrides: Any) -> tuple[dict[str, Any], GenerationParams]:
        """`wsd_params`, and the same parameters checked, as the runtime will run them (whether a
        reply's calls show is read from these: `{"type": "text"}` is no response_format, say)."""
        params = self.wsd_params_unchecked(stop, **overrides)
        self._refuse_unconverted_tools(params)
        return params, parse_params(**params)  # now, with the parameter's name in the error

    async def awsd_request(self, stop: Iterable[str] | None = None, **overrides: Any) -> tuple[dict[str, Any], GenerationParams]:
        """`wsd_request` for an async call: a schema's grammar is built off the event loop (aparse_params)."""
        params = self.wsd_params_unchecked(stop, **overrides)
        self._refuse_unconverted_tools(params)
        return params, await aparse_params(**params)

    def _refuse_unconverted_tools(self, params: dict[str, Any]) -> None:
        """A call's tool that the framework could not convert (`_call_tools` leaves it as given, for
        tracing) is refused with the framework's reason, as a constructor's is: LlamaIndex's says to
        wrap a function in FunctionTool.from_defaults, where the runtime's check says only "must be a dict"."""
        tools = params.get("tools")
        for i, tool in enumerate(tools if isinstance(tools, (list, tuple)) else ()):
            if not isinstance(tool, dict):
                try:
                    self.framework_tool(tool, i)
                except (TypeError, ValueError) as exc:
                    reason = str(exc)
                    raise InvalidParameterError(reason if f"tools[{i}]" in reason else f"tools[{i}]: {reason}") from None

    def wsd_params_unchecked(self, stop: Iterable[str] | None = None, **overrides: Any) -> dict[str, Any]:
        """`wsd_params` with the values taken as they are (for tracing, before a run checks them)."""
        params = {name: getattr(self, name) for name in GenerationParams.model_fields if name != "stop"}
        if overrides.get("tool_choice") is False:  # unset, as bind_tools(tool_choice=False) leaves it (ChatOpenAI's way)
            overrides = {k: v for k, v in overrides.items() if k != "tool_choice"}
        if isinstance(overrides.get("tools"), (list, tuple)) and not all(isinstance(tool, dict) for tool in overrides["tools"]):
            overrides = {**overrides, "tools": self._call_tools(overrides["tools"])}
        params.update({k: v for k, v in overrides.items() if v is not None and k not in TRANSPORT_ARGUMENTS})
        if not params.get("tools") and overrides.get("tool_choice") is None:
            params["tool_choice"] = "auto"  # a constructor's tool_choice applies when tools come; a call's is checked
        if overrides.get("response_format") is None and any(overrides.get(k) is not None for k in ("tools", "tool_choice")) and _forces_a_call(params):
            params["response_format"] = None  # the call's forced tool call is its reply: not the constructor's value
        if stop is None:
            stop = [] if _asks_for_json(params.get("response_format")) or _forces_a_call(params) else self.stop
        stops = _stops(stop)  # each once; any other value as it is, for the check inside the run to name
        params["stop"] = list(dict.fromkeys(stops)) if isinstance(stops, list) and all(isinstance(s, str) for s in stops) else stops
        return params

    def wsd_model_name(self, mode: str | None = None) -> str:
        """The model a reply in `mode` (by default this model's) is credited to (`model_name`)."""
        runtime = self.wsd_runtime()
        return model_name(mode or self.mode, runtime.draft_source, runtime.base_source)

    def wsd_identity(self) -> dict[str, Any]:
        """Every setting that can change a reply (the models as the runtime resolves them), e.g. for a cache key."""
        runtime = self.wsd_runtime()
        settings = {name: getattr(self, name) for name in WSDSettings.model_fields}
        settings["response_format"] = self._written_as_schema(self.response_format)
        return {**settings, "draft_model": runtime.draft_source, "base_model": runtime.base_source}


def _asks_for_json(response_format: Any) -> bool:
    """Whether a response_format asks for a JSON value (a schema, a pydantic class, json_object), not
    plain text or a text grammar (regex, structural tag)."""
    if isinstance(response_format, type):
        return True
    return isinstance(response_format, Mapping) and response_format.get("type") not in ("text", *TEXT_GRAMMARS)


def _forces_a_call(params: Mapping[str, Any]) -> bool:
    """Whether a request must call a tool (tool_choice required, any or a name, in any of the forms
    tool_choice_value reads): its reply is a call, whose JSON the grammar ends (LangChain's
    function_calling structured output)."""
    return bool(params.get("tools")) and tool_choice_value(params.get("tool_choice")) not in ("auto", "none")


def _stops(value: Any) -> Any:
    """Stop strings as a list: one string is one stop (not one stop per character); a value that is
    neither comes back as given, for the check to name (`invalid stop=5: must be a string or a list of strings`)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping)):
        return list(value)
    return value


class ShownText:
    """What a stream shows of a reply, in (text, source) runs that join to the reply's content.

    While the request's tools are on (`calls_tools`: the runtime takes call markup out of the
    content; not with tool_choice="none", where text streams as it comes), text shows up to the first `<tool_call>`; a
    trailing partial tag, and the whitespace before it, wait until they are ruled out (the content
    drops both), so an answer streams as it is written and call markup never shows. Beside a
    response_format only a reply that starts as calls do (or may yet) is read as calls
    (tools.reads_as_calls): a value streams whole, whatever its strings hold. Otherwise text shows
    as it comes.
    """

    def __init__(self, params: GenerationParams) -> None:
        self.hide_calls, self.with_format = params.calls_tools, params.response_format is not None
        self.pieces: list[tuple[str, str]] = []  # (text, source) as written
        self.raw = ""
        self.shown = ""
        self._next = (0, 0)  # the first piece not wholly shown, and where it starts in raw

    def add(self, text: str, source: str) -> list[tuple[str, str]]:
        """Take the next piece of the reply; returns the text that now shows."""
        self.pieces.append((text, source))
        self.raw += text
        calls = self.hide_calls and (reads_as_calls(self.raw, self.with_format) or CALL_TAG.startswith(self.raw.lstrip()))
        return self._show(text_before_calls(self.raw) if calls else self.raw)

    def finish(self, content: str) -> list[tuple[str, str]]:
        """At the reply's end, the rest of its `content` (the text without call markup)."""
        if self.raw.startswith(content):
            return self._show(content)
        if not content.startswith(self.shown):  # not met: the shown text is the content's start
            raise RuntimeError(f"internal error: shown text {self.shown!r} does not start the reply's content {content!r}")
        rest = content[len(self.shown) :]
        self.shown = content
        return [(rest, self.last_source)] if rest else []

    @property
    def last_source(self) -> str:
        """The model that wrote the reply's latest piece ("draft" before any)."""
        return self.pieces[-1][1] if self.pieces else "draft"

    def _show(self, text: str) -> list[tuple[str, str]]:
        """The runs of `text` past what has shown, each with the model that wrote it."""
        if len(text) <= len(self.shown):
            return []
        runs: list[tuple[str, str]] = []
        index, start = self._next
        while index < len(self.pieces) and start < len(text):
            piece, source = self.pieces[index]
            lo, hi = max(start, len(self.shown)), min(start + len(piece), len(text))
            if lo < hi:
                if runs and runs[-1][1] == source:
                    runs[-1] = (runs[-1][0] + text[lo:hi], source)
                else:
                    runs.append((text[lo:hi], source))
            if start + len(piece) > len(text):
                break
            index, start = index + 1, start + len(piece)
        self._next, self.shown = (index, start), text
        return runs


@dataclasses.dataclass(frozen=True)
class CallDelta:
    """A piece of a tool call being written: the call's position among the reply's calls (LangChain's
    `index`), its id and name on its first piece only, and the arguments' JSON text written since its last."""

    index: int
    id: str | None
    name: str | None
    args: str


@dataclasses.dataclass(frozen=True)
class FinalCall:
    """One of a finished reply's calls, valid or not, with the id it streamed under (if it did) and
    its position; `args`: the arguments' text a streamed valid call has yet to show; `written`: a
    valid call's arguments' JSON text as the reply wrote them (where it has the grammar's form)."""

    index: int
    call: ToolCall | InvalidToolCall
    streamed: bool
    args: str
    written: str | None = None


class ShownCalls:
    """A reply's tool calls as they are written, as OpenAI streams them: a call shows, with a new id,
    once its name is written, then its arguments' JSON text as the model writes it (so a UI shows
    them, and a partial parse of the arguments grows). Calls show while tools are on, and beside a
    response_format only in a reply that starts with one (tools.reads_as_calls). Whether a call is
    valid is known at the end (`finish`): a call cut short by max_tokens, or off its schema, streamed
    as far as it was written and is then reported invalid under the same id."""

    def __init__(self, params: GenerationParams) -> None:
        self.on, self.with_format = params.calls_tools, params.response_format is not None
        self.calls: dict[int, tuple[str, str, str]] = {}  # index -> (id, name, arguments text shown)

    @property
    def shown(self) -> list[tuple[str, str, str]]:
        """The calls shown so far, in order: (id, name, arguments' text so far)."""
        return [self.calls[index] for index in sorted(self.calls)]

    def add(self, raw: str) -> list[CallDelta]:
        """The calls' pieces the reply so far (`raw`, all its text) adds."""
        if not self.on or not reads_as_calls(raw, self.with_format):
            return []
        deltas = []
        for index, begun in enumerate(begun_calls(raw)):
            if begun is None:
                continue
            name, args = begun
            if index not in self.calls:
                call_id = f"call_{uuid.uuid4().hex[:24]}"
                self.calls[index] = (call_id, name, args)
                deltas.append(CallDelta(index, call_id, name, args))
            elif len(args) > len(shown := self.calls[index][2]):
                self.calls[index] = (*self.calls[index][:2], args)
                deltas.append(CallDelta(index, None, None, args[len(shown) :]))
        return deltas

    def finish(self, result: WSDResult) -> list[FinalCall]:
        """The reply's calls in the order it wrote them, each with the id it streamed under."""
        if not (result.tool_calls or result.invalid_tool_calls):
            return []
        begun = begun_calls(result.text)
        final = []
        for index, call in enumerate(calls_in_order(result.text, result.tool_calls, result.invalid_tool_calls)):
            begun_here = begun[index] if index < len(begun) and isinstance(call, ToolCall) else None
            written = begun_here[1] if begun_here is not None else None
            if index not in self.calls:
                final.append(FinalCall(index, call, False, "", written))
                continue
            call_id, _, shown = self.calls[index]
            rest = written[len(shown) :] if written is not None else ""
            final.append(FinalCall(index, dataclasses.replace(call, id=call_id), True, rest, written))
        return final


# Blocks of reasoning that other providers' messages carry (OpenAI, Anthropic): not conversation text.
REASONING_BLOCKS = ("reasoning", "thinking", "redacted_thinking")


def content_to_text(content: Any, where: str, skip: tuple[type, ...] = (), readable: str = "blocks of type 'text' or 'text-plain'") -> str:
    """A message's content as text: a string, or a list of text blocks (LangChain's plain-text
    documents, "text-plain", among them) joined with newlines (as
    LlamaIndex's `ChatMessage.content`, Ollama and vLLM join them: a context block and a question
    block must not run together). Another model's reasoning blocks are left out, and so are blocks
    of the `skip` types (an adapter's own kinds of such blocks); a block of plain data (a tool
    result, untyped or LangChain's {"type": "json", "json": ...}) is written as JSON, and any other
    block (an image, say) gets a clear error that gives its place among all the blocks and names
    the blocks it could have been (`readable`, in the adapter's framework's words)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable) and not isinstance(content, (bytes, Mapping)):
        parts = []
        for i, block in enumerate(content):
            if isinstance(block, skip):
                continue
            if isinstance(block, str):
                parts.append(block)
                continue
            kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
            if kind == "text" and isinstance(block, Mapping):
                text = block.get("text")
                if text is None:  # a provider's empty block: no text, not the word "None"
                    continue
                if not isinstance(text, str):
                    raise InvalidMessagesError(f"{where} content block {i} is a text block whose text is a {type(text).__name__}, not a str")
                parts.append(text)
            elif kind == "text-plain" and isinstance(block, Mapping):  # LangChain's plain-text document
                parts.append(_plain_text(block, f"{where} content block {i}"))
            elif kind in REASONING_BLOCKS:
                continue
            elif kind is None and isinstance(block, Mapping):
                parts.append(json.dumps(block, ensure_ascii=False, default=str))
            elif kind == "json" and isinstance(block, Mapping) and "json" in block:  # LangChain's tool-result data block
                parts.append(json.dumps(block["json"], ensure_ascii=False, default=str))
            else:
                hint = "; a tool's result is a tool message of its own, answering its call's id" if kind == "tool_result" else ""  # Anthropic's form
                raise InvalidMessagesError(
                    f"{where} content block {i} has type {kind!r}; this model reads text only ({readable}){hint}"
                )
        return "\n".join(parts)
    raise InvalidMessagesError(f"{where} content must be text, got {type(content).__name__}")


def _plain_text(block: Mapping[str, Any], where: str) -> str:
    """A plain-text document block's text, given as `text` or as base64 (UTF-8); one that only
    points at its text (a url or file_id) cannot be read by a local model that fetches nothing."""
    text = block.get("text")
    if isinstance(text, str):
        return text
    data = block.get("base64")
    if isinstance(data, str):
        try:
            return base64.b64decode(data, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise InvalidMessagesError(f"{where} is a 'text-plain' block whose base64 is not UTF-8 text in base64: {exc}") from exc
    given = sorted(key for key in ("url", "file_id") if key in block)
    raise InvalidMessagesError(
        f"{where} is a 'text-plain' block with no text (it has {', '.join(given) or 'none'}); give its text as 'text' or "
        "'base64': this model fetches nothing"
    )


class HistoryResults:
    """The tool results of a history as an adapter sends them: with the id of the call each answers,
    except a result of a call its turn shows as text (an invalid call), which goes without its id,
    before the results with one, since the turn's text shows those calls before its calls: each
    answers its call by place, and none is taken for a result that names no call."""

    def __init__(self) -> None:
        self.written: set[Any] = set()  # the ids of the calls the latest turn shows as text
        self.start = 0  # where the results after that turn begin

    def turn(self, out: list[dict[str, Any]], written: Iterable[Any] = ()) -> None:
        """A turn that is not a result was just sent; `written`: the ids of the calls it shows as text."""
        self.written, self.start = set(written) - {None}, len(out)

    def add(self, out: list[dict[str, Any]], content: str, call_id: Any) -> None:
        """Send a result, of the call named `call_id` (None: of none by id, a ReAct observation)."""
        if call_id is not None and call_id in self.written:
            at = self.start
            while at < len(out) and "tool_call_id" not in out[at]:
                at += 1
            out.insert(at, {"role": "tool", "content": content})
        else:
            out.append({"role": "tool", "content": content} | ({} if call_id is None else {"tool_call_id": call_id}))


def with_invalid_calls(text: str, calls: Iterable[tuple[str | None, str | None]]) -> str:
    """An assistant turn's text with the invalid tool calls it made, (name, raw text) each, as they
    were written (tools.render_invalid_call). A history answers them (LangChain's agents give each
    an error result), so the model sees what it answers, as ChatOpenAI sends them back."""
    return "\n".join([*([text] if text.strip() else []), *(render_invalid_call(name, raw) for name, raw in calls)])


def cut_short(metadata: Mapping[str, Any]) -> bool:
    """Whether a reply's metadata (`result_metadata`) says its budget or a stop string ended it."""
    return metadata.get("finish_reason") == "length" or metadata.get("stop_reason") is not None


def repeated_key_error(metadata: Mapping[str, Any], content: str) -> str | None:
    """Why a reply with a parse_error (`result_metadata`) writes a key twice, or None: a pydantic
    class's validation, which decides for it in both adapters, keeps the key's last value and
    drops the others without a word."""
    if not metadata.get("parse_error"):
        return None
    try:
        return load_reply_json(content)[1]
    except ValueError:  # not JSON: pydantic's validation says so
        return None


def model_name(mode: str, draft: str, base: str) -> str:
    """The model a reply in `mode` is credited to (logs, tracing, cost accounting): the draft model
    when it ran alone, else the base model, which checks every reply and writes its rest."""
    return draft if mode == "draft" else base


def result_metadata(result: WSDResult) -> dict[str, Any]:
    """Response metadata both adapters attach to the final chunk / response (`parse_error`: why a
    response_format reply does not fit its schema, when it does not). A reply that ended with its
    calls finishes with "tool_calls", as OpenAI's (and vLLM's) do; one cut short stays "length"."""
    calls = result.finish_reason == "stop" and bool(result.tool_calls or result.invalid_tool_calls)
    return {
        "model_name": model_name(result.mode, result.draft_model, result.base_model),
        "model_provider": MODEL_PROVIDER,
        "finish_reason": "tool_calls" if calls else result.finish_reason,
        **({"parse_error": result.parse_error} if result.parse_error is not None else {}),
        **({"stop_reason": result.stop_reason} if result.stop_reason is not None else {}),
        "wsd": {
            "switched": result.switched,
            "switch_point": result.switch_point,
            "kept_draft_tokens": result.usage.kept_draft_tokens,
            "draft_model": result.draft_model,
            "base_model": result.base_model,
            "mode": result.mode,
            "timings": {
                "ttft_s": result.timings.ttft,
                "draft_s": result.timings.draft,
                "scoring_s": result.timings.scoring,
                "base_s": result.timings.base,
                "total_s": result.timings.total,
            },
        },
    }


def openai_usage(usage: Mapping[str, Any]) -> dict[str, int]:
    """Token counts (usage_counts', or LangChain's usage_metadata) in OpenAI's keys, where callback
    handlers written for OpenAI read them: LangChain's llm_output, LlamaIndex's additional_kwargs."""
    return {"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"], "total_tokens": usage["total_tokens"]}


def usage_counts(result: WSDResult) -> dict[str, Any]:
    """Input/output/total tokens of the model that writes the reply (the base; the draft with
    mode="draft"), in its tokenizer, with the draft model's counts; `cache_read_tokens`: the input
    tokens taken from the prefix cache (for the draft, in its own)."""
    u = result.usage
    prompt, cached = (u.draft_prompt_tokens, u.draft_cached_prompt_tokens) if result.mode == "draft" else (u.base_prompt_tokens, u.base_cached_prompt_tokens)
    return {
        "input_tokens": prompt,
        "output_tokens": u.reply_tokens,
        "total_tokens": prompt + u.reply_tokens,
        "cache_read_tokens": cached,
        "draft": {
            "input_tokens": u.draft_prompt_tokens,
            "cache_read_tokens": u.draft_cached_prompt_tokens,
            "output_tokens": u.draft_tokens,
            "kept_tokens": u.kept_draft_tokens,
        },
        "base": {"continuation_tokens": u.base_tokens},
    }
