"""WSDLLM, the LlamaIndex adapter: eight methods, streaming, stops, metadata, messages, shared runtime."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from llama_index.core.base.llms.types import (
    AudioBlock,
    CacheControl,
    CachePoint,
    ChatMessage,
    CitationBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
)

import wsd_llms
from llama_index.core.indices.prompt_helper import PromptHelper
from llama_index.llms.wsd import WSDLLM
from wsd_llms.events import FinalEvent, TextDelta, Timings, Usage, WSDResult
from wsd_llms.loading import EMBEDDED_BASE, EMBEDDED_DRAFT, local_source

QUESTION = "What is the capital of France?"
MESSAGES = [ChatMessage(role="user", content=QUESTION)]
METHODS = ["chat", "stream_chat", "achat", "astream_chat", "complete", "stream_complete", "acomplete", "astream_complete"]


def text_of(response: Any) -> str:
    return response.text if hasattr(response, "text") else response.message.content


async def run(llm: WSDLLM, method: str, **kwargs: Any) -> tuple[Any, list[Any]]:
    """Call one of the eight methods on QUESTION; return the final response and the stream's chunks."""
    out = getattr(llm, method)(MESSAGES if "chat" in method else QUESTION, **kwargs)
    if method.startswith("a"):
        out = await out
    if "stream" not in method:
        return out, []
    chunks = [c async for c in out] if method.startswith("a") else list(out)
    return chunks[-1], chunks


@pytest.fixture(scope="module")
def llm(embedded: wsd_llms.WSDRuntime) -> WSDLLM:
    return WSDLLM(max_tokens=12)


@pytest.fixture(scope="module")
def reference(llm: WSDLLM) -> str:
    return llm.chat(MESSAGES).message.content


@pytest.mark.embedded
async def test_eight_methods_same_text(llm: WSDLLM, reference: str) -> None:
    assert reference.strip()
    for method in METHODS:
        final, chunks = await run(llm, method)
        assert text_of(final) == reference, method
        joined = ""
        for chunk in chunks[:-1]:
            joined += chunk.delta
            assert text_of(chunk) == joined, method
            assert chunk.additional_kwargs["wsd_source"] in ("draft", "base")
        if chunks:
            assert chunks[-1].delta == "" and joined == reference, method
        assert final.raw["usage"]["output_tokens"] > 0, method
        assert final.raw["wsd"]["draft_model"] == llm.wsd_runtime().draft_source
        assert final.additional_kwargs["completion_tokens"] == final.raw["usage"]["output_tokens"]


@pytest.mark.embedded
@pytest.mark.parametrize("where", ["call", "constructor"])
async def test_stop_strings_in_every_method(llm: WSDLLM, reference: str, where: str) -> None:
    stop = " of"
    assert stop in reference
    expected = reference.split(stop)[0]
    stopping = WSDLLM(max_tokens=12, stop=[stop] if where == "constructor" else None)
    for method in METHODS:
        final, _ = await run(stopping, method, **({"stop": [stop]} if where == "call" else {}))
        assert text_of(final) == expected, method


def test_metadata_reads_config_without_loading() -> None:
    base_dir = str(local_source(EMBEDDED_BASE))
    llm = WSDLLM(base_model=base_dir, max_tokens=77)
    meta = llm.metadata
    assert not llm.wsd_runtime().loaded
    assert meta.context_window == 8192  # SmolLM2-135M's: a prompt must fit both models (Gemma-3-270M's is 32768)
    assert WSDLLM(base_model=base_dir, mode="base").metadata.context_window == 32768
    # context_window, as LlamaIndex's LLMs take it, caps what LlamaIndex packs; never past the models' window
    assert WSDLLM(base_model=base_dir, context_window=2048).metadata.context_window == 2048
    assert WSDLLM(base_model=base_dir, context_window=100_000).metadata.context_window == 8192
    assert WSDLLM(base_model=local_source(EMBEDDED_BASE)).metadata.context_window == 8192  # a path object is taken
    draft_tokens = llm.wsd_runtime().encoder("draft")("Hello there")  # for Settings.tokenizer (README)
    assert draft_tokens and not llm.wsd_runtime().loaded
    assert meta.num_output == 77
    assert meta.is_chat_model
    assert meta.is_function_calling_model == all(importlib.util.find_spec(m) is not None for m in ("xgrammar", "jsonschema"))
    assert meta.model_name == base_dir
    assert WSDLLM(base_model=base_dir, mode="draft").metadata.model_name == EMBEDDED_DRAFT  # the draft alone writes the reply


@pytest.mark.parametrize(
    ("settings", "room"),
    [
        ({"max_tokens": 77}, 77),
        ({"max_tokens": 300, "max_draft_tokens": 100}, 100),  # the draft writes at most 100 in its window
        ({"max_tokens": 9000}, 512),  # the base writes the rest in its 32768
        ({"max_tokens": 30000}, 30000 - (32768 - 8192)),  # more than the base's window holds past the draft's
        ({"max_tokens": 9000, "mode": "base"}, 9000),
        ({"max_tokens": 300, "max_draft_tokens": 100, "mode": "draft"}, 300),
        ({"max_tokens": 7000, "mode": "draft"}, 7000),
        ({"max_tokens": 30000, "mode": "base"}, 30000),
        # A reply that could fill the window leaves the prompt 1024 tokens, or a quarter of a smaller
        # window (the runtime caps max_tokens at the window's end)
        ({"max_tokens": 100_000}, 8192 - 1024),
        ({"max_tokens": 32768}, 8192 - 1024),
        ({"max_tokens": 9000, "mode": "draft"}, 8192 - 1024),
        ({"max_tokens": 10**6, "mode": "base"}, 32768 - 1024),
        ({"max_tokens": 30000, "context_window": 4096}, 4096 - 1024),  # of the window LlamaIndex is told to fill
        ({"max_tokens": 30000, "context_window": 2048}, 2048 - 512),
    ],
)
def test_num_output_is_the_room_the_reply_needs_in_the_reported_window(settings: dict[str, Any], room: int) -> None:
    """LlamaIndex packs prompts into `context_window - num_output`. WSD's draft, whose window is the
    one reported, writes at most max_draft_tokens; the base writes the reply in its own larger window.
    With num_output = max_tokens, a max_tokens of 8192 or more failed every query engine's packing."""
    llm = WSDLLM(base_model=str(local_source(EMBEDDED_BASE)), **settings)
    meta = llm.metadata
    assert meta.num_output == room and not llm.wsd_runtime().loaded
    assert PromptHelper.from_llm_metadata(meta)._get_available_context_size(100) == meta.context_window - 100 - room > 0


def test_metadata_before_the_first_load_converts_nothing_and_waits_for_no_load(monkeypatch, tmp_path) -> None:
    """LlamaIndex reads metadata on every call (to_payload), on the event loop for achat: before the
    first load it had converted the embedded models there (half a minute), and for a hub model it
    waited for a load in progress. The window now comes from the GGUF headers, and from the hub's
    cache while the models load."""
    import threading

    import huggingface_hub.constants

    import wsd_llms.runtime
    from tests.tiny import make_tokenizer, tiny_llama

    monkeypatch.setattr(wsd_llms.runtime, "_registry", {})  # runtimes of their own, that have read nothing yet
    monkeypatch.setenv("WSD_LLMS_CACHE", str(tmp_path / "empty"))
    assert WSDLLM().metadata.context_window == 8192 and WSDLLM(mode="base").metadata.context_window == 32768
    assert not (tmp_path / "empty").exists()

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    tiny_llama(make_tokenizer(300), 0).model.config.save_pretrained(snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    llm = WSDLLM(base_model="someone/tiny", mode="base")
    windows: list[int] = []
    with llm.wsd_runtime()._lock:  # as a load in progress holds it
        reader = threading.Thread(target=lambda: windows.append(llm.metadata.context_window), daemon=True)
        reader.start()
        reader.join(timeout=10)
    assert windows == [512]


@pytest.mark.embedded
def test_metadata_matches_loaded_model(embedded: wsd_llms.WSDRuntime) -> None:
    engine = embedded.load()
    assert WSDLLM().metadata.context_window == min(engine.draft.context_window, engine.base.context_window)
    assert WSDLLM().metadata.model_name == EMBEDDED_BASE


def test_constructor_names_unknown_arguments_and_takes_one_stop_string() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown argument 'model' \\(value 'llama3'\\); name the models with draft_model and base_model"):
        WSDLLM(model="llama3")
    with pytest.raises(ValidationError, match="unknown argument 'num_ctx' \\(value 2048\\); did you mean 'context_window'\\? \\(other APIs' name"):
        WSDLLM(num_ctx=2048)  # Ollama's
    with pytest.raises(ValidationError, match="'stopping_ids' \\(value \\[1\\]\\) \\(not offered: a reply ends at the model's end-of-turn ids and at stop strings"):
        WSDLLM(stopping_ids=[1])  # HuggingFaceLLM's: ids, which stop (strings) does not take
    with pytest.raises(ValidationError, match="'additional_kwargs' \\(value \\{'top_k': 3\\}\\); give each request parameter as an argument of its own"):
        WSDLLM(additional_kwargs={"top_k": 3})
    with pytest.raises(ValidationError, match="'json_mode' \\(value True\\); did you mean response_format=\\{'type': 'json_object'\\}\\?"):
        WSDLLM(json_mode=True)  # OpenAILike's; a loose match had named base_model
    with pytest.raises(ValidationError, match="'max_retries' \\(value 3\\) \\(not offered: a local model has no key and no network call to retry\\)"):
        WSDLLM(max_retries=3)  # had been "did you mean 'max_tokens'?"
    with pytest.raises(ValidationError, match="context_window\n  Input should be greater than 0"):
        WSDLLM(context_window=0)
    llm = WSDLLM(stop="\n\n")
    assert llm.stop == ["\n\n"] and WSDLLM.from_dict(llm.to_dict()).stop == ["\n\n"]
    assert WSDLLM.model_validate(llm.model_dump()).stop == ["\n\n"]  # a dump carries LlamaIndex's class_name
    for empty in ("", ["\n", ""]):  # refused when the model is built, as every call would refuse it
        with pytest.raises(ValidationError, match="stop strings must be non-empty"):
            WSDLLM(stop=empty)


def test_is_chat_model_and_is_function_calling_model_are_taken_where_they_say_what_metadata_says() -> None:
    """HuggingFaceLLM's and Ollama's flags: true ones (routine in their users' code) are taken and
    change nothing; a false one asks for what this LLM is not, and is refused naming it."""
    from pydantic import ValidationError

    llm = WSDLLM(is_chat_model=True, is_function_calling_model=True, max_tokens=7)
    assert (llm.metadata.is_chat_model, llm.metadata.is_function_calling_model, llm.max_tokens) == (True, True, 7)
    assert WSDLLM(is_chat_model=None).metadata.is_chat_model  # None is "not given"
    with pytest.raises(ValidationError, match="is_chat_model=False: WSDLLM is a chat model \\(metadata.is_chat_model is True\\); leave is_chat_model out"):
        WSDLLM(is_chat_model=False)
    with pytest.raises(ValidationError, match="is_function_calling_model=0: WSDLLM calls functions \\(metadata.is_function_calling_model is True\\)"):
        WSDLLM(is_function_calling_model=0)


def test_a_prompt_formatter_the_chat_model_never_applies_is_refused() -> None:
    """messages_to_prompt and query_wrapper_prompt (HuggingFaceLLM's) had been taken and ignored:
    the runtime formats the messages itself. completion_to_prompt and system_prompt do apply."""
    from llama_index.core import PromptTemplate
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="messages_to_prompt: WSDLLM formats the messages itself"):
        WSDLLM(messages_to_prompt=lambda messages: "x")
    with pytest.raises(ValidationError, match="query_wrapper_prompt: WSDLLM formats the messages itself"):
        WSDLLM(query_wrapper_prompt=PromptTemplate("<s>{query_str}"))
    llm = WSDLLM(completion_to_prompt=lambda prompt: f"Q: {prompt}", system_prompt="Be brief.")
    assert WSDLLM(**dict(llm)).system_prompt == "Be brief."  # an LLM's fields carry LlamaIndex's default formatter: no choice
    assert llm._prompt_messages("hi", formatted=False) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: hi"}]
    with pytest.raises(ValidationError) as err:  # an unknown argument's list of those allowed leaves the refused two out
        WSDLLM(messages_to_promt=lambda messages: "x")
    allowed = str(err.value).split("(allowed: ")[1].split(")")[0].split(", ")
    assert "completion_to_prompt" in allowed and "messages_to_prompt" not in allowed and "query_wrapper_prompt" not in allowed
    assert "unknown argument 'messages_to_promt' (value <function" in str(err.value) and "did you mean" not in str(err.value)  # nor suggested


def test_the_runtime_s_encoder_counts_message_text_as_text() -> None:
    """The README's Settings.tokenizer: a special token's text counts as the text it is, under the
    encode lock the worker's prompts take (wsd_llms.encoding)."""
    from wsd_llms.encoding import encode_text

    runtime = WSDLLM(draft_model=str(local_source(EMBEDDED_DRAFT)), base_model=str(local_source(EMBEDDED_BASE))).wsd_runtime()
    tokenizer, encode = runtime.tokenizer("draft"), runtime.encoder("draft")
    text = "Close </s> and <|im_start|>system"
    assert encode(text) == encode_text(tokenizer, text) and len(encode(text)) > len(tokenizer.encode(text, add_special_tokens=False))


def test_runtime_is_shared() -> None:
    assert WSDLLM().wsd_runtime() is wsd_llms.get_runtime()
    try:
        from langchain_wsd import WSDChatModel
    except ImportError:
        pytest.skip("langchain_wsd.WSDChatModel is not importable")
    assert WSDChatModel().wsd_runtime() is WSDLLM().wsd_runtime()


class Recorder:
    """Stands in for the runtime's streams, to see exactly which messages reach it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[dict[str, str]]]] = []
        self.result = WSDResult("ok", "stop", None, "ok", Usage(), Timings(), "d", "b", "online")

    def stream(self, messages: list[dict[str, str]], **params: Any) -> Iterator[Any]:
        self.calls.append(("stream", list(messages)))
        yield TextDelta("ok", "draft")
        yield FinalEvent(self.result)

    async def astream(self, messages: list[dict[str, str]], **params: Any) -> AsyncIterator[Any]:
        self.calls.append(("astream", list(messages)))
        yield TextDelta("ok", "draft")
        yield FinalEvent(self.result)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> tuple[WSDLLM, Recorder]:
    # metadata (read by LlamaIndex's callbacks) needs real configs; the models are never loaded
    llm = WSDLLM(draft_model=str(local_source(EMBEDDED_DRAFT)), base_model=str(local_source(EMBEDDED_BASE)), system_prompt="Be brief.")
    recorder = Recorder()
    monkeypatch.setattr(llm.wsd_runtime(), "stream", recorder.stream)
    monkeypatch.setattr(llm.wsd_runtime(), "astream", recorder.astream)
    return llm, recorder


async def test_formatted_prompt_is_not_templated_again(recorded: tuple[WSDLLM, Recorder]) -> None:
    llm, recorder = recorded
    prompt = "Context: x\n\nQuestion: y\nAnswer: "
    for method in ["complete", "stream_complete", "acomplete", "astream_complete"]:
        out = getattr(llm, method)(prompt, formatted=True)
        out = await out if method.startswith("a") else out
        if "stream" in method:
            _ = [c async for c in out] if method.startswith("a") else list(out)
    assert [kind for kind, _ in recorder.calls] == ["stream", "stream", "astream", "astream"]
    assert all(messages == [{"role": "user", "content": prompt}] for _, messages in recorder.calls)


def test_unformatted_prompt_gets_completion_to_prompt_and_system_prompt(recorded: tuple[WSDLLM, Recorder]) -> None:
    llm, recorder = recorded
    llm.completion_to_prompt = lambda p: f"Q: {p}"
    assert llm.complete("y").text == "ok"
    assert recorder.calls == [("stream", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: y"}])]


async def test_a_prompt_that_is_not_a_str_is_named_as_the_prompt(recorded: tuple[WSDLLM, Recorder]) -> None:
    """complete(["a"]) was told "messages[0] (user) content must be a str": a shape the caller never wrote."""
    llm, recorder = recorded
    for method in ["complete", "stream_complete", "acomplete", "astream_complete"]:
        for formatted in (False, True):
            with pytest.raises(wsd_llms.InvalidMessagesError, match=r"^prompt must be a str, got list$"):
                out = getattr(llm, method)(["a"], formatted=formatted)
                await out if method.startswith("a") else out
    llm.completion_to_prompt = lambda p: [p]
    with pytest.raises(wsd_llms.InvalidMessagesError, match=r"^completion_to_prompt must return a str, returned list$"):
        llm.complete("y")
    assert recorder.calls == []


def test_a_plain_text_document_is_read_as_the_langchain_adapter_reads_one(tmp_path: Any) -> None:
    """A text/* DocumentBlock, given as data or as a local file, is its text (it was refused, where
    LangChain's 'text-plain' block was read); one given by url only, one that is not UTF-8 and a
    document of another kind (a PDF) are refused, named by their place."""
    from llama_index.core.base.llms.types import DocumentBlock

    from llama_index.llms.wsd.base import to_runtime_messages

    notes = tmp_path / "notes.md"
    notes.write_text("café notes", encoding="utf-8")
    blocks = [DocumentBlock(data=b"hello doc", document_mimetype="text/plain"), DocumentBlock(path=notes, document_mimetype="text/markdown"), TextBlock(text="q")]
    assert to_runtime_messages([ChatMessage(role="user", blocks=blocks)]) == [{"role": "user", "content": "hello doc\ncafé notes\nq"}]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    spelled = [DocumentBlock(path=latin, document_mimetype="Text/Plain; charset=latin-1"), DocumentBlock(path=notes)]  # its charset; a path's type
    assert to_runtime_messages([ChatMessage(role="user", blocks=spelled)]) == [{"role": "user", "content": "café\ncafé notes"}]
    for bad, needle in [
        (DocumentBlock(url="http://example.invalid/a.txt", document_mimetype="text/plain"), "block 1 is a text/plain DocumentBlock given by url only"),
        (DocumentBlock(data=b"\xff\xfe", document_mimetype="text/plain"), "block 1 is a text/plain DocumentBlock whose text cannot be read: 'utf-8' codec"),
        (DocumentBlock(data=b"%PDF-1.4", document_mimetype="application/pdf"), "block 1 has type 'DocumentBlock'; this model reads text only"),
    ]:
        with pytest.raises(wsd_llms.InvalidMessagesError, match=re.escape(needle)):
            to_runtime_messages([ChatMessage(role="user", blocks=[TextBlock(text="q"), bad])])


@pytest.mark.parametrize(
    "block", [ImageBlock(url="http://example.invalid/cat.png"), AudioBlock(url="http://example.invalid/a.wav")]
)
async def test_media_blocks_get_a_clear_error(recorded: tuple[WSDLLM, Recorder], block: Any) -> None:
    llm, recorder = recorded
    message = ChatMessage(role="user", blocks=[TextBlock(text="What is this?"), block])
    with pytest.raises(wsd_llms.InvalidMessagesError, match=type(block).__name__):
        llm.chat([message])
    # its place among all the message's blocks, those left out too (it had counted only the rest)
    thought = ChatMessage(role="user", blocks=[ThinkingBlock(content="Hm."), TextBlock(text="What is this?"), block])
    # named in LlamaIndex's words (it had offered LangChain's 'text' or 'text-plain' blocks)
    readable = r"TextBlock, or a DocumentBlock whose document_mimetype is text/\*"
    with pytest.raises(wsd_llms.InvalidMessagesError, match=rf"content block 2 has type '{type(block).__name__}'; this model reads text only \({readable}\)$"):
        llm.chat([thought])
    with pytest.raises(wsd_llms.InvalidMessagesError, match=type(block).__name__):
        await llm.astream_chat([message])
    assert recorder.calls == []


@pytest.mark.parametrize("method", ["stream_chat", "astream_chat", "stream_complete", "astream_complete"])
async def test_streams_refuse_bad_messages_at_the_call(method: str) -> None:
    """A streaming method raises a bad message at the call (the await, for the async ones), as it
    raises a bad parameter, not at the first response: a server that returns the responses as a
    stream had begun its reply by then. Nothing loads, and nothing is sent."""
    llm = WSDLLM(draft_model=str(local_source(EMBEDDED_DRAFT)), base_model=str(local_source(EMBEDDED_BASE)))
    bad = "bad \ud800 text"
    with pytest.raises(wsd_llms.InvalidMessagesError, match=r"^messages\[0\] \(user\) content is not valid Unicode: unpaired surrogate"):
        out = getattr(llm, method)([ChatMessage(role="user", content=bad)] if "chat" in method else bad)
        if method.startswith("a"):
            await out
    if "chat" in method:
        with pytest.raises(wsd_llms.InvalidMessagesError, match="messages is empty"):
            out = getattr(llm, method)([])
            if method.startswith("a"):
                await out
    assert llm.wsd_runtime().engine is None and llm.wsd_runtime().stats().finished == 0


def test_text_blocks_join_as_content_does_and_other_models_blocks_are_left_out(recorded: tuple[WSDLLM, Recorder]) -> None:
    """Text blocks reach the model joined with newlines, as ChatMessage.content joins them; another
    model's thinking, Anthropic's cache points and its citations (a history from another provider)
    are not text; a citation was refused as a block the model cannot read."""
    llm, recorder = recorded
    history = [
        ChatMessage(role="system", blocks=[TextBlock(text="Be brief."), CachePoint(cache_control=CacheControl(type="ephemeral"))]),
        ChatMessage(role="user", blocks=[TextBlock(text="Context: Paris is in France."), TextBlock(text="Where is Paris?")]),
        ChatMessage(role="assistant", blocks=[ThinkingBlock(content="Easy."), TextBlock(text="In France.")]),
        ChatMessage(role="user", content="And Rome?"),
        ChatMessage(
            role="assistant",
            blocks=[TextBlock(text="In Italy."), CitationBlock(cited_content="Rome is in Italy.", source="atlas", title="Atlas", additional_location_info={})],
        ),
        ChatMessage(role="user", content="Sure?"),
    ]
    llm.chat(history)
    assert recorder.calls[0][1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": history[1].content},
        {"role": "assistant", "content": "In France."},
        {"role": "user", "content": "And Rome?"},
        {"role": "assistant", "content": "In Italy."},
        {"role": "user", "content": "Sure?"},
    ]
    assert history[1].content == "Context: Paris is in France.\nWhere is Paris?"


def test_react_observations_in_tool_role_reach_the_model(recorded: tuple[WSDLLM, Recorder]) -> None:
    """ReActChatFormatter(observation_role=TOOL), LlamaIndex's advice for tool-calling models, writes
    observations as tool messages that answer no call by id."""
    from llama_index.core.agent.react import ReActChatFormatter
    from llama_index.core.agent.react.types import ActionReasoningStep, ObservationReasoningStep

    llm, recorder = recorded
    steps = [ActionReasoningStep(thought="add", action="add", action_input={"a": 3, "b": 4}), ObservationReasoningStep(observation="7")]
    messages = ReActChatFormatter.from_defaults(observation_role=MessageRole.TOOL).format([], [ChatMessage(role="user", content="3+4?")], steps)
    llm.chat(messages)
    sent = recorder.calls[0][1]
    assert sent[-1] == {"role": "tool", "content": "Observation: 7"} and [m["role"] for m in sent] == ["system", "user", "assistant", "tool"]


@pytest.mark.parametrize("method", METHODS)
async def test_token_counting_handler_counts_the_runtime_tokens(draft_tokenizer, monkeypatch, method):
    """LlamaIndex's TokenCountingHandler takes each call's counts from the response's usage (the base
    model's tokens), not from its own tiktoken estimate, for all eight methods."""
    from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
    from tiny import make_tokenizer, tiny_gemma3, tiny_llama

    from wsd_llms.integration import WSDSettings

    runtime = wsd_llms.WSDRuntime.from_models(
        tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0), tiny_gemma3(make_tokenizer(420), 1, "tiny-gemma3")
    )
    monkeypatch.setattr(WSDSettings, "wsd_runtime", lambda self: runtime)
    try:
        counter = TokenCountingHandler()
        final, _ = await run(WSDLLM(max_tokens=10, callback_manager=CallbackManager([counter])), method)
        usage = final.raw["usage"]
        assert (counter.prompt_llm_token_count, counter.completion_llm_token_count) == (usage["input_tokens"], usage["output_tokens"])
        assert usage["output_tokens"] > 0
    finally:
        runtime.close()


def test_invalid_calls_in_a_history_are_shown_as_written(recorded: tuple[WSDLLM, Recorder]) -> None:
    """A reply's invalid calls (kept in `additional_kwargs["invalid_tool_calls"]`) go back into the
    history as written: the assistant turn had been empty."""
    llm, recorder = recorded
    raw = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b'
    reply = ChatMessage(role="assistant", content="", additional_kwargs={"invalid_tool_calls": [{"raw": raw, "error": "cut", "name": "add", "id": "call_1"}]})
    llm.chat([ChatMessage(role="user", content="1+2?"), reply, ChatMessage(role="user", content="Try again.")])
    assert recorder.calls[0][1][1] == {"role": "assistant", "content": raw}


@pytest.mark.parametrize("method", METHODS)
async def test_a_prompt_too_long_says_how_llamaindex_packed_it(draft_tokenizer, monkeypatch, method):
    """LlamaIndex packs prompts to the window by tiktoken's count unless Settings.tokenizer is set,
    and tiktoken counts fewer tokens than a small model's tokenizer: a packed prompt overflowed with
    no word of why. PromptTooLongError now names the fix, in all eight methods, unless
    Settings.tokenizer is the runtime's encoder already."""
    import llama_index.core
    from tiny import make_tokenizer, tiny_gemma3, tiny_llama

    from wsd_llms.integration import WSDSettings

    runtime = wsd_llms.WSDRuntime.from_models(
        tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0), tiny_gemma3(make_tokenizer(420), 1, "tiny-gemma3")
    )
    monkeypatch.setattr(WSDSettings, "wsd_runtime", lambda self: runtime)
    long = "word " * (runtime.context_window() + 10)
    try:
        for tokenizer, hinted in ((None, True), (runtime.encoder("draft"), False)):
            monkeypatch.setattr(llama_index.core, "global_tokenizer", tokenizer)
            with pytest.raises(wsd_llms.PromptTooLongError) as caught:
                out = getattr(WSDLLM(max_tokens=4), method)([ChatMessage(role="user", content=long)] if "chat" in method else long)
                out = await out if method.startswith("a") else out
                if "stream" in method:
                    _ = [c async for c in out] if method.startswith("a") else list(out)
            assert "context window" in str(caught.value)
            assert ("set Settings.tokenizer = llm.wsd_runtime().encoder('draft')" in str(caught.value)) is hinted
            assert "chat memory" not in str(caught.value)  # one question: no memory chose it
    finally:
        runtime.close()


async def test_a_conversation_too_long_says_how_a_chat_memory_counts(draft_tokenizer, monkeypatch):
    """A chat memory (ChatMemoryBuffer, Memory) counts its messages' text alone against its token_limit,
    not the chat template around each: a long chat of short turns overflowed the window, and the
    error's only advice, Settings.tokenizer, could not help once it was set."""
    import llama_index.core
    from tiny import make_tokenizer, tiny_gemma3, tiny_llama

    from wsd_llms.integration import WSDSettings

    runtime = wsd_llms.WSDRuntime.from_models(
        tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0), tiny_gemma3(make_tokenizer(420), 1, "tiny-gemma3")
    )
    monkeypatch.setattr(WSDSettings, "wsd_runtime", lambda self: runtime)
    monkeypatch.setattr(llama_index.core, "global_tokenizer", runtime.encoder("draft"))
    turns = [ChatMessage(role="user" if i % 2 == 0 else "assistant", content="word " * 20) for i in range(2 * runtime.context_window() // 20 + 1)]
    try:
        with pytest.raises(wsd_llms.PromptTooLongError) as caught:
            WSDLLM(max_tokens=4).chat(turns)
        assert "a chat memory counts its messages' text alone against its token_limit" in str(caught.value)
        assert "Settings.tokenizer" not in str(caught.value)  # it counts in the draft's tokens already
        agent_turn = [ChatMessage(role="user", content="Look it up."), ChatMessage(role="assistant", content="Calling."), ChatMessage(role="tool", content=turns[0].content * 30)]
        with pytest.raises(wsd_llms.PromptTooLongError) as caught:
            WSDLLM(max_tokens=4).chat(agent_turn)  # one agent turn whose tool result is too long: no memory chose it
        assert "chat memory" not in str(caught.value)
    finally:
        runtime.close()


@pytest.mark.parametrize("mode", ["compact", "refine", "tree_summarize"])
async def test_a_query_whose_packed_prompt_is_too_long_raises(draft_tokenizer, monkeypatch, mode):
    """LlamaIndex's refine takes a ValueError for a reply it could not parse: it logged the
    PromptTooLongError of a prompt packed by tiktoken's count and answered "Empty Response". The
    error is not a ValueError (as a provider's context-length error is not), so the query raises it."""
    from llama_index.core.response_synthesizers import get_response_synthesizer
    from tiny import tiny_llama

    from wsd_llms.integration import WSDSettings

    runtime = wsd_llms.WSDRuntime.from_models(
        tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0, window=2048), tiny_llama(draft_tokenizer, 0, "tiny-base", sharpen=3.0, window=2048)
    )
    monkeypatch.setattr(WSDSettings, "wsd_runtime", lambda self: runtime)
    text = "Quizzical jackdaws vex my big sphinx. " * 200  # words the tiny tokenizer never saw: about 4x tiktoken's count
    try:
        synthesizer = get_response_synthesizer(llm=WSDLLM(max_tokens=4), response_mode=mode)
        with pytest.raises(wsd_llms.PromptTooLongError, match="context window"):
            synthesizer.get_response("What vexes the sphinx?", [text])
        with pytest.raises(wsd_llms.PromptTooLongError, match="context window"):
            await synthesizer.aget_response("What vexes the sphinx?", [text])
    finally:
        runtime.close()


@pytest.mark.embedded
def test_a_rag_reply_ends_where_the_base_model_makes_up_the_next_turn(embedded: wsd_llms.WSDRuntime) -> None:
    """Under LlamaIndex's context chat prompt, the base model often ended its answer with a made-up
    turn in a variant of the template's marker ("[User 0", "[User 1</strong>") and ran on to
    max_tokens: a variant at a line's start now ends the reply, streamed or not."""
    from llama_index.core.chat_engine.condense_plus_context import DEFAULT_CONTEXT_PROMPT_TEMPLATE

    documents = "Paris is the capital of France.\n\nMadrid is the capital of Spain. It has the Prado museum."
    system = ChatMessage(role="system", content=DEFAULT_CONTEXT_PROMPT_TEMPLATE.format(context_str=documents))
    llm = WSDLLM(max_tokens=64)
    for question in ("What is the capital of France?", "What is the capital of Spain?", "Name a museum in Madrid."):
        messages = [system, ChatMessage(role="user", content=question)]
        reply = llm.chat(messages)
        text = reply.message.content or ""
        assert not re.search(r"(?m)^\[(User|Assistant|System)\b", text), text
        assert reply.raw["finish_reason"] == "stop" and text.strip(), text
        assert "".join(chunk.delta or "" for chunk in llm.stream_chat(messages)) == text


@pytest.mark.embedded
def test_a_condensed_question_ends_where_the_base_model_makes_up_the_next_turn(embedded: wsd_llms.WSDRuntime) -> None:
    """LlamaIndex's condense prompt calls the two sides Human and Assistant; after the standalone
    question the base model made up the next turn as "\\n\\n[Human]\\n" and went on, and all of it
    became the question sent to the retriever. "[Human]" at a line's start now ends the reply."""
    from llama_index.core.base.llms.generic_utils import messages_to_history_str
    from llama_index.core.chat_engine.condense_question import DEFAULT_PROMPT

    llm = WSDLLM(max_tokens=64)
    for question, answer, follow_up in (
        ("What is the capital of France?", "Paris.", "What is it known for?"),
        ("What is the capital of Germany?", "Berlin.", "What landmark does it have?"),
        ("Is Berlin in France?", "No, in Germany.", "What is France's capital?"),
    ):
        history = messages_to_history_str([ChatMessage(role="user", content=question), ChatMessage(role="assistant", content=answer)])
        messages = DEFAULT_PROMPT.format_messages(chat_history=history, question=follow_up)
        reply = llm.chat(messages)
        text = reply.message.content or ""
        assert "[Human]" not in text and reply.raw["finish_reason"] == "stop" and text.strip(), text
        assert llm.predict(DEFAULT_PROMPT, chat_history=history, question=follow_up) == text  # as the chat engine asks
