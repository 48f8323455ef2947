"""WSDChatModel behaviour: the four core paths agree, chunks and metadata, stops, overrides, callbacks, messages.

The `embedded` tests run a few short greedy replies on the embedded pair; the others use a fake runtime
that records what reaches it, so they cost nothing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, ChatMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_wsd import WSDChatModel
from langchain_wsd.chat_models import to_runtime_messages
from wsd_llms import (
    FinalEvent,
    InvalidMessagesError,
    InvalidParameterError,
    TextDelta,
    Timings,
    Usage,
    WSDResult,
    WSDRuntime,
)
from wsd_llms.integration import result_metadata, usage_counts

QUESTION = "What is the capital of France?"
# A low threshold and short window make this reply switch early: "The capital of France" | " is Paris."
SETTINGS = dict(max_tokens=16, max_draft_tokens=24, switch_threshold=0.5, switch_window=3)


class Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


class AsyncTokens(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


# ---------------------------------------------------------------- on the embedded models


@pytest.fixture(scope="module")
async def replies(embedded) -> dict[str, Any]:
    """One question answered by the runtime itself and through each of the four LangChain paths."""
    model = WSDChatModel(**SETTINGS)
    sync_tokens, async_tokens = Tokens(), AsyncTokens()
    return {
        "runtime": embedded.generate([{"role": "user", "content": QUESTION}], **model.wsd_params()),
        "invoke": model.invoke(QUESTION, config={"callbacks": [sync_tokens]}),
        "stream": list(model.stream(QUESTION)),
        "ainvoke": await model.ainvoke(QUESTION, config={"callbacks": [async_tokens]}),
        "astream": [chunk async for chunk in model.astream(QUESTION)],
        "sync_tokens": sync_tokens.tokens,
        "async_tokens": async_tokens.tokens,
    }


def _joined(chunks: list[AIMessageChunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


@pytest.mark.embedded
def test_invoke_stream_ainvoke_astream_agree(replies):
    expected = replies["runtime"].text
    assert expected.strip()
    assert replies["invoke"].text == expected
    assert _joined(replies["stream"]) == expected
    assert replies["ainvoke"].text == expected
    assert _joined(replies["astream"]) == expected


@pytest.mark.embedded
@pytest.mark.parametrize("path", ["stream", "astream"])
def test_chunks_say_which_model_wrote_them(replies, path):
    result = replies["runtime"]
    assert result.switched
    text_chunks = [c for c in replies[path] if c.text]
    sources = [c.response_metadata["wsd_source"] for c in text_chunks]
    assert set(map(tuple, sources)) == {("draft",), ("base",)}
    draft = [c.text for c in text_chunks if c.response_metadata["wsd_source"] == ["draft"]]
    assert "".join(draft) == result.draft_text
    assert sources == sorted(sources, key=lambda s: s != ["draft"])  # the draft writes first, then the base


@pytest.mark.embedded
@pytest.mark.parametrize("path", ["stream", "astream"])
def test_usage_and_metadata_on_the_final_chunk(replies, path):
    result = replies["runtime"]
    *text_chunks, last = replies[path]
    assert all(c.usage_metadata is None and "model_name" not in c.response_metadata for c in text_chunks)
    assert last.chunk_position == "last" and last.text == ""
    counts = usage_counts(result)
    assert last.usage_metadata == {
        "input_tokens": counts["input_tokens"],
        "output_tokens": counts["output_tokens"],
        "total_tokens": counts["total_tokens"],
        "input_token_details": {"draft": counts["draft"]["input_tokens"]},
        "output_token_details": {
            "draft": counts["draft"]["output_tokens"],
            "kept_draft": counts["draft"]["kept_tokens"],
            "base": counts["base"]["continuation_tokens"],
        },
    }
    meta = last.response_metadata
    expected = result_metadata(result)
    assert (meta["model_name"], meta["model_provider"], meta["finish_reason"]) == ("embedded:gemma-3-270m", "wsd", "stop")
    assert {k: v for k, v in meta["wsd"].items() if k != "timings"} == {
        k: v for k, v in expected["wsd"].items() if k != "timings"
    }
    assert meta["wsd"]["timings"]["total_s"] > 0


@pytest.mark.embedded
@pytest.mark.parametrize("path", ["invoke", "ainvoke"])
def test_invoke_result_carries_usage_and_metadata(replies, path):
    message = replies[path]
    assert isinstance(message, AIMessage)
    assert message.usage_metadata["output_tokens"] == replies["runtime"].usage.reply_tokens
    assert message.response_metadata["model_provider"] == "wsd"
    assert message.response_metadata["wsd"]["switch_point"] == replies["runtime"].switch_point


@pytest.mark.embedded
@pytest.mark.parametrize(("handler", "path"), [("sync_tokens", "stream"), ("async_tokens", "astream")])
def test_callbacks_receive_every_token(replies, handler, path):
    assert replies[handler] == [chunk.text for chunk in replies[path]]


@pytest.mark.embedded
def test_stop_per_call(embedded):
    reply = WSDChatModel(**SETTINGS).invoke(QUESTION, stop=["France"])
    assert reply.text == "The capital of "
    assert reply.response_metadata["finish_reason"] == "stop"


@pytest.mark.embedded
def test_stop_in_constructor(embedded):
    reply = WSDChatModel(**SETTINGS, stop=["Paris"]).invoke(QUESTION)
    assert reply.text == "The capital of France is "


@pytest.mark.embedded
def test_bind_overrides_max_tokens(embedded):
    reply = WSDChatModel(**SETTINGS).bind(max_tokens=2).invoke(QUESTION)
    assert reply.usage_metadata["output_tokens"] == 2
    assert reply.response_metadata["finish_reason"] == "length"


@pytest.mark.embedded
def test_names_repeated_roles_and_a_system_message_in_the_middle(embedded):
    messages = [
        SystemMessage("You are terse."),
        HumanMessage("Hi.", name="alice"),
        HumanMessage("Name a color.", name="bob"),
        AIMessage("Blue.", name="helper"),
        SystemMessage("Answer with one word."),
        HumanMessage("Another one?", name="alice"),
    ]
    reply = WSDChatModel(**SETTINGS).invoke(messages, max_tokens=4)
    assert isinstance(reply, AIMessage) and reply.text.strip()


# ---------------------------------------------------------------- on a fake runtime


class FakeRuntime:
    """Records each request and answers "Hi there" (draft "Hi", base " there")."""

    base_source = "fake-base"
    draft_source = "fake-draft"

    def __init__(self) -> None:
        self.requests: list[tuple[list[dict[str, str]], dict[str, Any]]] = []

    def _events(self, messages: list[dict[str, str]], params: dict[str, Any]) -> list[TextDelta | FinalEvent]:
        self.requests.append((messages, params))
        result = WSDResult(
            "Hi there", "stop", 1, "Hi", Usage(5, 4, 1, 1, 1, 2), Timings(0.1, 0.1, 0.1, 0.1, 0.4), "fake-draft", "fake-base", "online"
        )
        return [TextDelta("Hi", "draft"), TextDelta(" there", "base"), FinalEvent(result)]

    def stream(self, messages: list[dict[str, str]], **params: Any) -> Iterator[TextDelta | FinalEvent]:
        yield from self._events(messages, params)

    async def astream(self, messages: list[dict[str, str]], **params: Any) -> AsyncIterator[TextDelta | FinalEvent]:
        for event in self._events(messages, params):
            yield event


@pytest.fixture
def fake(monkeypatch) -> FakeRuntime:
    runtime = FakeRuntime()
    monkeypatch.setattr(WSDChatModel, "wsd_runtime", lambda self: runtime)
    return runtime


def test_bind_and_call_kwargs_override_the_constructor(fake):
    model = WSDChatModel(temperature=0.2, top_k=10, stop=["a"])
    model.bind(temperature=0.7, seed=3).invoke("x", stop=["b"], top_p=0.9)
    params = fake.requests[-1][1]
    assert (params["temperature"], params["seed"], params["top_p"], params["top_k"]) == (0.7, 3, 0.9, 10)
    assert params["stop"] == ["a", "b"]


@pytest.mark.parametrize("model", [WSDChatModel(), WSDChatModel(streaming=True), WSDChatModel(disable_streaming=True)])
@pytest.mark.parametrize("stream", [True, False])
def test_langchain_stream_flags_are_not_request_parameters(fake, model, stream):
    assert model.invoke("x", stream=stream).text == "Hi there"
    assert "stream" not in fake.requests[-1][1]


async def test_async_paths_never_use_the_sync_stream(fake, monkeypatch):
    def no_sync(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the async path called the sync stream")

    monkeypatch.setattr(fake, "stream", no_sync)
    model = WSDChatModel()
    assert (await model.ainvoke("x")).text == "Hi there"
    assert "".join([c.text async for c in model.astream("x")]) == "Hi there"


def test_unknown_parameter_is_named(fake):
    with pytest.raises(InvalidParameterError, match="temprature"):
        WSDChatModel().invoke("x", temprature=0.5)


def test_per_call_model_must_be_the_base_model(fake):
    model = WSDChatModel()
    assert model.invoke("x", model="fake-base").text == "Hi there"
    with pytest.raises(InvalidParameterError, match="other-model"):
        model.invoke("x", model="other-model")


def test_ls_params():
    model = WSDChatModel(max_tokens=10, temperature=0.3, stop=["a"])
    assert model._get_ls_params(stop=["b"]) == {
        "ls_provider": "wsd",
        "ls_model_name": "embedded:gemma-3-270m",
        "ls_model_type": "chat",
        "ls_temperature": 0.3,
        "ls_max_tokens": 10,
        "ls_stop": ["a", "b"],
    }
    assert model._get_ls_params(model="other", temperature=0.9)["ls_model_name"] == "other"
    assert model._get_ls_params(temperature=0.9)["ls_temperature"] == 0.9
    assert model._llm_type == "wsd-chat"
    assert model._identifying_params["base_model"] == "embedded:gemma-3-270m"


def test_instances_with_the_same_models_share_one_runtime(embedded):
    a, b = WSDChatModel(), WSDChatModel(switch_threshold=0.5, max_tokens=8)
    assert a.wsd_runtime() is b.wsd_runtime() is embedded


def test_construction_loads_nothing(monkeypatch):
    def no_load(self: WSDRuntime) -> None:
        raise AssertionError("construction loaded a model")

    monkeypatch.setattr(WSDRuntime, "load", no_load)
    start = time.perf_counter()
    model = WSDChatModel(draft_model="some/draft", base_model="some/base")
    assert time.perf_counter() - start < 0.5
    assert model._get_ls_params()["ls_model_name"] == "some/base"
    assert not model.wsd_runtime().loaded


def test_non_text_block_names_its_type(fake):
    image = HumanMessage([{"type": "text", "text": "what is this?"}, {"type": "image", "url": "https://x/y.png"}])
    with pytest.raises(InvalidMessagesError, match="'image'"):
        WSDChatModel().invoke([image])
    assert not fake.requests


def test_message_conversion():
    messages = [
        SystemMessage("s1"),
        HumanMessage("u1", name="alice"),
        HumanMessage([{"type": "text", "text": "u2"}, "+"], name="bob"),
        AIMessage("a1", name="helper"),
        SystemMessage("s2"),
        ChatMessage(role="human", content="u3"),
        ChatMessage(role="developer", content="s3"),
    ]
    assert to_runtime_messages(messages) == [
        {"role": "system", "content": "s1"},
        {"role": "user", "content": "u1"},
        {"role": "user", "content": "u2+"},
        {"role": "assistant", "content": "a1"},
        {"role": "system", "content": "s2"},
        {"role": "user", "content": "u3"},
        {"role": "system", "content": "s3"},
    ]


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (ToolMessage("42", tool_call_id="call-1"), "tool messages need tool-calling support"),
        (AIMessage("", tool_calls=[{"name": "add", "args": {}, "id": "call-1"}]), "tool calls needs tool-calling support"),
        (ChatMessage(role="critic", content="x"), "role 'critic'"),
    ],
)
def test_unsupported_messages_get_a_clear_error(message, match):
    with pytest.raises(InvalidMessagesError, match=match):
        to_runtime_messages([HumanMessage("hi"), message])
