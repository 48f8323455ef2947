"""WSDLLM: Weak-to-Strong Decoding as a LlamaIndex LLM, chat-first over the shared wsd-llms runtime."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing, closing
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from wsd_llms.errors import InvalidMessagesError
from wsd_llms.events import Event, TextDelta, WSDResult
from wsd_llms.integration import WSDSettings, content_to_text, result_metadata, usage_counts

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

Messages = list[dict[str, str]]

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
}

TOOLS_UNAVAILABLE = (
    "WSDLLM cannot call tools or produce structured output yet: that needs wsd-llms' constrained "
    "decoding (the `structured` extra), which is not available in this version. Use a ReActAgent "
    "(tools through text, with stop=['Observation:']) or plain chat/complete."
)


def to_runtime_messages(messages: Sequence[ChatMessage]) -> Messages:
    """LlamaIndex ChatMessages as the runtime's `{"role", "content"}` dicts (text blocks only)."""
    out = []
    for i, msg in enumerate(messages):
        role = _ROLES.get(MessageRole(msg.role))
        where = f"messages[{i}] ({MessageRole(msg.role).value})"
        if role is None:
            raise InvalidMessagesError(f"{where}: role {msg.role.value!r} is not supported; {TOOLS_UNAVAILABLE}")
        blocks = [block.text if isinstance(block, TextBlock) else block for block in msg.blocks]
        out.append({"role": role, "content": content_to_text(blocks, where)})
    return out


def _chunk(text: str, event: TextDelta) -> ChatResponse:
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, content=text),
        delta=event.text,
        additional_kwargs={"wsd_source": event.source},
    )


def _final(result: WSDResult, delta: str | None) -> ChatResponse:
    """The last response of a reply: its text, usage and WSD facts."""
    usage = usage_counts(result)
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text),
        delta=delta,
        raw={**result_metadata(result), "usage": usage},
        additional_kwargs={
            "prompt_tokens": usage["input_tokens"],
            "completion_tokens": usage["output_tokens"],
            "total_tokens": usage["total_tokens"],
        },
    )


def _to_completion(response: ChatResponse) -> CompletionResponse:
    return CompletionResponse(
        text=response.message.content or "",
        delta=response.delta,
        raw=response.raw,
        additional_kwargs=response.additional_kwargs,
    )


class _Accumulator:
    """Turns runtime events into chat responses with cumulative text."""

    def __init__(self) -> None:
        self.text = ""

    def __call__(self, event: Event) -> ChatResponse:
        if isinstance(event, TextDelta):
            self.text += event.text
            return _chunk(self.text, event)
        return _final(event.result, "")


class WSDLLM(WSDSettings, FunctionCallingLLM):
    """Weak-to-Strong Decoding LLM: a small aligned draft model starts each reply, a base model continues.

    Construction loads nothing; the first call loads both models into the runtime shared per model
    pair (`wsd_llms.get_runtime`). Every field is a default that a call may override by keyword.
    """

    @classmethod
    def class_name(cls) -> str:
        return "WSDLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.wsd_runtime().base_context_window(),
            num_output=self.max_tokens,
            is_chat_model=True,
            is_function_calling_model=importlib.util.find_spec("xgrammar") is not None,
            model_name=self.wsd_runtime().base_source,
        )

    # ------------------------------------------------------------ decoding

    def _prompt_messages(self, prompt: str, formatted: bool) -> Messages:
        """A completion prompt as messages: as-is when formatted, else with completion_to_prompt and system_prompt."""
        if formatted:
            return [{"role": "user", "content": prompt}]
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": self.completion_to_prompt(prompt)}]

    def _stream(self, messages: Messages, kwargs: dict[str, Any]) -> Iterator[ChatResponse]:
        params = self.wsd_params(**kwargs)
        runtime = self.wsd_runtime()
        accumulate = _Accumulator()

        def gen() -> Iterator[ChatResponse]:
            with closing(runtime.stream(messages, **params)) as events:
                for event in events:
                    yield accumulate(event)

        return gen()

    def _astream(self, messages: Messages, kwargs: dict[str, Any]) -> AsyncIterator[ChatResponse]:
        params = self.wsd_params(**kwargs)
        runtime = self.wsd_runtime()
        accumulate = _Accumulator()

        async def gen() -> AsyncIterator[ChatResponse]:
            async with aclosing(runtime.astream(messages, **params)) as events:
                async for event in events:
                    yield accumulate(event)

        return gen()

    def _generate(self, messages: Messages, kwargs: dict[str, Any]) -> ChatResponse:
        result = self.wsd_runtime().generate(messages, **self.wsd_params(**kwargs))
        return _final(result, None)

    async def _agenerate(self, messages: Messages, kwargs: dict[str, Any]) -> ChatResponse:
        result = await self.wsd_runtime().agenerate(messages, **self.wsd_params(**kwargs))
        return _final(result, None)

    # ------------------------------------------------------------ chat

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._generate(to_runtime_messages(messages), kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream(to_runtime_messages(messages), kwargs)  # type: ignore[return-value]

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._agenerate(to_runtime_messages(messages), kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return self._astream(to_runtime_messages(messages), kwargs)  # type: ignore[return-value]

    # ------------------------------------------------------------ completion (derived from chat)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _to_completion(self._generate(self._prompt_messages(prompt, formatted), kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        responses = self._stream(self._prompt_messages(prompt, formatted), kwargs)
        return (_to_completion(r) for r in responses)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _to_completion(await self._agenerate(self._prompt_messages(prompt, formatted), kwargs))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        responses = self._astream(self._prompt_messages(prompt, formatted), kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            async for response in responses:
                yield _to_completion(response)

        return gen()

    # ------------------------------------------------------------ tools (need constrained decoding)

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        raise NotImplementedError(TOOLS_UNAVAILABLE)

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        raise NotImplementedError(TOOLS_UNAVAILABLE)
