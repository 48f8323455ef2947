"""`WSDChatModel`: Weak-to-Strong Decoding as a LangChain chat model, on the shared wsd-llms runtime."""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from contextlib import aclosing, closing
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, cast, overload

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel, LangSmithParams, generate_from_stream
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGenerationChunk, ChatResult, Generation
from langchain_core.runnables import Runnable, RunnableConfig, RunnableGenerator, RunnableMap
from langchain_core.runnables.config import get_config_list
from langchain_core.runnables.utils import AddableDict
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from langchain_core.utils.utils import LC_ID_PREFIX
from pydantic import BaseModel, Field, ValidationError
from typing_extensions import is_typeddict

from langchain_wsd.errors import langchain_errors
from wsd_llms import FinalEvent, InvalidMessagesError, InvalidParameterError, TextDelta, WSDResult, WSDRuntime
from wsd_llms.encoding import encode_text
from wsd_llms.messages import ALLOWED_ROLES, ARGUMENT_KEYS, ID_KEYS, ToolCall, canonical_role, read_tool_call
from wsd_llms.params import TEXT_GRAMMARS, GenerationParams, checked_tools, tool_choice_problem, tool_choice_value, unwrapped_format
from wsd_llms.tools import is_function_tool, tool_name
from wsd_llms.integration import CallDelta, FinalCall, HistoryResults, ShownCalls, ShownText, WSDSettings, can_constrain, content_to_text, cut_short, model_name, openai_usage, repeated_key_error, result_metadata, usage_counts, with_invalid_calls

# A call's run manager, sync or async (`_tokens_to` hands back the one it is given).
_RunManager = TypeVar("_RunManager", CallbackManagerForLLMRun, AsyncCallbackManagerForLLMRun)
_Model = TypeVar("_Model", bound=BaseModel)



class WSDChatModel(WSDSettings, BaseChatModel):
    """Weak-to-Strong Decoding chat model: a small aligned draft model starts each reply, a base
    model checks it and, where it confidently agrees, takes over and writes the rest.

    With no models named it runs the embedded default pair. Construction is instant; the models load
    on the first call, once per process for each model pair (instances with the same models share
    one runtime). Every request parameter (max_tokens, sampling, switch settings, mode, ...) set in
    the constructor can be overridden per call (`invoke(..., x=...)` or `.bind(x=...)`); a call's
    `stop` replaces the constructor's (`stop=[]` clears it). A per-call `model` must name the base model (the draft model with mode="draft").

    Streamed chunks:

    - each text chunk carries `response_metadata["wsd_source"] == ["draft"]` or `["base"]`: the model
      that wrote it (a one-item list, so aggregated messages hold one entry per text chunk, in order);
    - the last chunk (`chunk_position="last"`, no text) carries `usage_metadata` and the response
      metadata: `model_name` (the base model; the draft model with mode="draft"), `model_provider="wsd"`, `finish_reason`, and `wsd`
      (switch point, kept draft tokens, draft and base models, mode, timings).

    `usage_metadata` counts input, output and total tokens in the base tokenizer (the draft's with
    mode="draft"). Its details add the draft model's side: `input_token_details["draft"]` (draft
    prompt, draft tokenizer), `output_token_details["draft"]` (tokens the draft model wrote, draft
    tokenizer), `["kept_draft"]` and `["base"]` (the reply's draft-written and base-written parts,
    in the reply's tokens: they add up to `output_tokens`).

    Tools (`bind_tools`) and structured output (`with_structured_output`) use the runtime's constrained
    decoding. While tools are bound, text streams up to any call markup (which never reaches the
    content), and each call streams as OpenAI's do: a `tool_call_chunks` entry with its `index`, id
    and name once its name is written, then its arguments' JSON text as it is written. A call that
    does not parse or validate (cut short by max_tokens, say) has its error in the last chunk's
    `response_metadata["tool_call_errors"]` (by id), and an invoked message lists it in
    `invalid_tool_calls` (a call that never showed, with its raw text as arguments).

    A failed call raises LangChain's standard model error of its kind (`ContextOverflowError` for a
    prompt that does not fit, ...; see `langchain_wsd.errors`), which is still the wsd-llms error.
    `batch` sends its inputs to the runtime at once, up to its `max_running`.
    """

    streaming: bool = Field(default=False, description="stream by default when invoked (LangChain convention)")

    # LangChain's standard arguments for hosted models (its standard tests pass them): code written
    # for one runs unchanged, though a local model has no key and nothing to retry.
    # `stream_usage` (ChatOpenAI's and others'): usage always comes on the last chunk here.
    unused_arguments: ClassVar[tuple[str, ...]] = ("api_key", "max_retries", "stream_usage")
    if TYPE_CHECKING:  # taken and dropped, as type checkers see them
        api_key: Any = None
        max_retries: Any = None
        stream_usage: Any = None

    @classmethod
    def framework_tool(cls, tool: Any, index: int) -> dict[str, Any]:
        """A constructor tool in any form bind_tools takes (`@tool` objects, functions, pydantic classes), as it converts them."""
        return _openai_tool(tool)

    @property
    def _llm_type(self) -> str:
        return "wsd-chat"

    def _parse_class(self, kwargs: dict[str, Any], params: dict[str, Any]) -> Any:
        """The pydantic class a reply is parsed into, if any: the call's response_format, else the
        constructor's where it applies (not to a call that forces a tool call, say)."""
        if kwargs.get("response_format") is not None:
            return kwargs["response_format"]
        kept = self.response_format  # a pydantic class stays one (WSDSettings)
        return kept if isinstance(kept, type) and params.get("response_format") is not None else None

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Every setting that can change a reply: LangChain's LLM caches key on these."""
        return self.wsd_identity()

    def _resolve_model_profile(self) -> ModelProfile:
        """What these models take and give, for LangChain: `create_agent(..., response_format=Schema)`
        picks native structured output (constrained decoding) from `structured_output`, and
        summarization middleware reads `max_input_tokens`. The window is read from the models'
        configs when that costs nothing (not before the first load converts a GGUF or embedded model)."""
        constrain = can_constrain()
        profile = ModelProfile(
            open_weights=True,
            text_inputs=True,
            image_inputs=False,
            image_url_inputs=False,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            text_outputs=True,
            image_outputs=False,
            audio_outputs=False,
            video_outputs=False,
            reasoning_output=False,
            tool_calling=constrain,
            tool_choice=constrain,
            tool_call_streaming=constrain,
            structured_output=constrain,
            temperature=True,
        )
        window = self.wsd_runtime().known_context_window(self.mode)
        if window is not None:  # a reply needs one position at least; get_num_tokens_from_messages measures against this
            profile["max_input_tokens"] = window - 1
        return profile

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids in the tokenizer `usage_metadata` counts in: the base model's, the draft's with
        mode="draft" (LangChain's default would fetch GPT-2's from the hub), with text that spells a special token counted as
        the text it is, as in a prompt; reads the tokenizer only, not the weights. A
        `custom_get_token_ids` given to the constructor counts instead, as in every LangChain model."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        with langchain_errors():  # a tokenizer that cannot load is a ModelNotFoundError, as in a call
            return encode_text(self.wsd_runtime().tokenizer(model_name(self.mode, "draft", "base")), text)  # the credited model's

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[dict[str, Any] | type | Callable | BaseTool] | None = None
    ) -> int:
        """The messages' length against `profile["max_input_tokens"]`, so that `trim_messages(token_counter=llm)`
        keeps a prompt that fits: the real prompts, templates and the tools' block included (a
        trailing AIMessage counts too, as a whole turn), in the tokens of the model whose
        window they fill most (`WSDRuntime.window_tokens`; the draft's on the embedded pair, where
        `usage_metadata["input_tokens"]` counts the base's). Reads the tokenizers only. (LangChain's
        default counts a plain transcript in GPT-2 tokens.)"""
        formatted = [_openai_tool(t) for t in tools or ()]  # as bind_tools sends them
        with langchain_errors():  # messages that make no prompt fail as they would in a call
            return self.wsd_runtime().window_tokens(to_runtime_messages(messages), **self.wsd_params(tools=formatted or None))

    def _get_invocation_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        """The call's parameters with the stop strings it runs with (LangChain puts the call's own
        `stop`, None when not given, over the constructor's): LLM caches key on these, so a model
        with `stop=[...]` never shares an entry with one without."""
        params = super()._get_invocation_params(stop=stop, **kwargs)
        params["stop"] = self.wsd_params_unchecked(stop, **kwargs)["stop"]
        return params

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        # Called before the run's callbacks start: values are checked inside the run, so a bad one
        # reaches on_llm_error like any other failure.
        model = kwargs.pop("model", None)
        params = self.wsd_params_unchecked(stop, **_without_flags(kwargs))
        ls_params = LangSmithParams(
            ls_provider="wsd",
            ls_model_name=model or self.wsd_model_name(params["mode"]),
            ls_model_type="chat",
            ls_temperature=params["temperature"],
            ls_max_tokens=params["max_tokens"],
        )
        if params["stop"]:
            ls_params["ls_stop"] = params["stop"]
        return ls_params

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[WSDRuntime, list[dict[str, str]], dict[str, Any], GenerationParams]:
        """The runtime, its messages and the request parameters for one call, and the same checked."""
        runtime, runtime_messages, kwargs = self._target(messages, kwargs)
        return runtime, runtime_messages, *self.wsd_request(stop=stop, **kwargs)

    async def _arequest(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[WSDRuntime, list[dict[str, str]], dict[str, Any], GenerationParams]:
        """`_request` for an async call: a schema's grammar is built off the event loop (awsd_request)."""
        runtime, runtime_messages, kwargs = self._target(messages, kwargs)
        return runtime, runtime_messages, *await self.awsd_request(stop=stop, **kwargs)

    def _target(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> tuple[WSDRuntime, list[dict[str, str]], dict[str, Any]]:
        """The runtime and its messages for one call, and the call's own request parameters.

        LangChain's own `stream` flag (and `stream_usage`) is dropped; a per-call `model` must name the
        base model, or with mode="draft" the draft model (what `model_name` reports).
        """
        kwargs = _without_flags(kwargs)
        model = kwargs.pop("model", None)
        runtime = self.wsd_runtime()
        if model is not None and model not in (runtime.base_source, self.wsd_model_name(kwargs.get("mode"))):
            raise InvalidParameterError(
                f"model={model!r}: this WSDChatModel runs base model {runtime.base_source!r} and cannot switch "
                "models per call; build a WSDChatModel(base_model=...) for that model"
            )
        return runtime, to_runtime_messages(messages), kwargs

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        with langchain_errors():
            runtime, runtime_messages, params, checked = self._request(messages, stop, kwargs)
            chunks = _Chunks(checked, self._parse_class(kwargs, params))
            with closing(runtime.stream(runtime_messages, **params)) as events:  # a caller that stops early ends the request now
                for event in events:
                    for chunk in chunks.add(event):
                        if run_manager:
                            run_manager.on_llm_new_token(chunk.text, chunk=_with_run_id(chunk, run_manager))
                        yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        with langchain_errors():
            runtime, runtime_messages, params, checked = await self._arequest(messages, stop, kwargs)
            chunks = _Chunks(checked, self._parse_class(kwargs, params))
            async with aclosing(runtime.astream(runtime_messages, **params)) as events:
                async for event in events:
                    for chunk in chunks.add(event):
                        if run_manager:
                            await run_manager.on_llm_new_token(chunk.text, chunk=_with_run_id(chunk, run_manager))
                        yield chunk

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        """BaseChatModel.stream, whose reply, where streaming is off, is one last chunk (_as_last_chunk).
        Closing this (in the thread that reads it: a generator refuses a close() while a next() runs)
        closes it at once: the run ends (on_llm_error) and so does the request."""
        inner = cast(Generator[AIMessageChunk, None, None], super().stream(input, config, stop=stop, **kwargs))  # typed Iterator, written as a generator
        with closing(inner) as chunks:
            for chunk in chunks:
                yield _as_last_chunk(chunk)

    async def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        """Async stream, as `stream`; `aclose()` returns once the run and the request have ended (the
        inner stream was left to asyncio's finalizer, a loop turn or more later)."""
        inner = cast(AsyncGenerator[AIMessageChunk, None], super().astream(input, config, stop=stop, **kwargs))  # as in stream
        async with aclosing(inner) as chunks:
            async for chunk in chunks:
                yield _as_last_chunk(chunk)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _with_llm_output(generate_from_stream(self._stream(messages, stop, self._tokens_to(run_manager, kwargs), **kwargs)))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks = [chunk async for chunk in self._astream(messages, stop, self._tokens_to(run_manager, kwargs), **kwargs)]
        return _with_llm_output(generate_from_stream(iter(chunks)))

    def _combine_llm_outputs(self, llm_outputs: list[dict[str, Any] | None], /) -> dict[str, Any]:
        """`generate`'s llm_output for several prompts: their token usage summed (as ChatOpenAI's),
        with the model of the first."""
        outputs = [output for output in llm_outputs if output]
        if not outputs:
            return {}
        usage = {key: sum(output["token_usage"][key] for output in outputs) for key in outputs[0]["token_usage"]}
        return {**outputs[0], "token_usage": usage}

    def _tokens_to(self, run_manager: _RunManager | None, kwargs: dict[str, Any]) -> _RunManager | None:
        """Who hears each token of a call LangChain did not stream: its callbacks (as ChatOllama's),
        unless the caller turned streaming off (disable_streaming, streaming=False, stream=False), so
        that a LangGraph "messages" stream then sees one whole message, not its tokens."""
        return None if self._streaming_disabled(**kwargs) else run_manager

    def _streaming_disabled(self, **kwargs: Any) -> bool:
        """LangChain's opt-outs of streaming, with the constructor's tools counted as a call's for
        `disable_streaming="tool_calling"` (LangChain looks only at a call's)."""
        return super()._streaming_disabled(**{**kwargs, "tools": self.tools if kwargs.get("tools") is None else kwargs["tools"]})

    # Every path on which LangChain makes one message of a reply goes through these two: _generate, and
    # its aggregating _stream's chunks for an invoke (streaming=True, a model invoked under
    # astream_events or a streaming callback), before on_llm_end sees the result. Chunks a caller of
    # llm.stream/astream/astream_events sums do not: there a call cut short stays in tool_calls with its
    # arguments parsed as far as they go (as ChatOpenAI's), and the last chunk's tool_call_errors names it.
    def _generate_with_cache(self, *args: Any, **kwargs: Any) -> ChatResult:
        return _with_call_errors(super()._generate_with_cache(*args, **kwargs))

    async def _agenerate_with_cache(self, *args: Any, **kwargs: Any) -> ChatResult:
        return _with_call_errors(await super()._agenerate_with_cache(*args, **kwargs))

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """`invoke` on every input at once, up to the runtime's `max_running`, which batches them
        into shared forward passes; LangChain's default thread pool runs min(32, CPUs + 4) at a time
        (6 on a 2-core machine). A `max_concurrency` in the config still sets the number."""
        if not inputs:
            return []
        return super().batch(inputs, self._all_at_once(config, len(inputs)), return_exceptions=return_exceptions, **kwargs)  # type: ignore[return-value]

    def batch_as_completed(  # type: ignore[override]
        self,
        inputs: Sequence[LanguageModelInput],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> Iterator[tuple[int, AIMessage | Exception]]:
        """`batch`, each result as it finishes."""
        if not inputs:
            return iter(())
        configs = self._all_at_once(config, len(inputs))  # type: ignore[arg-type]
        return super().batch_as_completed(inputs, configs, return_exceptions=return_exceptions, **kwargs)  # type: ignore[call-overload]

    def _all_at_once(self, config: RunnableConfig | list[RunnableConfig] | None, count: int) -> list[RunnableConfig]:
        """The call's configs, with `max_concurrency` set to as many as the runtime runs at once where it is not set."""
        limit = min(count, self.wsd_runtime().limits["max_running"] or count)
        configs = get_config_list(config, count)
        return [c if c.get("max_concurrency") is not None else {**c, "max_concurrency": limit} for c in configs]  # type: ignore[typeddict-item]

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (pydantic models, functions, `@tool` objects, dicts) for the runtime's tool calling.

        `tool_choice`: "auto", "any" / "required" / True (at least one call), "none", or a tool name
        (also as `{"type": "function", "function": {"name": ...}}`); None or False keeps the model's default.
        Calls are always decoded under their tools' schemas, so `strict` (as OpenAI's) changes nothing.
        """
        formatted = [_openai_tool(t) for t in tools]
        bound: dict[str, Any] = {"tools": formatted, **kwargs}
        with langchain_errors():  # ModelInvalidRequestError, as a call's own bad tools or tool_choice are
            names = [name for name in map(tool_name, formatted) if name is not None]  # OpenAI's Responses API's tools are flat
            if len(names) < len(formatted) or not all(map(is_function_tool, formatted)):  # a nameless tool, or a provider's own:
                checked_tools(formatted)  # refused with the call's error, here
            if tool_choice is not None and tool_choice is not False:  # False leaves it unset, as in ChatOpenAI
                if (problem := tool_choice_problem(tool_choice, names, "bound")) is not None:
                    raise InvalidParameterError(problem)
                bound["tool_choice"] = tool_choice_value(tool_choice)
        if parallel_tool_calls is not None:
            bound["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(**bound)

    @overload
    def with_structured_output(
        self,
        schema: type[_Model],
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: Literal[False] = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, _Model]: ...

    @overload
    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]: ...

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Replies parsed into `schema` (pydantic class -> instance; TypedDict or JSON schema -> dict).

        `json_schema` (default) constrains the reply to the schema; `function_calling` forces one call
        of the schema as a tool; `json_mode` constrains the reply to a JSON object, held to `schema`
        too when one is given (a local decoder can, so the parse cannot fail on a missing key).
        Decoding is always constrained, so `strict` changes nothing, and the grammar ends the value:
        the model's own stops do not apply (a call's `stop` still cuts a JSON value, though not the
        markup of `function_calling`'s call; see WSDSettings.wsd_params).
        `include_raw=True` gives
        `{"raw", "parsed", "parsing_error"}`. The value is the whole reply: the constructor's tools (with
        `json_schema`, `json_mode`) and response_format (`function_calling`) are left out. A conversation that ends with an AIMessage is read as
        it stands (`continue_final_message=False`): the value is a new turn, as LangGraph's
        `create_react_agent(..., response_format=...)` asks for it after the agent's last answer.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments for with_structured_output: {sorted(kwargs)}")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ValueError(f"method={method!r}: use 'json_schema', 'function_calling' or 'json_mode'")
        if schema is None and method != "json_mode":
            raise ValueError(f"method={method!r} needs a schema")
        _check_schema(schema)
        if isinstance(schema, dict) and schema.get("type") in TEXT_GRAMMARS:  # its reply is text: no JSON parses out of it
            raise ValueError(
                f"a {schema['type']} format is a text grammar, not a JSON schema: its reply is text, which "
                f"with_structured_output cannot parse; use model.bind(response_format={{'type': {schema['type']!r}, ...}})"
            )
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        parser: Runnable
        if method == "function_calling":  # as BaseChatModel does, but a reply without a valid call fails the parse (it gave None)
            assert schema is not None
            llm = self.bind_tools(
                [schema], tool_choice="any", continue_final_message=False, ls_structured_output_format={"kwargs": {"method": method}, "schema": schema}
            )  # (the call forces a call, so the constructor's response_format is left out: WSDSettings.wsd_params)
            name = tool_name(_openai_tool(schema))  # a flat OpenAI function too; bind_tools refused a nameless one
            assert name is not None
            parser = _PydanticCall(tools=[schema], first_tool_only=True) if pydantic else _KeyCall(key_name=name, first_tool_only=True)  # type: ignore[list-item]
        else:
            json_schema = _json_schema(schema) if schema is not None else None
            traced = convert_to_json_schema(schema) if isinstance(schema, type) else json_schema  # as LangChain traces a class
            llm = self.bind(
                response_format=json_schema if json_schema is not None else {"type": "json_object"},
                tools=[],
                continue_final_message=False,
                ls_structured_output_format={"kwargs": {"method": method}, "schema": traced},
            )
            parser = _SchemaPydanticParser(pydantic_object=schema) if pydantic else _SchemaJsonParser()  # type: ignore[arg-type]
        if not include_raw:
            return llm | parser
        return RunnableMap(raw=llm) | _with_parsed(parser)


def _with_parsed(parser: Runnable) -> Runnable:
    """include_raw's last step: the model's message streams through as `raw`, then its parse comes
    as `parsed` and `parsing_error` (the parse's exception, caught, or None). LangChain's own form
    (`with_fallbacks(exception_key="parsing_error")`) catches a failure only before the first chunk,
    so a stream whose parse failed at its end raised where invoke gave the error."""

    def outcome(raw: BaseMessage, config: RunnableConfig) -> AddableDict:
        try:
            return AddableDict(parsed=parser.invoke(raw, config), parsing_error=None)
        except Exception as exc:  # as LangChain's include_raw does: any failure of the parse is returned
            return AddableDict(parsed=None, parsing_error=exc)

    def parse(items: Iterator[dict[str, Any]], config: RunnableConfig) -> Iterator[AddableDict]:
        raw: Any = None
        for item in items:
            yield AddableDict(item)
            raw = item["raw"] if raw is None else raw + item["raw"]
        yield outcome(raw, config)

    async def aparse(items: AsyncIterator[dict[str, Any]], config: RunnableConfig) -> AsyncIterator[AddableDict]:
        raw: Any = None
        async for item in items:
            yield AddableDict(item)
            raw = item["raw"] if raw is None else raw + item["raw"]
        yield outcome(raw, config)

    return RunnableGenerator(parse, aparse, name="parse_with_raw")  # type: ignore[arg-type]  # it passes the config to functions that take one


class _FailsAfterTheStream:
    """A parser whose final parse can fail (with the runtime's reason). In a stream it fails at the
    model's last chunk, while the model's stream waits there to end its run: the failure waits for
    that end, so the run ends as a finished call (its message and usage to on_llm_end) rather than
    with a GeneratorExit from a stream left open."""

    def _transform(self, input: Iterator[Any]) -> Iterator[Any]:
        chunks = iter(input)
        try:
            yield from super()._transform(chunks)  # type: ignore[misc]
        except OutputParserException:
            for _ in chunks:  # nothing comes after the last chunk: this ends the model's run
                pass
            raise

    async def _atransform(self, input: AsyncIterator[Any]) -> AsyncIterator[Any]:
        chunks = aiter(input)
        try:
            async for value in super()._atransform(chunks):  # type: ignore[misc]
                yield value
        except OutputParserException:
            async for _ in chunks:
                pass
            raise


class _SchemaJsonParser(_FailsAfterTheStream, JsonOutputParser):
    """JSON output parsing that also fails where the runtime found the value off its schema
    (`response_metadata["parse_error"]`: a keyword the grammar does not enforce, such as
    uniqueItems; a TypedDict or JSON schema has no pydantic class to check it), or cut short by
    max_tokens, with the runtime's reason."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        if (failure := _runtime_failure(result, partial)) is not None:
            raise failure
        return super().parse_result(result, partial=partial)


class _SchemaPydanticParser(_FailsAfterTheStream, PydanticOutputParser):
    """PydanticOutputParser (which, as LangChain's JSON parsing does, closes a JSON that was cut
    short and validates what it has) whose failure for a reply max_tokens cut short gives the
    runtime's reason, which says to raise max_tokens, rather than only that the JSON is invalid."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        message = _final_message(result, partial)
        try:  # a stream's last chunk as invoke's message (a partial parse gives None where it fails)
            parsed = super().parse_result(result, partial=partial and message is None)
        except OutputParserException as exc:
            if (failure := _runtime_failure(result, partial, cut_only=True)) is None:
                raise
            raise failure from exc
        if message is not None and (repeated := repeated_key_error(message.response_metadata, message.content)) is not None:
            raise OutputParserException(f"the reply does not fit the schema: {repeated}", llm_output=message.content)
        return parsed


# A call's flags that are LangChain's, not request parameters: `stream` (BaseChatModel's), and
# `stream_usage` (ChatOpenAI's and others': usage always comes on the last chunk here).
CALL_FLAGS = ("stream", "stream_usage")


def _without_flags(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's keyword arguments without CALL_FLAGS."""
    return {name: value for name, value in kwargs.items() if name not in CALL_FLAGS}


def _final_message(result: list[Generation], partial: bool) -> Any:
    """The message of a final parse's generation: an invoked reply, or a stream's at its last chunk
    (LangChain parses a stream only as partial, so a stream's failure shows there, as invoke's
    does); None for a partial parse before that, or a generation without a message."""
    message = getattr(result[0], "message", None) if result else None
    return message if not partial or getattr(message, "chunk_position", None) == "last" else None


def _runtime_failure(result: list[Generation], partial: bool, cut_only: bool = False) -> OutputParserException | None:
    """A final parse's failure from the runtime's parse_error, which says itself where max_tokens
    or a stop string cut the reply (`cut_only`: only there), or None."""
    message = _final_message(result, partial)
    error = message.response_metadata.get("parse_error") if message is not None else None
    cut = message is not None and cut_short(message.response_metadata)
    if not error or (cut_only and not cut):
        return None
    return OutputParserException(error if cut else f"the reply does not fit the schema: {error}", llm_output=message.content)


class _NeedsACall(_FailsAfterTheStream):
    """A tools parser whose final parse fails, naming the runtime's error, where the reply has no
    valid call (LangChain's gives None: a call cut short by max_tokens, or off its schema)."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        message = _final_message(result, partial)
        if not isinstance(message, AIMessage):
            return super().parse_result(result, partial=partial)  # type: ignore[misc]
        # A stream's last chunk still counts a call that streamed before the runtime found it
        # invalid: it is left out, as _with_call_errors leaves it out of an invoked message.
        errors = message.response_metadata.get("tool_call_errors") or {}
        valid = [c for c in message.tool_calls if c["id"] not in errors]
        if not valid:
            invalid = [*message.invalid_tool_calls, *message.tool_calls]
            detail = "; ".join(
                f"{repr(c['name']) if c.get('name') else 'a call'}: {errors.get(c.get('id')) or c.get('error')}" for c in invalid
            )
            reason = f"its call is invalid: {detail}" if detail else "it made no call"
            raise OutputParserException(f"the reply did not call the schema's tool: {reason}", llm_output=message.text)
        final = result[0].model_copy(update={"message": message.model_copy(update={"tool_calls": valid})})
        return super().parse_result([final], partial=False)  # type: ignore[misc]


class _PydanticCall(_NeedsACall, PydanticToolsParser):
    """PydanticToolsParser that fails on a reply without a valid call (_NeedsACall)."""


class _KeyCall(_NeedsACall, JsonOutputKeyToolsParser):
    """JsonOutputKeyToolsParser that fails on a reply without a valid call (_NeedsACall)."""


def _check_schema(schema: Any) -> None:
    """A with_structured_output schema of a form LangChain converts, or a ValueError that says which
    forms it takes: its own converters said "no signature found for builtin type" for `int`, or
    "Unsupported function" for a pydantic instance."""
    if isinstance(schema, BaseModel) and not isinstance(schema, BaseTool):
        name = type(schema).__name__
        raise ValueError(f"schema is an instance of {name}, not a schema: pass the class {name}")
    if (
        schema is None
        or isinstance(schema, (dict, BaseTool))
        or is_typeddict(schema)
        or isinstance(schema, type) and is_basemodel_subclass(schema)
        or inspect.isfunction(schema)
    ):
        return
    raise ValueError(
        f"schema={schema!r} is not a schema: with_structured_output takes a pydantic class, a TypedDict, "
        "a JSON schema dict, a tool or a function (for a list or a number, make it a field of a pydantic class)"
    )


def _json_schema(schema: dict[str, Any] | type) -> dict[str, Any]:
    """A structured-output schema as JSON schema: a dict is one already, or holds one in OpenAI's or
    Anthropic's wrapper (params.unwrapped_format), a pydantic class gives its own (with `$defs`, so a
    recursive model stays recursive), and a TypedDict is converted as LangChain converts it, with its
    fields' descriptions. (LangChain's converter keeps only a pydantic class's properties, and writes
    a recursive reference as any value: either would leave the grammar loose.)"""
    if isinstance(schema, dict) or isinstance(schema, type) and is_basemodel_subclass(schema) and hasattr(schema, "model_json_schema"):  # not pydantic.v1's
        return unwrapped_format(schema)
    return convert_to_json_schema(schema)


def _openai_tool(tool: dict[str, Any] | type | Callable | BaseTool) -> dict[str, Any]:
    """A tool in OpenAI's form as LangChain converts it, except that a schema keeps its own JSON
    schema as the parameters where the converter would lose it: a pydantic schema with references
    (`$defs`), which it inlines and writes, if recursive, as any value (a call through the grammar
    that the tool's own model then refuses), and a dict (_dict_schema)."""
    if isinstance(tool, Mapping) and tool.get("type", "object") not in JSON_TYPES and not is_function_tool(tool):
        return dict(tool)  # a provider's own tool, for the runtime to refuse by its type: LangChain's converter makes a function of any dict with a name
    formatted = convert_to_openai_tool(tool)
    model = tool.tool_call_schema if isinstance(tool, BaseTool) else tool
    if isinstance(model, type) and is_basemodel_subclass(model) and hasattr(model, "model_json_schema"):  # not pydantic.v1's
        own = model.model_json_schema()
        if "$defs" in own:
            formatted["function"]["parameters"] = own
    elif isinstance(tool, Mapping) and isinstance(function := formatted.get("function"), dict) and "parameters" not in function:
        if schema := _dict_schema(tool):  # (a flat function tool, OpenAI's Responses form, is passed on as it is)
            function["parameters"] = schema
    return formatted


# A JSON schema's types: a dict tool of one of them is a schema to call with, not a provider's own tool.
JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def _dict_schema(tool: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a dict holds where LangChain's converter finds none, so that a call is held to
    it (the converter dropped it, and the call's grammar took any arguments: `{}` came back as a
    valid value): OpenAI's response_format wrapper's "schema" ({"name", "schema"}), or a titled
    schema without "properties" at its root (a "$ref" into "$defs", an "anyOf", an array)."""
    if "function" in tool:
        return None
    if "name" in tool:  # (one with "parameters" keeps them: this is not asked then)
        schema = tool.get("schema")
        return dict(schema) if isinstance(schema, Mapping) else None
    rest = {key: value for key, value in tool.items() if key not in ("title", "description", "strict")}
    return rest or None


# An AI message's standard content blocks (`content_blocks`, LangChain's translation of each
# provider's own: OpenAI's Responses items, Anthropic's server tools, Google's code execution) that
# are not its text: calls (valid ones travel as `tool_calls`), the results of tools a provider ran
# itself, and a provider's own data (v1 "non_standard"). Reasoning is content_to_text's to leave out.
CALL_BLOCKS = ("tool_use", "tool_call", "function_call")  # Anthropic's, LangChain's, OpenAI Responses API's
_NOT_ASSISTANT_TEXT = frozenset(
    {"tool_call", "tool_call_chunk", "invalid_tool_call", "server_tool_call", "server_tool_call_chunk", "server_tool_result", "non_standard"}
)


def to_runtime_messages(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as the runtime's `{"role", "content"}` dicts (names are dropped).

    A ToolMessage becomes a "tool" turn with its `tool_call_id` (HistoryResults: a result of a call
    shown as text goes first, without it); an AIMessage keeps its tool calls as `tool_calls`, and
    its text (_assistant_text) with its invalid calls as written.
    """
    out: list[dict[str, Any]] = []
    results = HistoryResults()
    for i, message in enumerate(messages):
        where = f"messages[{i}] ({type(message).__name__})"
        if isinstance(message, ToolMessage):
            results.add(out, content_to_text(message.content, where), message.tool_call_id)
        elif isinstance(message, AIMessage):
            calls = [{"id": c["id"], "name": c["name"], "arguments": c["args"]} for c in message.tool_calls]
            unreadable: list[tuple[str | None, str | None]] = []
            if not calls:
                calls, unreadable = _unparsed_calls(message)
            invalid = [*((c.get("name"), c.get("args")) for c in message.invalid_tool_calls), *unreadable]
            mentioned = {c.get("id") for c in message.invalid_tool_calls} | {b.get(key) for b in _call_blocks(message) for key in ID_KEYS}
            entry: dict[str, Any] = {"role": "assistant", "content": with_invalid_calls(_assistant_text(message, where), invalid)}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
            results.turn(out, mentioned - {c.get(key) for c in calls for key in ID_KEYS})
        else:
            out.append({"role": _role(message, where), "content": content_to_text(message.content, where)})
            results.turn(out)
    return out


def _call_blocks(message: AIMessage) -> list[dict[str, Any]]:
    """The call blocks in an AI message's content (CALL_BLOCKS), as other providers' histories keep them."""
    blocks = message.content if isinstance(message.content, list) else []
    return [block for block in blocks if isinstance(block, dict) and block.get("type") in CALL_BLOCKS]


def _unparsed_calls(message: AIMessage) -> tuple[list[dict[str, Any]], list[tuple[str | None, str | None]]]:
    """Calls an AI message holds where LangChain left them unparsed (its tool_calls empty): call
    blocks in its content (convert_to_messages of an Anthropic-format dict keeps its tool_use
    blocks there) and OpenAI's older `function_call`; they had been dropped, so the tool results
    after them answered no call the model could see. Those the runtime reads (read_tool_call), and
    those it cannot, (name, arguments' text) each, to show as written as an invalid call is; a
    block of a call LangChain already lists as invalid is not taken again."""
    invalid = {c.get("id") for c in message.invalid_tool_calls} - {None}
    found = [block for block in _call_blocks(message) if not {block.get(key) for key in ID_KEYS} & invalid]
    legacy = message.additional_kwargs.get("function_call")
    calls, unreadable = [], []
    for raw in found or ([legacy] if isinstance(legacy, dict) else []):
        try:
            read_tool_call(raw)  # readable: the runtime reads it again with the message's place
            calls.append(raw)
        except InvalidMessagesError:
            arguments = next((raw[key] for key in ARGUMENT_KEYS if key in raw), None)
            unreadable.append((raw.get("name"), arguments if isinstance(arguments, str) or arguments is None else json.dumps(arguments, default=str)))
    return calls, unreadable


def _assistant_text(message: AIMessage, where: str) -> str:
    """An AI message's text, in any provider's form: its standard blocks' text and a refusal's,
    without the blocks that are not text (_NOT_ASSISTANT_TEXT); media is content_to_text's error."""
    if isinstance(message.content, str):
        return message.content
    blocks = [
        None if block["type"] in _NOT_ASSISTANT_TEXT else {"type": "text", "text": block.get("refusal", "")} if block["type"] == "refusal" else block
        for block in message.content_blocks
    ]
    return content_to_text(blocks, where, skip=(type(None),))  # None: a block left out, so an error gives a block's place among all


def _role(message: BaseMessage, where: str) -> str:
    """The role of a message that is neither a ToolMessage nor an AIMessage (to_runtime_messages turns those itself)."""
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, FunctionMessage):  # OpenAI's older function result: a tool turn that answers no call by id
        return "tool"
    if isinstance(message, ChatMessage) and (role := canonical_role(message.role)) is not None:
        return role
    role = message.role if isinstance(message, ChatMessage) else message.type
    if role == "remove":  # LangGraph's add_messages applies it to a state's list, which then reaches the model without it
        raise InvalidMessagesError(f"{where} is an instruction to remove a message (LangGraph's add_messages applies it), not a message for the model")
    raise InvalidMessagesError(f"{where} has role {role!r}; supported roles: {ALLOWED_ROLES}")


class _Chunks:
    """Turns one request's runtime events into chunks, each text chunk tagged with the model that
    wrote it. While tools are on, text streams up to any call markup (integration.ShownText), which
    the runtime takes out of the content, and the calls stream as they are written (ShownCalls).
    A call's pydantic class as response_format is parsed into on the last chunk (_parsed_as)."""

    def __init__(self, params: GenerationParams, response_format: Any = None) -> None:
        self.shown = ShownText(params)
        self.calls = ShownCalls(params)
        self.parse_as = response_format if is_basemodel_subclass(response_format) else None

    def add(self, event: TextDelta | FinalEvent) -> list[ChatGenerationChunk]:
        if isinstance(event, TextDelta):
            chunks = [_text_chunk(text, source) for text, source in self.shown.add(event.text, event.source)]
            if deltas := self.calls.add(self.shown.raw):
                chunks.append(_calls_chunk(deltas))
            return chunks
        result = event.result
        rest = self.shown.finish(result.message_content)
        last = final_chunks(result, self.calls.finish(result))
        if self.parse_as is not None:
            _parsed_as(self.parse_as, result, last[-1].message)
        return [*(_text_chunk(text, source) for text, source in rest), *last]


def _parsed_as(cls: type[BaseModel], result: WSDResult, last: BaseMessage) -> None:
    """A reply to a call whose response_format is a pydantic class, as ChatOpenAI's: the value as
    that class in the last chunk's `additional_kwargs["parsed"]`, or None (a reply that does not
    parse or fit; `response_metadata["parse_error"]` says why, also for the class's own validators)."""
    parsed = None
    if result.parsed is not None:
        try:
            parsed = cls.model_validate(result.parsed)
        except ValidationError as exc:  # a validator beyond the schema the grammar held the reply to
            last.response_metadata["parse_error"] = f"the value does not fit {cls.__name__}: {exc}"
    last.additional_kwargs["parsed"] = parsed


def _text_chunk(text: str, source: str) -> ChatGenerationChunk:
    return ChatGenerationChunk(message=AIMessageChunk(content=text, response_metadata={"wsd_source": [source]}))


def _calls_chunk(deltas: list[CallDelta]) -> ChatGenerationChunk:
    """Pieces of the calls being written, as LangChain merges them (by index: id and name come first)."""
    return ChatGenerationChunk(
        message=AIMessageChunk(content="", tool_call_chunks=[tool_call_chunk(name=d.name, args=d.args, id=d.id, index=d.index) for d in deltas])
    )


def final_chunks(result: WSDResult, calls: list[FinalCall]) -> list[ChatGenerationChunk]:
    """What the reply's calls (in order) have yet to show, if anything: the rest of a streamed call's
    arguments, and any call that never showed (its arguments as JSON, or an invalid call's raw
    text); then the last chunk: usage and response metadata. The pieces come before the last chunk,
    not in it: LangChain's content blocks of a last chunk leave out a call that does not parse, so a
    stream read as content blocks (`stream_events(version="v3")`, LangGraph's v2 message stream)
    lost an invalid call that never streamed."""
    pieces = []
    for final in calls:
        call = final.call
        if final.streamed:
            if final.args:
                pieces.append(tool_call_chunk(name=None, args=final.args, id=None, index=final.index))
        elif isinstance(call, ToolCall):
            pieces.append(tool_call_chunk(name=call.name, args=json.dumps(call.arguments, ensure_ascii=False), id=call.id, index=final.index))
        else:
            pieces.append(tool_call_chunk(name=call.name, args=call.raw, id=call.id, index=final.index))
    metadata = result_metadata(result)
    if invalid := [final.call for final in calls if not isinstance(final.call, ToolCall)]:
        metadata["tool_call_errors"] = {call.id: call.error for call in invalid}
        metadata["wsd"]["invalid_tool_call_text"] = {call.id: call.raw for call in invalid}
    last = ChatGenerationChunk(
        message=AIMessageChunk(content="", usage_metadata=to_usage_metadata(result), response_metadata=metadata, chunk_position="last"),
        generation_info={"finish_reason": metadata["finish_reason"], "model_name": metadata["model_name"]},
    )
    return [ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=pieces)), last] if pieces else [last]


def _with_llm_output(result: ChatResult) -> ChatResult:
    """The result with `llm_output` as ChatOpenAI's invoke fills it (token_usage in OpenAI's keys, and
    the model), for callback handlers that read usage there rather than from usage_metadata. A
    streamed call has none, as with every LangChain chat model: its usage is on the last chunk."""
    message = result.generations[0].message
    usage = message.usage_metadata if isinstance(message, AIMessage) else None
    if usage is not None:
        metadata = message.response_metadata
        result.llm_output = {"token_usage": openai_usage(usage), "model_name": metadata["model_name"], "model_provider": metadata["model_provider"]}
    return result


def _as_last_chunk(message: BaseMessage) -> AIMessageChunk:
    """A reply as a stream's last chunk. Where streaming is off (disable_streaming, streaming=False),
    LangChain's stream yields the invoked AIMessage, which its stream parsers rebuild as a plain
    message chunk: a tools parser found no calls in it (a valid call streamed as nothing), and a
    parser that fails at a stream's end never saw it end (a cut-short JSON streamed as a value)."""
    if isinstance(message, AIMessageChunk) or not isinstance(message, AIMessage):
        return message  # type: ignore[return-value]
    return AIMessageChunk(**{name: value for name, value in message if name != "type"}, chunk_position="last")  # as they are (a parsed value stays its class)


def _with_run_id(chunk: ChatGenerationChunk, run_manager: _RunManager) -> ChatGenerationChunk:
    """A chunk of an invoke, told to its callbacks, with the run's message id, as LangChain gives a
    streamed chunk one (and the invoked message)."""
    if chunk.message.id is None:
        chunk.message.id = "-".join((LC_ID_PREFIX, str(run_manager.run_id)))
    return chunk


def _with_call_errors(result: ChatResult) -> ChatResult:
    """Put the runtime's error of each invalid tool call on the invoked message: a call that streamed
    before the runtime found it invalid (its arguments parsed as far as they were written) moves to
    `invalid_tool_calls` with its raw text, as a call that never streamed has it (ChatOpenAI's
    invalid call keeps the text the model wrote, not a parse of it): the last chunk's
    `response_metadata["wsd"]["invalid_tool_call_text"]` holds it, since an invoked message is made
    from the chunks without their tool_call_chunks."""
    message = result.generations[0].message
    errors = message.response_metadata.get("tool_call_errors")
    raw = (message.response_metadata.get("wsd") or {}).get("invalid_tool_call_text") or {}
    if errors and isinstance(message, AIMessage):
        streamed = [c for c in message.tool_calls if c["id"] in errors]
        message.tool_calls = [c for c in message.tool_calls if c["id"] not in errors]
        if isinstance(message.content, list):  # v1 content lists the valid calls (as ChatOpenAI's does), and the invalid ones with their errors
            message.content = [
                {**b, "error": errors[b["id"]]} if isinstance(b, dict) and _call_block(b, errors) == "invalid_tool_call" else b
                for b in message.content
                if _call_block(b, errors) != "tool_call"
            ]
        message.invalid_tool_calls = [
            *(c | {"error": errors.get(c["id"])} for c in message.invalid_tool_calls),
            *(
                invalid_tool_call(name=c["name"], args=raw.get(c["id"], json.dumps(c["args"], ensure_ascii=False)), id=c["id"], error=errors[c["id"]])
                for c in streamed
            ),
        ]
    return result


def _call_block(block: Any, errors: dict[str, str]) -> str | None:
    """A content block's type where it is a call (valid or not) of one of `errors`' ids, else None."""
    if isinstance(block, dict) and block.get("type") in ("tool_call", "invalid_tool_call") and block.get("id") in errors:
        return block["type"]
    return None


def to_usage_metadata(result: WSDResult) -> UsageMetadata:
    """LangChain usage: the totals of the model that writes the reply (the base; the draft with
    mode="draft"), with the draft model's counts in the details."""
    counts = usage_counts(result)
    draft = counts["draft"]
    return UsageMetadata(
        input_tokens=counts["input_tokens"],
        output_tokens=counts["output_tokens"],
        total_tokens=counts["total_tokens"],
        input_token_details={"cache_read": counts["cache_read_tokens"], "draft": draft["input_tokens"]},  # type: ignore[typeddict-unknown-key]
        output_token_details={  # type: ignore[typeddict-unknown-key]
            "draft": draft["output_tokens"],
            "kept_draft": draft["kept_tokens"],
            "base": counts["base"]["continuation_tokens"],
        },
    )
