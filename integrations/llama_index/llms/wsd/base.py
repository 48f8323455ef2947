"""WSDLLM: Weak-to-Strong Decoding as a LlamaIndex LLM, chat-first over the shared wsd-llms runtime."""

from __future__ import annotations

import functools
import inspect
import json
import mimetypes
import warnings
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Sequence
from contextlib import aclosing, closing, contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from llama_index.core.base.llms.generic_utils import messages_to_prompt as generic_messages_to_prompt
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    DocumentBlock,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    CachePoint,
    CitationBlock,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
import llama_index.core
import llama_index.core.instrumentation as instrument
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictInProgressEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection, default_completion_to_prompt
from llama_index.core.llms.utils import parse_partial_json
from llama_index.core.program.utils import FlexibleModel, process_streaming_objects
from llama_index.core.types import PydanticProgramMode
from pydantic import BaseModel, Field, PrivateAttr, model_validator

from wsd_llms.encoding import encode_text
from wsd_llms.errors import InvalidMessagesError, InvalidParameterError, InvalidReplyError, PromptTooLongError, ReplyCutShortError, user_stacklevel
from wsd_llms.events import Event, TextDelta, WSDResult
from wsd_llms.integration import FinalCall, HistoryResults, ShownCalls, ShownText, WSDSettings, can_constrain, content_to_text, cut_short, openai_usage, repeated_key_error, result_metadata, usage_counts, with_invalid_calls
from wsd_llms.messages import ToolCall, canonical_role
from wsd_llms.params import GenerationParams
from wsd_llms.runtime import reply_room
from wsd_llms.structured import strict_json

if TYPE_CHECKING:
    from llama_index.core.prompts import BasePromptTemplate
    from llama_index.core.tools.types import BaseTool

Messages = list[dict[str, Any]]
Model = TypeVar("Model", bound=BaseModel)
dispatcher = instrument.get_dispatcher(__name__)



def _history_calls(msg: ChatMessage) -> Any:
    """An assistant message's tool calls: its ToolCallBlocks, else OpenAI/ollama-style
    additional_kwargs["tool_calls"] as given, for the runtime's check to name (one call given as
    a dict, not in a list, was taken for its keys, and refused as "a str")."""
    calls = [
        {"id": b.tool_call_id, "name": b.tool_name, "arguments": b.tool_kwargs}
        for b in msg.blocks
        if isinstance(b, ToolCallBlock)
    ]
    return calls or msg.additional_kwargs.get("tool_calls") or []


class _LastWarned:
    """The response last warned of, held weakly; copied and pickled as none (a weak reference cannot be)."""

    def __init__(self) -> None:
        self.of: Callable[[], Any] = lambda: None

    def __reduce__(self) -> tuple[type, tuple]:
        return (_LastWarned, ())


def _is_direct_record(messages: Sequence[ChatMessage]) -> bool:
    """Whether the last message is FunctionAgent's record of a `return_direct` tool's output: an
    assistant message carrying the `tool_call_id` of a tool result before it, with the same text."""
    last = messages[-1] if messages else None
    if last is None or canonical_role(MessageRole(last.role).value) != "assistant" or _history_calls(last):
        return False
    call_id = last.additional_kwargs.get("tool_call_id")
    return call_id is not None and any(
        canonical_role(MessageRole(m.role).value) == "tool" and m.additional_kwargs.get("tool_call_id") == call_id and m.content == last.content
        for m in messages[:-1]
    )


def to_runtime_messages(messages: Sequence[ChatMessage]) -> Messages:
    """LlamaIndex ChatMessages as runtime message dicts: text blocks, tool calls and tool results.

    FunctionAgent's copy of a `return_direct` tool's output (left last when that tool failed) is
    left out: it repeats the tool result before it, and the model writes the next turn, as a chat
    API's model would (with continue_final_message=True, another trailing assistant message is the
    reply's forced start).
    """
    if _is_direct_record(messages):
        messages = messages[:-1]
    out: Messages = []
    results = HistoryResults()
    for i, msg in enumerate(messages):
        role = canonical_role(MessageRole(msg.role).value)
        where = f"messages[{i}] ({MessageRole(msg.role).value})"
        if role is None:
            raise InvalidMessagesError(f"{where}: role {msg.role.value!r} is not supported")
        if role == "tool":  # ReAct's observations (observation_role=TOOL) answer no call by id
            results.add(out, _text(msg, where), msg.additional_kwargs.get("tool_call_id"))
            continue
        entry: dict[str, Any] = {"role": role, "content": _text(msg, where)}
        invalid = [c for c in msg.additional_kwargs.get("invalid_tool_calls") or () if isinstance(c, dict)] if role == "assistant" else []
        if invalid:  # this adapter's replies keep them there
            entry["content"] = with_invalid_calls(entry["content"], ((c.get("name"), c.get("raw")) for c in invalid))
        if role == "assistant" and (calls := _history_calls(msg)):
            entry["tool_calls"] = calls
        out.append(entry)
        results.turn(out, (c.get("id") for c in invalid))
    return out


# Blocks that are not conversation text: tool calls (taken apart), another model's reasoning,
# Anthropic's prompt-cache markers, and its citations of what a reply's text cites (as
# ChatMessage.content leaves them out).
_NOT_TEXT = (ToolCallBlock, ThinkingBlock, CachePoint, CitationBlock)


def _text(msg: ChatMessage, where: str) -> str:
    """A message's text blocks (and plain-text documents) joined with newlines, as
    `ChatMessage.content` joins them; any other content block (an image, say) gets
    integration.content_to_text's clear error."""
    blocks = [
        block.text if isinstance(block, TextBlock) else _document_text(block, f"{where} content block {i}") if isinstance(block, DocumentBlock) else block
        for i, block in enumerate(msg.blocks)
    ]
    return content_to_text(blocks, where, skip=_NOT_TEXT, readable="TextBlock, or a DocumentBlock whose document_mimetype is text/*")


def _document_text(block: DocumentBlock, where: str) -> str | DocumentBlock:
    """A plain-text document's text (a text/* document_mimetype, or a path that names one: its
    data, or the local file's, in its charset, else UTF-8), as the LangChain adapter reads a
    'text-plain' block; any other document stays a block the model cannot read. One given only by
    url is refused: this model fetches nothing."""
    given = block.document_mimetype or (mimetypes.guess_type(str(block.path))[0] if block.path is not None else None) or ""
    kind, _, options = given.lower().partition(";")
    if not kind.strip().startswith("text/"):
        return block
    if block.data is None and block.path is None:
        raise InvalidMessagesError(f"{where} is a {given} DocumentBlock given by url only; give its data or a path: this model fetches nothing")
    charset = next((value.strip().strip('"') for key, _, value in (o.partition("=") for o in options.split(";")) if key.strip() == "charset"), "utf-8")
    try:
        return block.resolve_document().read().decode(charset)
    except (OSError, LookupError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidMessagesError(f"{where} is a {given} DocumentBlock whose text cannot be read: {exc}") from exc


def _chunk(text: str, delta: str, source: str, calls: list[tuple[str, str, str]]) -> ChatResponse:
    """A response while the reply is written: its text so far and the calls begun so far, each with
    its arguments' JSON text as far as it is written (a ToolCallBlock's `tool_kwargs` as a string,
    which get_tool_calls_from_response parses as far as it goes)."""
    blocks, message_kwargs = _call_fields([(call_id, name, args, args) for call_id, name, args in calls])
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, blocks=[TextBlock(text=text), *blocks], additional_kwargs=message_kwargs),
        delta=delta,
        additional_kwargs={"wsd_source": source},
    )


def _call_fields(calls: list[tuple[str, str, dict[str, Any] | str, str]]) -> tuple[list[ToolCallBlock], dict[str, Any]]:
    """Calls (id, name, arguments, arguments' JSON text) as ToolCallBlocks, and as the OpenAI-style
    `additional_kwargs["tool_calls"]` that other integrations give and LlamaIndex's streaming programs read."""
    blocks = [ToolCallBlock(tool_call_id=call_id, tool_name=name, tool_kwargs=args) for call_id, name, args, _ in calls]
    listed = [{"id": call_id, "type": "function", "function": {"name": name, "arguments": text}} for call_id, name, _, text in calls]
    return blocks, ({"tool_calls": listed} if listed else {})


def _final(result: WSDResult, delta: str | None, calls: list[FinalCall]) -> ChatResponse:
    """The last response of a reply: its text (without call markup), tool calls, usage and WSD facts.

    Valid calls are ToolCallBlocks in `message.blocks`, and OpenAI-style dicts in
    `message.additional_kwargs["tool_calls"]`; invalid ones are listed in
    `message.additional_kwargs["invalid_tool_calls"]` (raw text, error, name, id). `calls`: the reply's
    calls in order, with the ids they streamed under (ShownCalls.finish).
    """
    usage = usage_counts(result)
    content = result.message_content
    valid = [(c.call, c.written) for c in calls if isinstance(c.call, ToolCall)]
    blocks, message_kwargs = _call_fields(  # the arguments' text as written, which the streamed responses' text led up to
        [(c.id, c.name, c.arguments, written or json.dumps(c.arguments, ensure_ascii=False)) for c, written in valid]
    )
    if invalid := [c.call for c in calls if not isinstance(c.call, ToolCall)]:
        message_kwargs["invalid_tool_calls"] = [{"raw": c.raw, "error": c.error, "name": c.name, "id": c.id} for c in invalid]
    raw = {**result_metadata(result), "usage": usage}
    return ChatResponse(
        message=ChatMessage(
            role=MessageRole.ASSISTANT, blocks=[TextBlock(text=content), *blocks], additional_kwargs=message_kwargs
        ),
        delta=delta,
        raw=raw,
        additional_kwargs=openai_usage(usage),
    )


def _to_completion(response: ChatResponse) -> CompletionResponse:
    return CompletionResponse(
        text=response.message.content or "",
        delta=response.delta,
        raw=response.raw,
        additional_kwargs=response.additional_kwargs,
    )


class _Accumulator:
    """Turns runtime events into chat responses with cumulative text and calls (integration.ShownText
    and ShownCalls: with tools, text stops before `<tool_call>`, calls show as they are written, and
    the final response carries the reply's content and its calls, as the non-streaming methods do)."""

    def __init__(self, params: GenerationParams) -> None:
        self.shown = ShownText(params)
        self.calls = ShownCalls(params)

    def __call__(self, event: Event) -> ChatResponse | None:
        if isinstance(event, TextDelta):
            delta = "".join(text for text, _ in self.shown.add(event.text, event.source))
            if self.calls.add(self.shown.raw) or delta:
                return _chunk(self.shown.shown, delta, event.source, self.calls.shown)
            return None
        final = _final(event.result, "", self.calls.finish(event.result))
        rest = self.shown.finish(final.message.content or "")
        final.delta = "".join(text for text, _ in rest)
        final.additional_kwargs["wsd_source"] = rest[-1][1] if rest else self.shown.last_source  # as on every chunk
        return final


# llm_kwargs that FunctionCallingProgram, the structured path of LlamaIndex's function-calling LLMs, drops.
_TOOL_PATH_KWARGS = frozenset({"tool_required", "tool_choice", "allow_parallel_tool_calls"})


class WSDLLM(WSDSettings, FunctionCallingLLM):
    """Weak-to-Strong Decoding LLM: a small aligned draft model starts each reply, a base model continues.

    Construction loads nothing; the first call loads both models into the runtime shared per model
    pair (`wsd_llms.get_runtime`). Every request parameter is a default that a call may override by keyword.
    """

    context_window: int | None = Field(
        default=None, gt=0, description="tokens LlamaIndex may fill (prompt packing, chat memory); at most, and by default, the models' window"
    )

    unused_arguments: ClassVar[tuple[str, ...]] = ("class_name",)  # LlamaIndex adds it to every dump
    refused_arguments: ClassVar[tuple[str, ...]] = ("messages_to_prompt", "query_wrapper_prompt")  # _no_prompt_formatters
    _warned: _LastWarned = PrivateAttr(default_factory=_LastWarned)  # get_tool_calls_from_response's

    @classmethod
    def framework_tool(cls, tool: Any, index: int) -> dict[str, Any]:
        """A constructor tool as a LlamaIndex tool (FunctionTool, QueryEngineTool, ...), as chat_with_tools converts it."""
        return _tool_spec(tool, index)

    @model_validator(mode="before")
    @classmethod
    def _no_prompt_formatters(cls, data: Any) -> Any:
        """Refuse `messages_to_prompt` and `query_wrapper_prompt`, which a chat model never applies:
        the runtime formats the messages itself (the draft's chat template, the base's plain one), so
        a formatter given here would change nothing but LlamaIndex's token counts of the prompt."""
        if isinstance(data, dict):  # LlamaIndex's own default formatter, as a dump of an LLM carries it, is no choice
            given = [
                name for name in cls.refused_arguments if data.get(name) not in (None, generic_messages_to_prompt)
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: WSDLLM formats the messages itself (the draft model's chat template and the "
                    "base model's [User]/[Assistant] template), so a prompt formatter would change nothing; leave it out"
                )
        return data

    @model_validator(mode="before")
    @classmethod
    def _metadata_flags(cls, data: Any) -> Any:
        """HuggingFaceLLM's and Ollama's is_chat_model and is_function_calling_model, taken where they
        say what `metadata` says (and dropped: metadata tells it), refused where they ask for what
        this LLM is not."""
        if isinstance(data, dict):
            calls = can_constrain()
            actual = {"is_chat_model": True, "is_function_calling_model": calls}
            what = {
                "is_chat_model": "is a chat model",
                "is_function_calling_model": "calls functions" if calls else "calls functions only with the structured extra (pip install 'wsd-llms[structured]')",
            }
            for name in sorted(set(actual) & set(data)):
                if data[name] is not actual[name] and data[name] is not None:  # None is "not given", as elsewhere
                    raise ValueError(f"{name}={data[name]!r}: WSDLLM {what[name]} (metadata.{name} is {actual[name]}); leave {name} out")
            data = {name: value for name, value in data.items() if name not in actual}
        return data

    @classmethod
    def class_name(cls) -> str:
        return "WSDLLM"

    @property
    def metadata(self) -> LLMMetadata:
        """LlamaIndex reads this on every call (its instrumentation's payload), on the event loop for
        achat: the window is told at once where it can be (a GGUF or embedded model's from its
        header before its first load, which converts it), else read from the model's config."""
        window_of = functools.cache(self._window)  # each mode's read once here
        window = window_of(self.mode)
        return LLMMetadata(
            context_window=min(window, self.context_window or window),
            num_output=reply_room(self.mode, self.max_tokens, self.max_draft_tokens, window_of, self.context_window),
            is_chat_model=True,
            is_function_calling_model=can_constrain(),
            model_name=self.wsd_model_name(),
        )

    def _window(self, mode: str) -> int:
        """The context window of `mode`, told at once where it can be (see metadata)."""
        runtime = self.wsd_runtime()
        return runtime.known_context_window(mode) or runtime.context_window(mode)

    # ------------------------------------------------------------ decoding

    def _prompt_messages(self, prompt: str, formatted: bool) -> Messages:
        """A completion prompt as messages: as-is when formatted, else with completion_to_prompt and system_prompt."""
        if not isinstance(prompt, str):  # else told as messages[0]'s content, which the caller never wrote
            raise InvalidMessagesError(f"prompt must be a str, got {type(prompt).__name__}")
        if formatted:
            return [{"role": "user", "content": prompt}]
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        to_prompt = self.completion_to_prompt or default_completion_to_prompt  # None reads as LLM reads it
        text = to_prompt(prompt)
        if not isinstance(text, str):
            raise InvalidMessagesError(f"completion_to_prompt must return a str, returned {type(text).__name__}")
        return [*system, {"role": "user", "content": text}]

    @contextmanager
    def _packing_hint(self, messages: Messages) -> Iterator[None]:
        """A prompt too long for a window says how LlamaIndex came to pack it so: by Settings.tokenizer's
        count (unless it counts in a model's tokens already), tiktoken's unless set, which counts fewer
        tokens than a small model's tokenizer (1.1x for English on the embedded draft); and, for a
        conversation (more than one user turn), by a chat memory's count of its messages' text alone,
        without the chat template around each (about 5.5 draft tokens a message on the embedded draft)."""
        try:
            yield
        except PromptTooLongError as exc:
            hints = []
            if getattr(llama_index.core.global_tokenizer, "func", None) is not encode_text:
                model = "base" if self.mode == "base" else "draft"
                hints.append(
                    "LlamaIndex packs prompts to the window by counting in Settings.tokenizer (tiktoken unless set), "
                    f"which can count fewer tokens than the model does: set Settings.tokenizer = llm.wsd_runtime().encoder({model!r})"
                )
            if sum(m["role"] == "user" for m in messages) > 1:  # a conversation (one agent turn's tool results are not)
                hints.append(
                    "a chat memory counts its messages' text alone against its token_limit, not the chat template around "
                    "each message: give it a token_limit well below llm.metadata.context_window (half of it, say)"
                )
            if hints:
                exc.args = ("; ".join([str(exc), *hints]),)
            raise

    def _stream(self, messages: Messages, kwargs: dict[str, Any]) -> Iterator[ChatResponse]:
        """The responses as the reply streams. The messages are checked here, with the parameters,
        so bad ones raise at the call, before a server has begun its response; the request is sent
        at the first `next()`, as the runtime's stream sends it."""
        params, checked = self.wsd_request(**kwargs)
        accumulate = _Accumulator(checked)
        with self._packing_hint(messages):
            stream = self.wsd_runtime().stream(messages, **params)

        def gen() -> Iterator[ChatResponse]:
            with self._packing_hint(messages), closing(stream) as events:
                for event in events:
                    if (response := accumulate(event)) is not None:
                        yield response

        return gen()

    async def _astream(self, messages: Messages, kwargs: dict[str, Any]) -> AsyncIterator[ChatResponse]:
        """`_stream` for async callers: checked at the await, sent at the first `__anext__()`."""
        params, checked = await self.awsd_request(**kwargs)
        accumulate = _Accumulator(checked)
        with self._packing_hint(messages):
            stream = self.wsd_runtime().astream(messages, **params)

        async def gen() -> AsyncIterator[ChatResponse]:
            with self._packing_hint(messages):
                async with aclosing(stream) as events:
                    async for event in events:
                        if (response := accumulate(event)) is not None:
                            yield response

        return gen()

    def _generate(self, messages: Messages, kwargs: dict[str, Any]) -> ChatResponse:
        params, checked = self.wsd_request(**kwargs)
        with self._packing_hint(messages):
            result = self.wsd_runtime().generate(messages, **params)
        return _final(result, None, ShownCalls(checked).finish(result))

    async def _agenerate(self, messages: Messages, kwargs: dict[str, Any]) -> ChatResponse:
        params, checked = await self.awsd_request(**kwargs)
        with self._packing_hint(messages):
            result = await self.wsd_runtime().agenerate(messages, **params)
        return _final(result, None, ShownCalls(checked).finish(result))

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
        return await self._astream(to_runtime_messages(messages), kwargs)  # type: ignore[return-value]

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
        responses = await self._astream(self._prompt_messages(prompt, formatted), kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            async for response in responses:
                yield _to_completion(response)

        return gen()

    # ------------------------------------------------------------ tools (constrained decoding)

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """chat() arguments: messages, OpenAI-style tool specs, tool_choice (an explicit one wins, then
        tool_required, then the constructor's) and parallel calls (allowed by the call or the constructor).
        Calls are always decoded under their tools' schemas, so `strict` (as OpenAI's) changes nothing."""
        for name, flag in (("allow_parallel_tool_calls", allow_parallel_tool_calls), ("tool_required", tool_required)):
            if not isinstance(flag, bool):  # "yes" was read as True, or named as parallel_tool_calls
                raise InvalidParameterError(f"invalid {name}={flag!r}: must be a bool (True or False)")
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg)
        specs = self._call_tools(list(tools))  # each converted once; an OpenAI-style dict as chat(tools=...) takes it
        self._refuse_unconverted_tools({"tools": specs})  # InvalidParameterError, as chat(tools=...)'s refusal
        tool_choice = kwargs.pop("tool_choice", None) or ("required" if tool_required else self.tool_choice)
        return {
            "messages": messages,
            "tools": specs or None,
            "tool_choice": tool_choice if tools else None,
            "parallel_tool_calls": allow_parallel_tool_calls or self.parallel_tool_calls,
            **kwargs,
        }

    def predict_and_call(self, tools: Sequence[BaseTool], *args: Any, **kwargs: Any) -> Any:
        """FunctionCallingLLM's, decoding as many calls as its own allow_parallel_tool_calls lets it
        run (one by default, whatever the constructor's parallel_tool_calls): its single-call branch
        raises 'Invalid' on more than one."""
        inner = _unspanned(super().predict_and_call)
        return inner(tools, *args, **_calls_it_runs(inner, tools, args, kwargs))

    async def apredict_and_call(self, tools: Sequence[BaseTool], *args: Any, **kwargs: Any) -> Any:
        """apredict_and_call as predict_and_call is."""
        inner = _unspanned(super().apredict_and_call)
        return await inner(tools, *args, **_calls_it_runs(inner, tools, args, kwargs))

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The response's valid calls as ToolSelections; with error_on_no_tool_call, none is an error that
        names the invalid calls, if the reply wrote any. Without it (as FunctionAgent asks), invalid
        calls and no valid one is a RuntimeWarning that names them: the agent takes the reply, whose
        text leaves the call markup out, as its answer."""
        calls = [
            ToolSelection(tool_id=block.tool_call_id or "", tool_name=block.tool_name, tool_kwargs=_arguments(block.tool_kwargs))
            for block in response.message.blocks
            if isinstance(block, ToolCallBlock)
        ]
        invalid = response.message.additional_kwargs.get("invalid_tool_calls") or []
        if not calls and (error_on_no_tool_call or invalid):
            detail = "; ".join(f"{c['raw']!r}: {c['error']}" for c in invalid)
            reason = f"its {len(invalid)} tool call(s) are invalid: {detail}" if invalid else "it made no tool call"
            if error_on_no_tool_call:
                raise ValueError(f"Expected at least one tool call, but {reason}")
            if self._warned.of() is not response:  # FunctionAgent asks twice of its last reply
                self._warned.of = weakref.ref(response)
                warnings.warn(f"The reply has no valid tool call: {reason}", RuntimeWarning, stacklevel=user_stacklevel())
        return calls

    # ------------------------------------------------------------ structured output (constrained JSON)

    def _structured_request(
        self, output_cls: type[BaseModel], prompt: BasePromptTemplate, llm_kwargs: dict[str, Any] | None, prompt_args: dict
    ) -> tuple[list[ChatMessage], dict[str, Any]]:
        """Messages and chat arguments of a structured call; fires LlamaIndex's start event, as LLM does.
        (A request for JSON takes none of the constructor's stops: WSDSettings.wsd_params.) The
        tool-calling path's arguments in `llm_kwargs` are dropped, as LlamaIndex's FunctionCallingProgram
        drops them (code written for OpenAI passes them): the schema is the whole answer here. A
        conversation that ends with an assistant message (`as_structured_llm(...).chat`) is read as it
        stands: the value is a new turn (continue_final_message=False), unless `llm_kwargs` says
        otherwise. The value is the whole reply: the constructor's tools are left out."""
        dispatcher.event(LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt, template_args=prompt_args))
        kwargs = {k: v for k, v in (llm_kwargs or {}).items() if k not in _TOOL_PATH_KWARGS}
        return self._get_messages(prompt, **prompt_args), {"continue_final_message": False, **kwargs, "response_format": output_cls, "tools": ()}

    def _constrains(self) -> bool:
        """Whether structured calls decode under the schema: in the default program mode, with the
        structured extra installed; else LlamaIndex's own programs run (text parsing without the extra)."""
        return self.pydantic_program_mode == PydanticProgramMode.DEFAULT and can_constrain()

    @staticmethod
    def _structured_result(output_cls: type[Model], response: ChatResponse) -> Model:
        result = _validated(output_cls, response)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    @dispatcher.span
    def structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """The reply decoded under output_cls's JSON schema, validated into output_cls."""
        if not self._constrains():
            return _unspanned(super().structured_predict)(output_cls, prompt, llm_kwargs, **prompt_args)
        messages, kwargs = self._structured_request(output_cls, prompt, llm_kwargs, prompt_args)
        return self._structured_result(output_cls, self.chat(messages, **kwargs))

    @dispatcher.span
    async def astructured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Model:
        """Async structured_predict, on the runtime's async stream."""
        if not self._constrains():
            return await _unspanned(super().astructured_predict)(output_cls, prompt, llm_kwargs, **prompt_args)
        messages, kwargs = self._structured_request(output_cls, prompt, llm_kwargs, prompt_args)
        return self._structured_result(output_cls, await self.achat(messages, **kwargs))

    @dispatcher.span
    def stream_structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> Generator[Model | FlexibleModel, None, None]:
        """Partial objects while the JSON streams, as LlamaIndex yields them, then the validated object.
        As LlamaIndex's, nothing starts (no request, no event) until the first object is asked for."""
        if not self._constrains():
            return _unspanned(super().stream_structured_predict)(output_cls, prompt, llm_kwargs, **prompt_args)

        def gen() -> Generator[Model | FlexibleModel, None, None]:
            messages, kwargs = self._structured_request(output_cls, prompt, llm_kwargs, prompt_args)
            partial = _Partials(output_cls)
            with closing(self.stream_chat(messages, **kwargs)) as responses:
                for response in responses:
                    if (obj := partial.add(response)) is not None:
                        yield obj
            yield partial.validated()

        return gen()

    @dispatcher.span
    async def astream_structured_predict(
        self,
        output_cls: type[Model],
        prompt: BasePromptTemplate,
        llm_kwargs: dict[str, Any] | None = None,
        **prompt_args: Any,
    ) -> AsyncGenerator[Model | FlexibleModel, None]:
        """Async stream_structured_predict, on the runtime's async stream."""
        if not self._constrains():
            return await _unspanned(super().astream_structured_predict)(output_cls, prompt, llm_kwargs, **prompt_args)

        async def gen() -> AsyncGenerator[Model | FlexibleModel, None]:
            messages, kwargs = self._structured_request(output_cls, prompt, llm_kwargs, prompt_args)
            partial = _Partials(output_cls)
            async with aclosing(await self.astream_chat(messages, **kwargs)) as responses:
                async for response in responses:
                    if (obj := partial.add(response)) is not None:
                        yield obj
            yield partial.validated()

        return gen()


def _tool_spec(tool: BaseTool, i: int) -> dict[str, Any]:
    """A tool as the OpenAI-style spec the runtime takes, under the tool's own name: LlamaIndex's
    spec writes "add.v2" as "add_v2" (OpenAI's rule, not the runtime's), and a call of "add_v2"
    found no tool to run (predict_and_call's KeyError). Anything else (a bare function, say) is a
    TypeError that names it (it was an AttributeError on `.metadata`)."""
    to_openai_tool = getattr(getattr(tool, "metadata", None), "to_openai_tool", None)
    if not callable(to_openai_tool):
        raise TypeError(f"tools[{i}] is {tool!r}, not a LlamaIndex tool; wrap a function in FunctionTool.from_defaults(fn)")
    spec = to_openai_tool(skip_length_check=True)
    name = tool.metadata.name
    if isinstance(name, str) and name:
        spec["function"]["name"] = name
    return spec


def _arguments(kwargs: dict[str, Any] | str) -> dict[str, Any]:
    """A call's arguments: a finished call's dict, or the JSON text a call being written has so far,
    parsed as far as it goes (LlamaIndex's partial parse; {} before its first key)."""
    if isinstance(kwargs, dict):
        return kwargs
    try:
        parsed = parse_partial_json(kwargs)
    except ValueError:  # json.JSONDecodeError is one
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _unspanned(method: Callable[..., Any]) -> Callable[..., Any]:
    """A LlamaIndex method without its instrumentation span, for an override (which LlamaIndex
    spans itself) to call: the span of the override is the call's one span, not two nested."""
    return getattr(method, "__wrapped__", method)


def _calls_it_runs(method: Callable[..., Any], tools: Sequence[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """(a)predict_and_call's keyword arguments, with the runtime's parallel_tool_calls set to its
    allow_parallel_tool_calls, however it was passed (bound to `method`'s signature, its default if not)."""
    bound = inspect.signature(method).bind(tools, *args, **kwargs)
    bound.apply_defaults()
    return {"parallel_tool_calls": bound.arguments.get("allow_parallel_tool_calls", False), **kwargs}


def _validated(output_cls: type[Model], response: ChatResponse) -> Model:
    """The reply validated into output_cls; a reply that max_tokens or a stop string cut short raises
    ReplyCutShortError with the runtime's parse_error, which names the limit and how to lift it,
    and one that writes a key twice InvalidReplyError (pydantic would keep its last value)."""
    raw, content = response.raw or {}, response.message.content or ""
    if cut_short(raw) and raw.get("parse_error"):
        raise ReplyCutShortError(f"{output_cls.__name__}: {raw['parse_error']}")
    value = output_cls.model_validate_json(strict_json(content))
    if (repeated := repeated_key_error(raw, content)) is not None:
        raise InvalidReplyError(f"{output_cls.__name__}: {repeated}")
    return value


class _Partials:
    """Stream chunks as partial objects (LlamaIndex's process_streaming_objects), then the final
    response validated, once the chat has ended: a reply cut short fails the object, while the
    chat's own events still end with its response and usage."""

    def __init__(self, output_cls: type[BaseModel]) -> None:
        self.output_cls = output_cls
        self.objects: list[Any] | None = None
        self.final: ChatResponse | None = None

    def add(self, response: ChatResponse) -> Any | None:
        """A chunk's partial object; None for the final response (raw set), which is kept for `validated`."""
        if response.raw is not None:
            self.final = response
            return None
        obj = process_streaming_objects(response, self.output_cls, cur_objects=self.objects, flexible_mode=True)
        self.objects = [obj]
        dispatcher.event(LLMStructuredPredictInProgressEvent(output=obj))
        return obj

    def validated(self) -> Any:
        """The final response as output_cls (the stream has ended with it)."""
        assert self.final is not None, "a chat stream ends with its final response"
        obj = _validated(self.output_cls, self.final)
        dispatcher.event(LLMStructuredPredictInProgressEvent(output=obj))
        dispatcher.event(LLMStructuredPredictEndEvent(output=obj))
        return obj
