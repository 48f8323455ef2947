"""`WSDChatModel`: Weak-to-Strong Decoding as a LangChain chat model, on the shared wsd-llms runtime."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel, LangSmithParams, generate_from_stream
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
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from pydantic import Field

from wsd_llms import FinalEvent, InvalidMessagesError, InvalidParameterError, TextDelta, WSDResult, WSDRuntime
from wsd_llms.integration import WSDSettings, content_to_text, result_metadata, usage_counts

_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant", "ai": "assistant"}
_NO_TOOLS = "tool-calling support, which WSDChatModel does not have yet"


class WSDChatModel(WSDSettings, BaseChatModel):
    """Weak-to-Strong Decoding chat model: a small aligned draft model starts each reply, a base
    model checks it and, where it confidently agrees, takes over and writes the rest.

    With no models named it runs the embedded default pair. Construction is instant; the models load
    on the first call, once per process for each model pair (instances with the same models share
    one runtime). Every request parameter (max_tokens, sampling, switch settings, mode, ...) set in
    the constructor can be overridden per call (`invoke(..., x=...)` or `.bind(x=...)`); `stop`
    strings from the call are added to the constructor's. A per-call `model` must name the base model.

    Streamed chunks:

    - each text chunk carries `response_metadata["wsd_source"] == ["draft"]` or `["base"]`: the model
      that wrote it (a one-item list, so aggregated messages hold one entry per text chunk, in order);
    - the last chunk (`chunk_position="last"`, no text) carries `usage_metadata` and the response
      metadata: `model_name` (the base model), `model_provider="wsd"`, `finish_reason`, and `wsd`
      (switch point, kept draft tokens, draft and base models, mode, timings).

    `usage_metadata` counts input, output and total tokens in the base tokenizer. Its details add the
    draft model's side: `input_token_details["draft"]` (draft prompt, draft tokenizer),
    `output_token_details["draft"]` (tokens the draft model wrote, draft tokenizer),
    `["kept_draft"]` and `["base"]` (the reply's draft-written and base-written parts, base tokens).

    Text content only; tool calling and structured output are not available yet.
    """

    streaming: bool = Field(False, description="stream by default when invoked (LangChain convention)")

    @property
    def _llm_type(self) -> str:
        return "wsd-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        runtime = self.wsd_runtime()
        return {
            "draft_model": runtime.draft_source,
            "base_model": runtime.base_source,
            "switch_threshold": self.switch_threshold,
            "switch_window": self.switch_window,
            "max_draft_tokens": self.max_draft_tokens,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.pop("model", None)
        kwargs.pop("stream", None)
        params = self.wsd_params(stop=stop, **kwargs)
        ls_params = LangSmithParams(
            ls_provider="wsd",
            ls_model_name=model or self.wsd_runtime().base_source,
            ls_model_type="chat",
            ls_temperature=params["temperature"],
            ls_max_tokens=params["max_tokens"],
        )
        if params["stop"]:
            ls_params["ls_stop"] = params["stop"]
        return ls_params

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[WSDRuntime, list[dict[str, str]], dict[str, Any]]:
        """The runtime, its messages and the request parameters for one call.

        LangChain's own `stream` flag is dropped; a per-call `model` must be the base model.
        """
        kwargs = dict(kwargs)
        kwargs.pop("stream", None)
        model = kwargs.pop("model", None)
        runtime = self.wsd_runtime()
        if model is not None and model != runtime.base_source:
            raise InvalidParameterError(
                f"model={model!r}: this WSDChatModel runs base model {runtime.base_source!r} and cannot switch "
                "models per call; build a WSDChatModel(base_model=...) for that model"
            )
        return runtime, to_runtime_messages(messages), self.wsd_params(stop=stop, **kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        runtime, runtime_messages, params = self._request(messages, stop, kwargs)
        for event in runtime.stream(runtime_messages, **params):
            chunk = to_chunk(event)
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        runtime, runtime_messages, params = self._request(messages, stop, kwargs)
        async for event in runtime.astream(runtime_messages, **params):
            chunk = to_chunk(event)
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks = [chunk async for chunk in self._astream(messages, stop, run_manager, **kwargs)]
        return generate_from_stream(iter(chunks))


def to_runtime_messages(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the runtime's `{"role", "content"}` dicts (names are dropped)."""
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}] ({type(message).__name__})"
        if isinstance(message, (ToolMessage, FunctionMessage)):
            raise InvalidMessagesError(f"{where}: tool messages need {_NO_TOOLS}")
        if isinstance(message, AIMessage) and message.tool_calls:
            raise InvalidMessagesError(f"{where}: an AI message with tool calls needs {_NO_TOOLS}")
        out.append({"role": _role(message, where), "content": content_to_text(message.content, where)})
    return out


def _role(message: BaseMessage, where: str) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ChatMessage) and message.role in _CHAT_ROLES:
        return _CHAT_ROLES[message.role]
    role = message.role if isinstance(message, ChatMessage) else message.type
    raise InvalidMessagesError(f"{where} has role {role!r}; supported roles: system, user (human), assistant (ai)")


def to_chunk(event: TextDelta | FinalEvent) -> ChatGenerationChunk:
    """A runtime event as a chunk: text tagged with its author, or the final usage and metadata."""
    if isinstance(event, TextDelta):
        return ChatGenerationChunk(message=AIMessageChunk(content=event.text, response_metadata={"wsd_source": [event.source]}))
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content="",
            usage_metadata=to_usage_metadata(event.result),
            response_metadata=result_metadata(event.result),
            chunk_position="last",
        )
    )


def to_usage_metadata(result: WSDResult) -> UsageMetadata:
    """LangChain usage: base-tokenizer totals, with the draft model's counts in the details."""
    counts = usage_counts(result)
    draft = counts["draft"]
    return UsageMetadata(
        input_tokens=counts["input_tokens"],
        output_tokens=counts["output_tokens"],
        total_tokens=counts["total_tokens"],
        input_token_details={"draft": draft["input_tokens"]},  # type: ignore[typeddict-unknown-key]
        output_token_details={  # type: ignore[typeddict-unknown-key]
            "draft": draft["output_tokens"],
            "kept_draft": draft["kept_tokens"],
            "base": counts["base"]["continuation_tokens"],
        },
    )
