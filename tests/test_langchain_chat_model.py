"""WSDChatModel behaviour: the four core paths agree, chunks and metadata, stops, overrides, callbacks, messages.

The `embedded` tests run a few short greedy replies on the embedded pair; the others use a fake runtime
that records what reaches it, so they cost nothing.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.exceptions import (
    ContextOverflowError,
    ModelAPIError,
    ModelInvalidRequestError,
    ModelNotFoundError,
    ModelTimeoutError,
)
from langchain_core.messages import AIMessage, AIMessageChunk, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
import pydantic.v1
from pydantic import BaseModel, Field, ValidationError
from tiny import tiny_llama
from typing_extensions import TypedDict

from langchain_wsd import WSDChatModel
from langchain_wsd.chat_models import to_runtime_messages, to_usage_metadata
from wsd_llms import (
    FinalEvent,
    InvalidMessagesError,
    InvalidParameterError,
    ModelLoadError,
    PromptTooLongError,
    RequestFailedError,
    RequestTimeoutError,
    RequestTooLargeError,
    RuntimeClosedError,
    TextDelta,
    Timings,
    Usage,
    WSDResult,
    WSDRuntime,
)
from wsd_llms.messages import ToolCall, normalize_messages, results_naming_no_call
from wsd_llms.params import parse_params
from wsd_llms.tools import InvalidToolCall
from wsd_llms.integration import result_metadata, usage_counts
from wsd_llms.runtime import measured_length

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
        "input_token_details": {"cache_read": counts["cache_read_tokens"], "draft": counts["draft"]["input_tokens"]},
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
def test_generation_info_and_prompt_token_count(replies):
    """The LLMResult's generation carries finish reason and model (as ChatOllama's does), and
    get_num_tokens_from_messages counts the prompt against the window as the request fed it: in
    the draft's tokens, or a quarter of the base's (its window is 4x the draft's), whichever is more."""
    message, model = replies["invoke"], WSDChatModel(**SETTINGS)
    result = model.generate([[HumanMessage(QUESTION)]])
    meta = message.response_metadata
    assert result.generations[0][0].generation_info == {"finish_reason": meta["finish_reason"], "model_name": meta["model_name"]}
    usage = message.usage_metadata
    measured = max(usage["input_token_details"]["draft"], measured_length(usage["input_tokens"], 8192, 32768))
    assert model.get_num_tokens_from_messages([HumanMessage(QUESTION)]) == measured and model.profile["max_input_tokens"] == 8191
    assert WSDChatModel(mode="base").get_num_tokens_from_messages([HumanMessage(QUESTION)]) == usage["input_tokens"]


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
    assert WSDChatModel(**SETTINGS).invoke(QUESTION, stop="Paris").text == reply.text  # a string is one stop


@pytest.mark.embedded
def test_a_trailing_ai_message_is_a_finished_turn_unless_asked(embedded):
    """A history that ends with an AIMessage (an agent's answer before a handoff or a review step) is
    a finished turn, as ChatOpenAI's and ChatHuggingFace's models read it: the reply is the next turn.
    It was the reply's forced start, so the "new" message began with a copy of the last one. With
    continue_final_message=True (a call's or the constructor's) it is the start, as in the runtime."""
    history = [HumanMessage("Explain gravity in one line."), AIMessage("Gravity is a force.")]
    runtime_history = [{"role": "user", "content": history[0].content}, {"role": "assistant", "content": history[1].content}]
    reply = WSDChatModel(**SETTINGS).invoke(history)
    assert reply.text == embedded.generate(runtime_history, **SETTINGS, continue_final_message=False).text
    started = WSDChatModel(**SETTINGS, continue_final_message=True).invoke(history)
    assert started.text.startswith("Gravity is a force.") and started.text == embedded.generate(runtime_history, **SETTINGS).text
    assert WSDChatModel(**SETTINGS).invoke(history, continue_final_message=True).text == started.text


def test_a_stop_string_is_one_stop_not_one_per_character():
    model = WSDChatModel(stop="\n\n")
    assert model.stop == ["\n\n"]
    assert model.wsd_params(stop="Paris")["stop"] == ["Paris"]
    assert model.bind(stop="Paris").kwargs["stop"] == "Paris"  # reaches wsd_params as it is, and is taken whole


def test_tool_choice_false_leaves_the_constructors_choice():
    """tool_choice=False is "not given" both when binding tools and in a call, as in ChatOpenAI (a
    call's False had overridden a constructor's "required" with "auto")."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    model = WSDChatModel(tool_choice="required")
    assert model.bind_tools(tools, tool_choice=False).kwargs.get("tool_choice") is None
    assert model.wsd_params(tools=tools, tool_choice=False)["tool_choice"] == "required"
    assert model.wsd_params(tools=tools, tool_choice="auto")["tool_choice"] == "auto"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"temprature": 0.9}, "unknown argument 'temprature' (value 0.9); did you mean 'temperature'? (allowed: base_model, base_revision,"),
        ({"model": "Qwen/Qwen2.5-7B"}, "unknown argument 'model' (value 'Qwen/Qwen2.5-7B'); name the models with draft_model and base_model"),
        ({"model_kwargs": {"top_k": 5}}, "unknown argument 'model_kwargs' (value {'top_k': 5}); give each request parameter as an argument of its own"),
        # ChatOllama's: what each means here
        ({"num_ctx": 2048}, "unknown argument 'num_ctx' (value 2048) (not offered: the context window is the models' own"),
        ({"keep_alive": "5m"}, "unknown argument 'keep_alive' (value '5m') (not offered: the models run in this process, with no server to reach"),
        ({"num_predict": 5, "base_url": "http://x"}, "unknown arguments 'base_url' (value 'http://x') (not offered: the models run in this process, "
         "with no server to reach; they stay loaded until the runtime closes); 'num_predict' (value 5): did you mean 'max_tokens'?"),
        ({"device": "gpu"}, "invalid device='gpu'"),
        ({"dtype": "fp16"}, "invalid dtype='fp16'; allowed: auto, float32, float16, bfloat16"),
        ({"temperature": float("nan")}, "temperature\n  Input should be a finite number"),
        ({"max_tokens": True}, "max_tokens\n  Value error, a number is needed, not a bool"),
        ({"trust_remote_code": "yes"}, "trust_remote_code\n  Input should be a valid boolean [type=bool_type, input_value='yes'"),
        ({"trust_remote_code": 1}, "trust_remote_code\n  Input should be a valid boolean [type=bool_type, input_value=1,"),
    ],
)
def test_bad_constructor_arguments_are_named_at_construction(kwargs, needle):
    """LangChain's models ignore unknown arguments; ours names them, and a bad device or dtype, when
    built (not at the first call, before its callbacks start)."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        WSDChatModel(**kwargs)
    assert needle in str(err.value)


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


def fake_result(text: str = "Hi there", **fields: Any) -> WSDResult:
    return WSDResult(
        text, "stop", 1, text[:2], Usage(5, 4, 1, 1, 1, 2), Timings(0.1, 0.1, 0.1, 0.1, 0.4), "fake-draft", "fake-base", "online", **fields
    )


class FakeRuntime:
    """Records each request and answers `reply` (by default "Hi there": draft "Hi", base " there")."""

    base_source = "fake-base"
    draft_source = "fake-draft"

    def __init__(self) -> None:
        self.requests: list[tuple[list[dict[str, str]], dict[str, Any]]] = []
        self.reply = fake_result()
        self.piece = 0  # if set, the text streams this many characters at a time (all the base's)
        self.limits: dict[str, int | None] = {"max_running": 16}

    def _events(self, messages: list[dict[str, str]], params: dict[str, Any]) -> list[TextDelta | FinalEvent]:
        self.requests.append((messages, params))
        text = self.reply.text
        if self.piece:
            return [*(TextDelta(text[i : i + self.piece], "base") for i in range(0, len(text), self.piece)), FinalEvent(self.reply)]
        return [TextDelta(text[:2], "draft"), TextDelta(text[2:], "base"), FinalEvent(self.reply)]

    def stream(self, messages: list[dict[str, str]], **params: Any) -> Iterator[TextDelta | FinalEvent]:
        yield from self._events(messages, params)

    def known_context_window(self, mode: str = "online") -> int | None:
        return 4096

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
    assert params["stop"] == ["b"]  # a call's stop replaces the constructor's, as ChatOpenAI's does
    model.invoke("x", stop=[])
    assert fake.requests[-1][1]["stop"] == []  # and can clear it
    model.invoke("x")
    assert fake.requests[-1][1]["stop"] == ["a"]


async def test_generate_fills_llm_output_as_chatopenai_does(fake):
    """A call's llm_output holds its token usage in OpenAI's keys and its model, for callback handlers
    that read usage there; `generate` over several prompts sums their usage."""

    class Outputs(BaseCallbackHandler):
        def __init__(self) -> None:
            self.outputs: list[Any] = []

        def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            self.outputs.append(response.llm_output)

    usage = to_usage_metadata(fake.reply)
    one = {"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"], "total_tokens": usage["total_tokens"]}
    expected = {"token_usage": one, "model_name": "fake-base", "model_provider": "wsd"}
    handler, model = Outputs(), WSDChatModel()
    result = model.generate([[HumanMessage("a")], [HumanMessage("b")]], callbacks=[handler])
    aresult = await model.agenerate([[HumanMessage("a")], [HumanMessage("b")]], callbacks=[handler])
    assert handler.outputs == [expected] * 4
    both = {**expected, "token_usage": {key: 2 * value for key, value in one.items()}}
    assert result.llm_output == aresult.llm_output == both
    assert model.generate([[HumanMessage("a")]]).llm_output == expected


@pytest.mark.parametrize("model", [WSDChatModel(), WSDChatModel(streaming=True), WSDChatModel(disable_streaming=True)])
@pytest.mark.parametrize("stream", [True, False])
def test_langchain_stream_flags_are_not_request_parameters(fake, model, stream):
    assert model.invoke("x", stream=stream).text == "Hi there"
    assert "stream" not in fake.requests[-1][1]


@pytest.mark.parametrize(
    ("model", "call", "streamed"),
    [
        (WSDChatModel(), {}, True),
        (WSDChatModel(disable_streaming=True), {}, False),
        (WSDChatModel(streaming=False), {}, False),
        (WSDChatModel(), {"stream": False}, False),
        (WSDChatModel(disable_streaming="tool_calling"), {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, False),
        (WSDChatModel(disable_streaming="tool_calling"), {}, True),
        (WSDChatModel(disable_streaming="tool_calling", tools=[{"name": "f", "parameters": {}}]), {}, False),  # the constructor's tools
        (WSDChatModel(disable_streaming="tool_calling", tools=[{"name": "f", "parameters": {}}]), {"tools": []}, True),  # which a call's [] clears
    ],
)
async def test_turning_streaming_off_keeps_tokens_from_callbacks(fake, model, call, streamed):
    """An invoke tells a callback of each token (as ChatOllama's does) unless the caller turned
    streaming off: then LangGraph's "messages" stream carries the reply as one whole message."""
    from langgraph.graph import END, START, MessagesState, StateGraph

    sync, handler = Tokens(), AsyncTokens()
    model.invoke("x", config={"callbacks": [sync]}, **call)
    await model.ainvoke("x", config={"callbacks": [handler]}, **call)
    assert sync.tokens == handler.tokens == (["Hi", " there", ""] if streamed else [])  # "": the final chunk, usage only

    async def node(state: MessagesState) -> dict[str, list[AIMessage]]:
        return {"messages": [await model.ainvoke(state["messages"], **call)]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", node)
    graph.add_edge(START, "model")
    graph.add_edge("model", END)
    parts = [message async for message, _ in graph.compile().astream({"messages": [("user", "x")]}, stream_mode="messages")]
    if streamed:
        assert "".join(part.text for part in parts) == "Hi there"
    else:
        assert [(type(part), part.text) for part in parts] == [(AIMessage, "Hi there")]


async def test_an_invokes_tokens_carry_the_runs_message_id(fake):
    """The chunks an invoke tells its callbacks carry the run's message id, as a stream's do and as
    the invoked message does, so a handler can group tokens by message either way."""

    class Ids(BaseCallbackHandler):
        def __init__(self) -> None:
            self.ids: list[str | None] = []

        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            self.ids.append(kwargs["chunk"].message.id)

    model = WSDChatModel()
    for call in (model.invoke, model.ainvoke, model.stream):
        handler = Ids()
        result = call("x", config={"callbacks": [handler]})
        if call == model.stream:
            result = list(result)[0]
        elif call == model.ainvoke:
            result = await result
        assert handler.ids and set(handler.ids) == {result.id} and result.id.startswith("lc_run-")


async def test_closing_an_astream_ends_the_run_and_the_request_before_aclose_returns(fake, monkeypatch):
    """`aclose()` (or `async with aclosing(...)`) returned with the run still open and the request
    still running: the inner stream was left to asyncio's finalizer, a loop turn or more later."""
    ended: list[str] = []

    async def astream(messages: list[dict[str, str]], **params: Any) -> AsyncIterator[TextDelta | FinalEvent]:
        try:
            for piece in "one two three".split():
                yield TextDelta(piece, "draft")
        finally:
            ended.append("request")

    class Errors(BaseCallbackHandler):
        def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
            ended.append(type(error).__name__)

    monkeypatch.setattr(fake, "astream", astream)
    stream = WSDChatModel().astream("x", config={"callbacks": [Errors()]})
    assert (await anext(stream)).text == "one"
    await stream.aclose()
    assert ended == ["request", "GeneratorExit"]


async def test_async_paths_never_use_the_sync_stream(fake, monkeypatch):
    def no_sync(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the async path called the sync stream")

    monkeypatch.setattr(fake, "stream", no_sync)
    model = WSDChatModel()
    assert (await model.ainvoke("x")).text == "Hi there"
    assert "".join([c.text async for c in model.astream("x")]) == "Hi there"


@pytest.mark.parametrize(
    ("max_running", "config", "expected"),
    [(16, None, 12), (5, None, 5), (16, {"max_concurrency": 3}, 3)],
)
@pytest.mark.parametrize("method", ["batch", "batch_as_completed"])
def test_batch_sends_every_input_at_once_up_to_max_running(fake, monkeypatch, max_running, config, expected, method):
    """LangChain's default batch runs min(32, CPUs + 4) invokes at a time (6 on a 2-core machine);
    ours sends them all, up to the runtime's max_running, to share its batched passes. A
    max_concurrency in the config still decides."""
    import threading

    fake.limits["max_running"] = max_running
    events, inside_changed = fake._events, threading.Condition()
    inside, peak = [0], [0]

    def stream(messages: Any, **params: Any) -> Iterator[Any]:
        with inside_changed:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
            inside_changed.notify_all()
            inside_changed.wait_for(lambda: peak[0] >= expected, timeout=5)  # until as many as expected have run at once
            inside[0] -= 1
        yield from events(messages, params)

    monkeypatch.setattr(fake, "stream", stream)
    monkeypatch.setattr("os.cpu_count", lambda: 2)  # LangChain's pool size is the machine's, so fix it
    questions = [f"q{i}" for i in range(12)]
    if method == "batch":  # through a chain, whose batch calls each step's
        replies = (WSDChatModel() | (lambda message: message.text)).batch(questions, config)
    else:
        replies = [reply.text for _, reply in sorted(WSDChatModel().batch_as_completed(questions, config), key=lambda r: r[0])]
    assert replies == ["Hi there"] * 12 and peak[0] == expected


def test_a_batch_of_nothing_is_nothing(fake, monkeypatch):
    """As LangChain's own batch gives, without asking for the runtime (which would load nothing, but
    would make one for these models)."""
    model = WSDChatModel()
    monkeypatch.setattr(WSDChatModel, "wsd_runtime", lambda self: pytest.fail("an empty batch asked for the runtime"))
    assert model.batch([]) == [] and list(model.batch_as_completed([])) == []


def test_unknown_parameter_is_named(fake):
    with pytest.raises(InvalidParameterError, match="unknown parameter 'temprature' \\(value 0.5\\); did you mean 'temperature'\\? \\(allowed: .*top_p"):
        WSDChatModel().invoke("x", temprature=0.5)
    with pytest.raises(ValidationError, match="unknown argument 'max_new_tokens' \\(value 5\\); did you mean 'max_tokens'\\?"):
        WSDChatModel(max_new_tokens=5)
    # ChatOpenAI's own name for max_tokens: by spelling alone it was taken for max_draft_tokens
    with pytest.raises(ValidationError, match="'max_completion_tokens' \\(value 5\\); did you mean 'max_tokens'\\? \\(other APIs' name for it\\)"):
        WSDChatModel(max_completion_tokens=5)
    with pytest.raises(
        InvalidParameterError, match="'presence_penalty' \\(value 0.5\\) \\(not offered: sampling takes temperature, top_p, top_k, repetition_penalty and seed\\)"
    ):
        WSDChatModel().invoke("x", presence_penalty=0.5)
    # Ollama's name for transformers' repetition penalty
    with pytest.raises(InvalidParameterError, match="'repeat_penalty' \\(value 1.1\\); did you mean 'repetition_penalty'\\? \\(other APIs' name for it\\)"):
        WSDChatModel().invoke("x", repeat_penalty=1.1)
    # several: each name with its own hint (they were run together after the names)
    with pytest.raises(ValidationError, match="unknown arguments 'n' \\(value 2\\) \\(not offered: one reply per request.*\\); 'temprature' \\(value 1\\): did you mean 'temperature'\\?"):
        WSDChatModel(temprature=1, n=2)
    # a hosted model's HTTP extras, which framework code passes whatever the model, mean nothing here
    assert WSDChatModel().invoke("x", extra_headers={"x-a": "1"}, extra_query={"q": "1"}, max_tokens=4).text == "Hi there"
    assert fake.requests[-1][1]["max_tokens"] == 4 and not {"extra_headers", "extra_query"} & set(fake.requests[-1][1])
    with pytest.raises(InvalidParameterError, match="unknown parameter 'extra_body'"):  # it carries generation parameters
        WSDChatModel().invoke("x", extra_body={"top_k": 5})


def test_stream_usage_is_taken_and_dropped(fake):
    """ChatOpenAI's `stream_usage` (which code written for hosted models passes, to the constructor
    or a call): usage always comes on the last chunk here, so it changes nothing."""
    model = WSDChatModel(stream_usage=True, max_tokens=4)
    chunks = list(model.stream("x", stream_usage=False))
    assert chunks[-1].usage_metadata is not None and model.invoke("x", stream_usage=True).text == "Hi there"
    assert all("stream_usage" not in params for _, params in fake.requests)


def test_the_draft_model_alone_is_named_as_the_model(fake):
    """With mode="draft" the draft model writes the whole reply: logs, tracing and cost accounting name it."""
    fake.reply = replace(fake_result(), mode="draft")
    chunks = list(WSDChatModel(mode="draft").stream("x"))
    assert chunks[-1].response_metadata["model_name"] == "fake-draft"
    assert WSDChatModel(mode="draft")._get_ls_params()["ls_model_name"] == "fake-draft"
    assert WSDChatModel()._get_ls_params()["ls_model_name"] == "fake-base"


def test_the_model_a_reply_is_credited_to_may_be_named_per_call(fake):
    """A per-call `model` may name the base model, or with mode="draft" the draft model that
    `model_name` then reports; any other is refused."""
    assert WSDChatModel(mode="draft").invoke("x", model="fake-draft").text == "Hi there"
    with pytest.raises(InvalidParameterError, match="cannot switch models per call"):
        WSDChatModel().invoke("x", model="fake-draft")


def test_a_function_message_is_a_tool_turn():
    """LangChain's FunctionMessage (OpenAI's older function results) is a tool turn that answers no call by id."""
    from langchain_core.messages import FunctionMessage

    messages = to_runtime_messages([HumanMessage("Add 1 and 2."), FunctionMessage(name="add", content="3")])
    assert messages[1] == {"role": "tool", "content": "3"}


async def test_a_result_whose_call_was_trimmed_off_is_warned_of_at_the_caller_s_line(shared_runtime, monkeypatch):
    """trim_messages(strategy="last") can keep a ToolMessage without the AIMessage that made its
    call (OpenAI's API refuses such a history): the reply is decoded, with a ToolResultWarning that
    points at the line that asked, not into LangChain or this package."""
    from langchain_core.messages import trim_messages

    from wsd_llms import ToolResultWarning

    monkeypatch.setattr(WSDChatModel, "wsd_runtime", lambda self: shared_runtime)
    call = {"name": "weather", "args": {"city": "Paris"}, "id": "c1", "type": "tool_call"}
    history = [HumanMessage("Weather in Paris?"), AIMessage("", tool_calls=[call]), ToolMessage("12C", tool_call_id="c1"), HumanMessage("Warm?")]
    kept = trim_messages(history, max_tokens=2, token_counter=len, strategy="last")
    assert [type(m).__name__ for m in kept] == ["ToolMessage", "HumanMessage"]
    model = WSDChatModel(max_tokens=3)
    with pytest.warns(ToolResultWarning, match="messages\\[0\\] \\(tool\\) answers tool_call_id 'c1', which names no call") as seen:
        model.invoke(kept)
        "".join(chunk.text for chunk in model.stream(kept))
    assert [w.filename for w in seen] == [__file__] * 2
    with pytest.warns(ToolResultWarning, match="messages\\[0\\]"):  # in a task of LangChain's: at whatever runs the loop
        await model.ainvoke(kept)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ToolResultWarning)
        model.invoke(history)  # the whole history: no warning


def test_calls_langchain_leaves_unparsed_reach_the_model():
    """convert_to_messages of an Anthropic-format assistant dict keeps its tool_use blocks in the
    content (tool_calls empty), and of OpenAI's older format a function_call in additional_kwargs:
    both calls had been dropped, so the tool result after each answered nothing the model saw."""
    from langchain_core.messages import convert_to_messages

    from wsd_llms.messages import normalize_messages

    anthropic = convert_to_messages([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "tool", "content": "18C", "tool_call_id": "toolu_1"},
    ])
    legacy = convert_to_messages([
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "", "function_call": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
        {"role": "function", "name": "add", "content": "5"},
    ])
    for history, text, call in [(anthropic, "Checking.", ("toolu_1", "get_weather", {"city": "Paris"})), (legacy, "", ("call_1_0", "add", {"a": 2, "b": 3}))]:
        assert isinstance(history[1], AIMessage) and not history[1].tool_calls  # as LangChain leaves them
        turn = normalize_messages(to_runtime_messages(history))[1]
        assert turn.content == text and [(c.id, c.name, c.arguments) for c in turn.tool_calls] == [call]
    assert to_runtime_messages(anthropic)[2]["tool_call_id"] == "toolu_1"  # the result names the call it answers
    # one it cannot read is shown as written, as an invalid call is (it had refused the history), and
    # one LangChain lists as invalid is not taken again from its block (it showed twice)
    broken = AIMessage("", additional_kwargs={"function_call": {"name": "add", "arguments": '{"a": 2,'}})
    listed = AIMessage(
        [{"type": "tool_use", "id": "t1", "name": "w", "input": {}, "partial_json": '{"city": "Par'}],
        invalid_tool_calls=[{"type": "invalid_tool_call", "id": "t1", "name": "w", "args": '{"city": "Par', "error": None}],
    )
    for message, written in [(broken, '{"name": "add", "arguments": {"a": 2,}'), (listed, '{"name": "w", "arguments": {"city": "Par}')]:
        turn = normalize_messages(to_runtime_messages([HumanMessage("q"), message]))[1]
        assert turn.tool_calls == () and turn.content == f"<tool_call>\n{written}\n</tool_call>"
    answered = to_runtime_messages([HumanMessage("q"), listed, ToolMessage("Error: cut short", tool_call_id="t1")])
    assert answered[2] == {"role": "tool", "content": "Error: cut short"}  # the result of a call shown as text answers it by place


def test_an_empty_stop_string_is_refused_when_the_model_is_built():
    for empty in ("", ["\n", ""]):
        with pytest.raises(ValidationError, match="stop strings must be non-empty"):
            WSDChatModel(stop=empty)
    with pytest.raises(ValidationError, match="65 stop strings are more than the 64 allowed"):  # every call would refuse them
        WSDChatModel(stop=[f"s{i}" for i in range(65)])


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
        "ls_stop": ["b"],
    }
    assert model._get_ls_params(model="other", temperature=0.9)["ls_model_name"] == "other"
    assert model._get_ls_params(temperature=0.9)["ls_temperature"] == 0.9
    assert model._llm_type == "wsd-chat"
    assert model._identifying_params["base_model"] == "embedded:gemma-3-270m"
    assert model._identifying_params["max_tokens"] == 10 and model._identifying_params["stop"] == ["a"]


def test_llm_cache_keys_on_every_setting(fake):
    """LangChain's LLM cache keys on _identifying_params: models that differ in any setting must not
    share entries, and the same model hits its own."""
    from langchain_core.caches import InMemoryCache

    cache = InMemoryCache()
    short, other_mode = WSDChatModel(max_tokens=4, cache=cache), WSDChatModel(max_tokens=4, mode="base", cache=cache)
    assert short._get_llm_string() != other_mode._get_llm_string()
    short.invoke("x")
    other_mode.invoke("x")
    short.invoke("x")
    assert [params["mode"] for _, params in fake.requests] == ["online", "base"]
    # a constructor's stop is a setting too (LangChain keys on the call's stop, None when not given)
    stopped, other_stop = WSDChatModel(max_tokens=4, stop=["\n"], cache=cache), WSDChatModel(max_tokens=4, stop=["."], cache=cache)
    assert len({short._get_llm_string(), stopped._get_llm_string(), other_stop._get_llm_string()}) == 3
    stopped.invoke("x")
    other_stop.invoke("x")
    stopped.invoke("x", stop=["\n"])  # the same stop given per call: the same entry
    assert [params["stop"] for _, params in fake.requests[2:]] == [["\n"], ["."]]
    assert stopped._get_invocation_params()["stop"] == ["\n"] and stopped._get_invocation_params(stop=[])["stop"] == []


class Events(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self.events.append("start")

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self.events.append(type(error).__name__)


@pytest.mark.parametrize("path", ["invoke", "stream"])
@pytest.mark.parametrize(
    "value, needle",
    [
        ({"temperature": -1}, "invalid temperature=-1"),
        ({"stop": 5}, "invalid stop=5: must be a string or a list of strings"),  # said stop=[5]
        ({"stop": [["\n"]]}, "invalid stop=[['\\n']]: must be a string or a list of strings"),
        ({"stop": {"a": 1}}, "invalid stop={'a': 1}: must be a string or a list of strings"),
    ],
)
def test_a_bad_call_value_reaches_on_llm_error(fake, path, value, needle):
    """Values are checked inside the run, so tracing sees the failed call like any other (a stop
    that is no list, or a list of lists, failed with a bare TypeError before the run began)."""
    handler = Events()
    with pytest.raises(InvalidParameterError, match=re.escape(needle)):
        call = getattr(WSDChatModel(), path)("x", **value, config={"callbacks": [handler]})
        list(call) if path == "stream" else call
    assert handler.events == ["start", "WSDInvalidParameterError"]


def test_none_in_the_constructor_is_not_given(fake):
    """As in a call: LangChain code passes max_tokens=None, temperature=None and the like."""
    WSDChatModel(max_tokens=None, temperature=None, top_p=None, switch_window=None, seed=None).invoke("x")
    params = fake.requests[-1][1]
    assert (params["max_tokens"], params["temperature"], params["top_p"], params["switch_window"], params["seed"]) == (256, 0.0, 1.0, 6, None)


ERROR_KINDS = [
    (PromptTooLongError("2 prompts too long"), ContextOverflowError, False),
    (InvalidMessagesError("bad messages"), ModelInvalidRequestError, False),
    (InvalidParameterError("bad value"), ModelInvalidRequestError, False),
    (RequestTooLargeError("never fits"), ModelInvalidRequestError, False),
    (ModelLoadError("no such model"), ModelNotFoundError, False),
    (RequestTimeoutError("too slow"), ModelTimeoutError, True),
    (RequestFailedError("out of memory"), ModelAPIError, True),
    (RuntimeClosedError("worker died"), ModelAPIError, True),
]


@pytest.mark.parametrize("path", ["invoke", "stream", "ainvoke", "astream"])
@pytest.mark.parametrize(("error", "kind", "retryable"), ERROR_KINDS, ids=[type(e[0]).__name__ for e in ERROR_KINDS])
async def test_errors_are_langchain_model_errors_and_stay_wsd_errors(fake, monkeypatch, path, error, kind, retryable):
    """A failed request raises LangChain's standard model error of its kind (what agent middleware
    reads), which is still the wsd-llms error it was, with its message."""

    def stream(messages: Any, **params: Any) -> Iterator[Any]:
        yield TextDelta("Hi", "draft")
        raise error

    async def astream(messages: Any, **params: Any) -> AsyncIterator[Any]:
        for event in stream(messages, **params):
            yield event

    monkeypatch.setattr(fake, "stream", stream)
    monkeypatch.setattr(fake, "astream", astream)
    model = WSDChatModel()
    with pytest.raises(kind) as raised:
        if path == "invoke":
            model.invoke("x")
        elif path == "stream":
            list(model.stream("x"))
        elif path == "ainvoke":
            await model.ainvoke("x")
        else:
            [chunk async for chunk in model.astream("x")]
    assert isinstance(raised.value, type(error)) and raised.value.args == error.args
    assert raised.value.is_retryable is retryable


def test_model_retry_middleware_retries_a_failed_request_but_not_a_prompt_too_long(fake, monkeypatch):
    """LangChain's ModelRetryMiddleware: a request that failed (out of memory, say) is tried again and
    can succeed; a prompt that does not fit fails at once, without retries that would fail alike."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRetryMiddleware

    failures: list[BaseException] = []
    events = fake._events

    def stream(messages: Any, **params: Any) -> Iterator[Any]:
        if failures:
            raise failures.pop(0)
        yield from events(messages, params)

    monkeypatch.setattr(fake, "stream", stream)
    retry = ModelRetryMiddleware(max_retries=2, initial_delay=0, jitter=False, on_failure="error")
    agent = create_agent(WSDChatModel(), middleware=[retry])
    failures[:] = [RequestFailedError("out of memory")]
    out = agent.invoke({"messages": [("user", "hello")]})
    assert out["messages"][-1].text == "Hi there" and not failures
    failures[:] = [PromptTooLongError("too long"), RequestFailedError("not reached")]
    with pytest.raises(ContextOverflowError, match="too long"):
        agent.invoke({"messages": [("user", "hello")]})
    assert len(failures) == 1  # tried once, not retried


@pytest.mark.embedded
def test_token_counts_read_the_tokenizers_without_loading_weights(embedded, monkeypatch):
    """get_num_tokens counts in the base tokenizer (as usage_metadata does; the draft's with
    mode="draft", as usage_metadata then does) and trim_messages in the draft's, whose window binds
    on the embedded pair; both read on their own: no weights load, and nothing is fetched from the hub."""
    from langchain_core.messages import trim_messages

    base_tokenizer, draft_tokenizer = embedded.load().base.tokenizer, embedded.load().draft.tokenizer
    unloaded = WSDRuntime()
    monkeypatch.setattr(WSDRuntime, "load", lambda self: pytest.fail("counting tokens loaded the models"))
    monkeypatch.setattr(WSDChatModel, "wsd_runtime", lambda self: unloaded)
    model = WSDChatModel()
    text = "Weak-to-strong decoding, in one sentence."
    assert model.get_token_ids(text) == base_tokenizer.encode(text, add_special_tokens=False)
    drafted = WSDChatModel(mode="draft").get_token_ids(text)
    assert drafted == draft_tokenizer.encode(text, add_special_tokens=False) != model.get_token_ids(text)
    history = [HumanMessage("a " * 40), AIMessage("b " * 40), HumanMessage("Which letter came first?")]
    tail = model.get_num_tokens_from_messages(history[1:])
    assert tail < model.get_num_tokens_from_messages(history)
    assert trim_messages(history, token_counter=model, max_tokens=tail, strategy="last") == history[1:]
    assert trim_messages(history, token_counter=model, max_tokens=tail - 1, strategy="last") == history[2:]
    # a count does not wait for the models loading (from an event loop it froze the loop): the files are here
    held, done = threading.Event(), threading.Event()

    def load_in_progress() -> None:
        with unloaded._lock:  # as a load holds it, until the count is done (or for a minute, if it waits)
            held.set()
            done.wait(60)

    holder = threading.Thread(target=load_in_progress)
    holder.start()
    try:
        held.wait(5)
        fresh = WSDRuntime()  # nothing read yet: its tokenizer and config are read now
        fresh._lock = unloaded._lock
        monkeypatch.setattr(WSDChatModel, "wsd_runtime", lambda self: fresh)
        assert model.get_num_tokens_from_messages(history) > 80 and fresh.context_window() > 0
        assert holder.is_alive()  # the lock was never let go: the count did not wait for it
    finally:
        done.set()
        holder.join()
    monkeypatch.setattr(WSDChatModel, "wsd_runtime", lambda self: unloaded)
    # trim_messages counts every tail, none and a reply alone too (they raised as requests would)
    answered = [HumanMessage("a " * 40), AIMessage("b " * 3)]
    reply_alone = model.get_num_tokens_from_messages(answered[1:])
    assert 3 < reply_alone < model.get_num_tokens_from_messages(answered) and model.get_num_tokens_from_messages([]) == 0
    assert trim_messages(answered, token_counter=model, max_tokens=reply_alone, strategy="last") == answered[1:]
    unloaded.close()


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


def test_reasoning_blocks_are_left_out_and_data_blocks_are_json():
    """History from other providers: their reasoning is not conversation text; a tool result given
    as plain data is written as JSON."""
    thought = AIMessage([{"type": "reasoning", "reasoning": "hmm"}, {"type": "text", "text": "Paris."}])
    result = ToolMessage([{"city": "Paris", "temp": 21}], tool_call_id="c1")
    typed = ToolMessage([{"type": "json", "json": {"city": "Paris", "temp": 21}}, {"type": "text", "text": "(cached)"}], tool_call_id="c2")
    converted = to_runtime_messages([HumanMessage("q"), thought, result, typed])
    assert converted[1]["content"] == "Paris."
    assert converted[2]["content"] == '{"city": "Paris", "temp": 21}'
    assert converted[3]["content"] == '{"city": "Paris", "temp": 21}\n(cached)'  # LangChain's json block, as ToolNode passes it


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
        {"role": "user", "content": "u2\n+"},  # blocks joined with newlines: a context block and a question do not run together
        {"role": "assistant", "content": "a1"},
        {"role": "system", "content": "s2"},
        {"role": "user", "content": "u3"},
        {"role": "system", "content": "s3"},
    ]


def test_unsupported_role_gets_a_clear_error():
    with pytest.raises(InvalidMessagesError, match="role 'critic'"):
        to_runtime_messages([HumanMessage("hi"), ChatMessage(role="critic", content="x")])
    # counting such messages fails as a call with them does: a ModelInvalidRequestError (it was a bare wsd-llms error)
    with pytest.raises(ModelInvalidRequestError, match="role 'critic'"):
        WSDChatModel().get_num_tokens_from_messages([HumanMessage("hi"), ChatMessage(role="critic", content="x")])
    # LangGraph's instruction, not a message: it had read as an unknown role 'remove'
    from langchain_core.messages import RemoveMessage

    with pytest.raises(InvalidMessagesError, match=re.escape("messages[1] (RemoveMessage) is an instruction to remove a message (LangGraph's add_messages applies it)")):
        to_runtime_messages([HumanMessage("hi"), RemoveMessage(id="m1")])
    # Anthropic's tool result in a user message names the message a result is
    tool_result = HumanMessage([{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"}])
    with pytest.raises(InvalidMessagesError, match=re.escape("has type 'tool_result'; this model reads text only (blocks of type 'text' or 'text-plain'); a tool's result is a tool message of its own")):
        to_runtime_messages([tool_result])


def test_a_custom_token_counter_counts_as_in_every_langchain_model():
    """custom_get_token_ids is a BaseLanguageModel field: get_token_ids and get_num_tokens use it (it was ignored)."""
    model = WSDChatModel(custom_get_token_ids=lambda text: list(range(len(text.split()))))
    assert model.get_token_ids("three plain words") == [0, 1, 2] and model.get_num_tokens("two words") == 2


def test_tool_history_conversion():
    call = {"name": "add", "args": {"a": 1}, "id": "call-1", "type": "tool_call"}
    messages = [
        HumanMessage("1+2?"),
        AIMessage([{"type": "text", "text": "let me add"}, {"type": "tool_use", "id": "call-1", "name": "add", "input": {"a": 1}}], tool_calls=[call]),
        ToolMessage("3", tool_call_id="call-1", status="error"),
    ]
    assert to_runtime_messages(messages)[1:] == [
        {"role": "assistant", "content": "let me add", "tool_calls": [{"id": "call-1", "name": "add", "arguments": {"a": 1}}]},
        {"role": "tool", "content": "3", "tool_call_id": "call-1"},
    ]


def test_another_providers_v1_history_replays_as_its_text():
    """LangChain's v1 content of another provider's reply: its calls (valid ones travel as
    tool_calls, invalid ones nowhere), tools the provider ran itself and its own data are not the
    reply's text; a user's block of a kind the model cannot read is still an error."""
    call = {"name": "add", "args": {"a": 1}, "id": "call-1", "type": "tool_call"}
    content = [
        {"type": "reasoning", "reasoning": "adding"},
        {"type": "server_tool_call", "id": "ws-1", "name": "web_search", "args": {"query": "sum"}},
        {"type": "server_tool_result", "tool_call_id": "ws-1", "status": "success", "output": "..."},
        {"type": "text", "text": "let me add"},
        {"type": "tool_call", "id": "call-1", "name": "add", "args": {"a": 1}},
        {"type": "invalid_tool_call", "id": "call-2", "name": "add", "args": '{"a": ', "error": "cut short"},
        {"type": "non_standard", "value": {"provider": "data"}},
    ]
    ai = AIMessage(content, tool_calls=[call], response_metadata={"output_version": "v1"})
    assert to_runtime_messages([HumanMessage("1+2?"), ai])[1] == {
        "role": "assistant", "content": "let me add", "tool_calls": [{"id": "call-1", "name": "add", "arguments": {"a": 1}}]
    }
    only_invalid = AIMessage([content[5]], response_metadata={"output_version": "v1"})
    assert to_runtime_messages([HumanMessage("1+2?"), only_invalid, HumanMessage("again")])[1] == {"role": "assistant", "content": ""}
    with pytest.raises(InvalidMessagesError, match="content block 0 has type 'non_standard'"):
        to_runtime_messages([HumanMessage([content[6]])])


def test_plain_text_document_blocks_are_read_as_their_text():
    """LangChain 1.x's plain-text document block ("text-plain", create_plaintext_block) is text: it
    was refused as 'this model reads text only'. Its text comes as `text` or base64; one that only
    points at its text says so, since a local model fetches nothing."""
    from langchain_core.messages.content import create_plaintext_block

    document = create_plaintext_block(text="Zebras sleep standing up.")
    encoded = {"type": "text-plain", "mime_type": "text/plain", "base64": base64.b64encode("Übung: 猫".encode()).decode()}
    question = {"type": "text", "text": "What does the note say?"}
    assert to_runtime_messages([HumanMessage([document, encoded, question])]) == [
        {"role": "user", "content": "Zebras sleep standing up.\nÜbung: 猫\nWhat does the note say?"}
    ]
    with pytest.raises(InvalidMessagesError, match=r"content block 0 is a 'text-plain' block with no text \(it has url\)"):
        to_runtime_messages([HumanMessage([{"type": "text-plain", "mime_type": "text/plain", "url": "https://example.com/a.txt"}])])
    latin1 = {"type": "text-plain", "mime_type": "text/plain", "base64": base64.b64encode("Übung".encode("latin-1")).decode()}
    with pytest.raises(InvalidMessagesError, match="content block 1 is a 'text-plain' block whose base64 is not UTF-8"):
        to_runtime_messages([HumanMessage([question, latin1])])


def test_invalid_calls_in_a_history_are_shown_as_written():
    """An AI message's invalid calls reach the model as they were written, as ChatOpenAI sends them
    back: LangChain's agents answer each with an error result, which answered a call the model
    never saw (an empty assistant turn). This runtime's call is its whole text; another model's, its
    raw arguments in the call format."""
    ours = '<tool_call>\n{"name": "Add", "arguments": {"a": 1, "b'
    theirs = {"type": "invalid_tool_call", "name": "get_weather", "args": '{"city": "Par', "id": "call_9", "error": "cut short"}
    history = [
        HumanMessage("Weather in Paris?"),
        AIMessage("Let me look.", invalid_tool_calls=[theirs]),
        ToolMessage("Tool call get_weather with id call_9 could not be executed", tool_call_id="call_9", status="error"),
        AIMessage("", invalid_tool_calls=[{**theirs, "name": "Add", "args": ours, "id": "call_1"}]),
        HumanMessage("Try again."),
    ]
    sent = to_runtime_messages(history)
    assert sent[1] == {"role": "assistant", "content": 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par}\n</tool_call>'}
    assert sent[2] == {"role": "tool", "content": "Tool call get_weather with id call_9 could not be executed"}  # answers the text by place
    assert results_naming_no_call(normalize_messages(sent)) == []  # so no warning that it names no call
    # beside valid calls, its result goes first (the turn's text shows it before the calls) and the rest take their calls' order
    calls = [{"name": "get_weather", "args": {"city": c}, "id": f"w_{c}", "type": "tool_call"} for c in ("Oslo", "Rome")]
    mixed = [HumanMessage("Weather?"), AIMessage("", tool_calls=calls, invalid_tool_calls=[theirs])]
    mixed += [ToolMessage("Rome: 20C", tool_call_id="w_Rome"), ToolMessage("could not be executed", tool_call_id="call_9"), ToolMessage("Oslo: 2C", tool_call_id="w_Oslo")]
    assert [(m.tool_call_id, m.content) for m in normalize_messages(to_runtime_messages(mixed))[2:]] == [
        (None, "could not be executed"), ("w_Oslo", "Oslo: 2C"), ("w_Rome", "Rome: 20C")
    ]
    later = to_runtime_messages([*history[:3], HumanMessage("And now?"), ToolMessage("late", tool_call_id="call_9")])
    assert later[4]["tool_call_id"] == "call_9"  # after a user turn it answers no call shown before: warned of
    assert results_naming_no_call(normalize_messages(later)) == [
        "messages[4] (tool) answers tool_call_id 'call_9', which names no call of the turn before it (messages[3] makes none)"
    ]
    assert sent[3] == {"role": "assistant", "content": ours}


def test_another_providers_own_content_replays_as_its_text():
    """Another provider's reply as LangChain keeps it (its own content blocks, read through
    LangChain's translation, `content_blocks`) replays as its text, where each of these was refused:
    OpenAI's Responses items (a call, a refusal, a web search), Anthropic's server tools, Google's
    code execution. An image in a reply is still an error, naming its place among all the blocks."""
    call = {"name": "get", "args": {"q": "x"}, "id": "call_1", "type": "tool_call"}
    replies = [
        (AIMessage([{"type": "text", "text": "Let me check.", "annotations": []}, {"type": "function_call", "name": "get", "arguments": '{"q": "x"}', "call_id": "call_1", "id": "fc_1"}], tool_calls=[call]), "Let me check."),
        (AIMessage([{"type": "refusal", "refusal": "I can't help with that."}]), "I can't help with that."),
        (AIMessage([{"type": "web_search_call", "id": "ws_1", "status": "completed"}, {"type": "text", "text": "Found it."}]), "Found it."),
        (
            AIMessage(
                [
                    {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "x"}},
                    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
                    {"type": "text", "text": "Found it."},
                ],
                response_metadata={"model_provider": "anthropic"},
            ),
            "Found it.",
        ),
        (AIMessage([{"type": "executable_code", "executable_code": "print(1)", "language": "python"}, {"type": "code_execution_result", "code_execution_result": "1"}, "It is 1."]), "It is 1."),
    ]
    for ai, text in replies:
        assert to_runtime_messages([HumanMessage("q"), ai])[1]["content"] == text, ai.content
    with pytest.raises(InvalidMessagesError, match=r"messages\[1\] \(AIMessage\) content block 1 has type 'image'"):
        to_runtime_messages([HumanMessage("q"), AIMessage([{"type": "reasoning", "reasoning": "r"}, {"type": "image", "url": "http://x/y.png"}])])


def test_a_text_block_without_text_is_no_text():
    """A text block whose text is None (a provider's empty block) was written as the word "None";
    text of another type is refused, naming the block."""
    assert to_runtime_messages([HumanMessage([{"type": "text", "text": None}, {"type": "text", "text": "hi"}])])[0]["content"] == "hi"
    with pytest.raises(InvalidMessagesError, match=r"messages\[0\] \(HumanMessage\) content block 1 is a text block whose text is a int, not a str"):
        to_runtime_messages([HumanMessage([{"type": "text", "text": "a"}, {"type": "text", "text": 5}])])


def test_a_v1_reply_whose_streamed_call_turns_invalid_lists_only_valid_calls(fake):
    """With output_version="v1", a call that streamed and then turned out invalid leaves the v1
    content (which lists valid calls, as ChatOpenAI's) for invalid_tool_calls, and the reply goes
    back into the history (its stale call block had been refused there), the call as it was written."""
    fake.piece = 4
    begun = '<tool_call>\n{"name": "Add", "arguments": {"a": 1, "b'
    fake.reply = replace(fake_result(begun, content="", invalid_tool_calls=(InvalidToolCall(begun, "the call is not closed", "Add", "call_1"),)), finish_reason="length")
    model = WSDChatModel(output_version="v1")
    reply = model.bind_tools([Add], tool_choice="required").invoke("1+2?")
    assert reply.content == [] and reply.tool_calls == [] and [c["name"] for c in reply.invalid_tool_calls] == ["Add"]
    fake.piece, fake.reply = 0, fake_result("Sorry.")
    assert model.invoke([HumanMessage("1+2?"), reply, HumanMessage("Try again.")]).content == [{"type": "text", "text": "Sorry."}]
    assert fake.requests[-1][0][1] == {"role": "assistant", "content": begun}


# ---------------------------------------------------------------- tools and structured output


class Add(BaseModel):
    """Add two integers."""

    a: int
    b: int


def multiply(x: int, y: int) -> int:
    """Multiply two integers."""
    return x * y


@tool
def lookup(key: str) -> str:
    """Look a key up."""
    return key


ADD_DICT = {"type": "function", "function": {"name": "add_dict", "description": "Add.", "parameters": Add.model_json_schema()}}
CALL = ToolCall("call_1", "Add", {"a": 1, "b": 2})
CALL_TEXT = '<tool_call>\n{"name": "Add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


@pytest.mark.parametrize(("tools", "names"), [([Add], ["Add"]), ([multiply, lookup, ADD_DICT], ["multiply", "lookup", "add_dict"])])
def test_bind_tools_accepts_every_tool_form(fake, tools, names):
    WSDChatModel().bind_tools(tools).invoke("x")
    params = fake.requests[-1][1]
    assert [t["function"]["name"] for t in params["tools"]] == names
    assert params["tools"][0]["function"]["parameters"]["properties"]
    assert params["tool_choice"] == "auto" and "parallel_tool_calls" in params


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, "auto"),
        ("auto", "auto"),
        ("any", "required"),
        ("required", "required"),
        (True, "required"),
        ("none", "none"),
        ("lookup", "lookup"),
        ({"type": "function", "function": {"name": "lookup"}}, "lookup"),
        ({"type": "function", "name": "lookup"}, "lookup"),  # OpenAI's Responses API
        ({"type": "tool", "name": "lookup"}, "lookup"),  # Anthropic's
        ({"type": "any"}, "required"),
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        (False, "auto"),  # leaves it unset, as in ChatOpenAI: the model's default
    ],
)
def test_tool_choice_forms(fake, choice, expected):
    WSDChatModel().bind_tools([Add, lookup], tool_choice=choice, parallel_tool_calls=True).invoke("x")
    params = fake.requests[-1][1]
    assert (params["tool_choice"], params["parallel_tool_calls"]) == (expected, True)


@pytest.mark.parametrize("strict", [True, False, None])
def test_bind_tools_takes_strict(fake, strict):
    """OpenAI's `strict` (which code written for ChatOpenAI passes): calls are always decoded under
    their schemas, so it is taken and changes nothing."""
    WSDChatModel().bind_tools([Add], strict=strict).invoke("x")
    assert "strict" not in fake.requests[-1][1] and fake.requests[-1][1]["tools"][0]["function"]["name"] == "Add"


@pytest.mark.parametrize("choice", ["unknown_tool", {"type": "function", "function": {"name": "nope"}}, {"type": "some"}])
def test_unknown_tool_choice_is_an_error(choice):
    with pytest.raises(InvalidParameterError, match=re.escape(f"tool_choice={choice!r} is neither") + ".*tools bound: Add, lookup"):
        WSDChatModel().bind_tools([Add, lookup], tool_choice=choice)


def test_a_flat_function_tool_takes_a_tool_choice(fake):
    """OpenAI's Responses API writes a function tool flat ({"type": "function", "name": ...}), which
    LangChain's converter passes on as it is: naming it in tool_choice had been a KeyError."""
    flat = {"type": "function", "name": "scale", "description": "Scale.", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}
    WSDChatModel().bind_tools([flat, lookup], tool_choice="scale").invoke("x")
    assert fake.requests[-1][1]["tool_choice"] == "scale" and fake.requests[-1][1]["tools"][0] == flat
    with pytest.raises(ModelInvalidRequestError, match=re.escape("tools[0] needs a 'name'")):
        WSDChatModel().bind_tools([{"type": "function", "parameters": {"type": "object"}}], tool_choice="any")


@pytest.mark.parametrize("choice", [None, "auto", "any", "bash"])
@pytest.mark.parametrize(
    ("tools", "kind"),
    [([lookup, {"type": "web_search_preview"}], "web_search_preview"), ([{"type": "bash_20250124", "name": "bash"}], "bash_20250124")],
)
def test_a_providers_own_tool_is_refused_at_bind_time(fake, tools, kind, choice):
    """A tool its provider runs (OpenAI's web search, Anthropic's bash), which code written for
    those models binds: a model error naming it, whatever the tool_choice. It had been a KeyError
    with a tool_choice, and Anthropic's, which has a name, a function of no arguments."""
    with pytest.raises(ModelInvalidRequestError, match=re.escape(f"has type {kind!r}, which is not a function tool (a tool its provider runs itself")):
        WSDChatModel().bind_tools(tools, tool_choice=choice)
    assert fake.requests == []


@pytest.mark.parametrize("choice", ["any", "required", True, {"type": "any"}])
def test_a_required_call_with_no_tools_is_an_error(fake, choice):
    """At bind time, or in a call (which had run as a plain reply), as a LangChain model error, as
    OpenAI's API refuses it; a constructor's "required" applies only when tools come."""
    with pytest.raises(InvalidParameterError, match="asks for a tool call, but no tools are bound") as bound:
        WSDChatModel().bind_tools([], tool_choice=choice)
    with pytest.raises(InvalidParameterError, match=re.escape(f"tool_choice={choice!r} asks for a tool call, but no tools are given")) as called:
        WSDChatModel().invoke("x", tool_choice=choice)  # the value as given, not as read ('required')
    assert all(isinstance(e.value, ModelInvalidRequestError) for e in (bound, called))
    assert WSDChatModel(tool_choice="required").invoke("x").text == "Hi there" and len(fake.requests) == 1
    assert fake.requests[0][1]["tool_choice"] == "auto"  # not sent on to the runtime, which refuses it with no tools


def test_defaults_that_would_fail_every_call_fail_the_constructor():
    """A response_format default that makes no grammar, or a tool_choice naming no constructor tool,
    is a ValidationError naming it when the model is built (every call had failed instead)."""
    with pytest.raises(ValidationError, match="invalid response_format: it cannot be compiled into a grammar: Regex parsing error"):
        WSDChatModel(response_format={"type": "regex", "pattern": "("})
    spec = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(ValidationError, match="tool_choice='sub' is neither .* \\(tools given: add\\)"):
        WSDChatModel(tools=[spec], tool_choice="sub")


def test_constructor_tools_take_what_bind_tools_takes(fake):
    """`@tool` objects, pydantic classes and functions in the constructor, sent as bind_tools sends
    them; they were refused as "tools[0] must be a dict, got StructuredTool"."""

    def halve(x: float) -> float:
        """Halve a number."""
        return x / 2

    WSDChatModel(tools=[lookup, Add, halve], tool_choice="lookup").invoke("x")
    constructed = fake.requests[-1][1]
    WSDChatModel().bind_tools([lookup, Add, halve], tool_choice="lookup").invoke("x")
    from wsd_llms.tools import normalize_tools

    assert normalize_tools(constructed["tools"]) == normalize_tools(fake.requests[-1][1]["tools"])
    assert [t["name"] for t in normalize_tools(constructed["tools"])] == ["lookup", "Add", "halve"]
    assert constructed["tool_choice"] == "lookup"
    WSDChatModel().invoke("x", tools=[lookup, Add, halve], tool_choice="lookup")  # a call's own, as a call to the runtime takes them
    assert normalize_tools(fake.requests[-1][1]["tools"]) == normalize_tools(constructed["tools"])
    with pytest.raises(InvalidParameterError, match=r"^tools\[1\]: Unsupported function\s+42\s+Functions must be passed in as Dict"):
        WSDChatModel().invoke("x", tools=[lookup, 42])  # LangChain's reason, as bind_tools gives it, with the tool's place


def test_models_are_checked_when_the_model_is_built(tmp_path, monkeypatch):
    """draft_model/base_model: a path object is taken as its str (it was refused as 'not a valid
    string'); a blank or non-string name, a path with no model there, a file no GGUF and an unknown
    embedded name are each a ValidationError naming the field (they failed every call)."""
    from llama_index.llms.wsd import WSDLLM

    (tmp_path / "draft").mkdir()
    (tmp_path / "draft" / "config.json").write_text("{}")
    assert WSDChatModel(draft_model=tmp_path / "draft").draft_model == str(tmp_path / "draft")
    (tmp_path / "model.bin").write_bytes(b"weights")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF")
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    for model, value, error in (
        ("base_model", " ", "invalid base_model=' ': must be a Hugging Face repo id, a directory or a .gguf path"),
        ("draft_model", 7, "invalid draft_model=7: must be"),
        ("base_model", str(tmp_path / "nowhere"), f"base_model\n.*model path '{re.escape(str(tmp_path / 'nowhere'))}' does not exist"),
        ("draft_model", tmp_path / "model.bin", "draft_model\n.*model file .*model.bin is not a .gguf file"),
        ("base_model", tmp_path / "cut.gguf", "base_model\n.*cut.gguf is not a readable GGUF file"),
        ("base_model", tmp_path / "draft" / "..", "base_model\n.*has no config.json"),  # two .gguf files there
        ("draft_model", "embedded:nope", "unknown embedded model 'embedded:nope'"),
    ):
        for adapter in (WSDChatModel, WSDLLM):
            with pytest.raises(ValidationError, match=error):
                adapter(**{model: value})
    assert WSDChatModel(draft_model="someone/draft").draft_model == "someone/draft"  # a repo id: read at the first call


def test_device_and_dtype_may_be_torch_objects_as_the_runtime_takes_them():
    """torch.device and torch.dtype (HF code's torch_dtype=torch.bfloat16) were refused as 'not a
    valid string'; None was too, where it means auto. A dtype the models cannot compute in is refused."""
    import torch
    from llama_index.llms.wsd import WSDLLM

    for adapter in (WSDChatModel, WSDLLM):
        model = adapter(device=torch.device("cpu"), dtype=torch.bfloat16)
        assert (model.device, model.dtype) == ("cpu", "bfloat16") and model.wsd_runtime().dtype == torch.bfloat16
        assert (adapter(device=None, dtype=None).device, adapter(dtype=None).dtype) == ("auto", "auto")
        assert adapter(dtype=torch.float64).dtype == "float64"
        with pytest.raises(ValidationError, match="dtype\n.*invalid dtype='float8_e4m3fn'; allowed: auto, float32, float16, bfloat16, float64"):
            adapter(dtype=torch.float8_e4m3fn)


def test_a_relative_model_path_is_the_directory_it_named_when_the_model_was_built(tmp_path, monkeypatch):
    """Every call finds its runtime by the model's name: a relative one named another directory, or
    none, after os.chdir() (a server's start-up may change directory after making its model)."""
    from llama_index.llms.wsd import WSDLLM

    from tiny import make_tokenizer

    tok = make_tokenizer(300)
    for name, seed in (("draft", 0), ("base", 1)):
        tiny_llama(tok, seed).model.save_pretrained(tmp_path / "made" / name)
        tok.save_pretrained(tmp_path / "made" / name)
    monkeypatch.chdir(tmp_path / "made")
    models = [adapter(draft_model="draft", base_model="./base", max_tokens=3, device="cpu") for adapter in (WSDChatModel, WSDLLM)]
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    runtime = models[0].wsd_runtime()
    try:
        assert models[0].invoke("hi").content == models[1].complete("hi").text == runtime.generate([{"role": "user", "content": "hi"}], max_tokens=3).text
        assert models[1].wsd_runtime() is runtime
        assert (models[0].draft_model, models[1].base_model) == (str(tmp_path / "made" / "draft"), str(tmp_path / "made" / "base"))
    finally:
        runtime.close()


def _aggregate(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    return full


@pytest.mark.parametrize(
    "reply",
    [
        fake_result(CALL_TEXT, content="", tool_calls=(CALL,)),
        fake_result(f"Sure.\n{CALL_TEXT}", content="Sure.", tool_calls=(CALL,)),
        fake_result("<tool_call>\n{\"name\": \"Add\", \"arg", content="", invalid_tool_calls=(InvalidToolCall("<tool_call>\n{\"name\": \"Add\", \"arg", "not closed", None, "call_2"),)),
        fake_result("No call needed.", content="No call needed."),
    ],
)
def test_tool_calls_stream_and_invoke_agree(fake, reply):
    fake.reply = reply
    model = WSDChatModel().bind_tools([Add], tool_choice="auto")
    chunks = list(model.stream("x"))
    invoked = model.invoke("x")
    full = _aggregate(chunks)
    assert all("<tool_call>" not in c.text for c in chunks)
    assert full.content == invoked.content == reply.content
    expected = [{"name": c.name, "args": c.arguments, "type": "tool_call"} for c in reply.tool_calls]
    assert _without_ids(full.tool_calls) == _without_ids(invoked.tool_calls) == expected  # ids: each stream's own
    assert [c["id"] for c in full.invalid_tool_calls] == [c["id"] for c in invoked.invalid_tool_calls] == [c.id for c in reply.invalid_tool_calls]
    assert [c["error"] for c in invoked.invalid_tool_calls] == [c.error for c in reply.invalid_tool_calls]
    # LangChain makes the message from the chunks itself when the model streams under invoke
    streamed = WSDChatModel(streaming=True).bind_tools([Add], tool_choice="auto")
    for message in (streamed.invoke("x"), asyncio.run(streamed.ainvoke("x"))):
        assert [c["error"] for c in message.invalid_tool_calls] == [c.error for c in reply.invalid_tool_calls]


def _without_ids(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in c.items() if k != "id"} for c in calls]


def test_a_call_streams_as_it_is_written(fake):
    """As OpenAI's calls stream: the id and name once the name is written, then the arguments' JSON
    text as it is written; the chunks add up to the call, whose arguments parse as far as they came."""
    fake.reply = fake_result(f"Sure.\n{CALL_TEXT}", content="Sure.", tool_calls=(CALL,))
    fake.piece = 3
    chunks = list(WSDChatModel().bind_tools([Add]).stream("x"))
    pieces = [p for c in chunks for p in c.tool_call_chunks]
    assert pieces[0]["name"] == "Add" and pieces[0]["id"].startswith("call_") and pieces[0]["index"] == 0
    assert len(pieces) > 3 and all(p["name"] is None and p["id"] is None and p["index"] == 0 for p in pieces[1:])
    assert "".join(p["args"] for p in pieces) == json.dumps(CALL.arguments)  # as written: the grammar's spacing
    assert not chunks[-1].tool_call_chunks  # all of it showed before the end
    grown = [_aggregate(chunks[:k]).tool_calls for k in range(1, len(chunks) + 1)]
    assert {"a": 1} in [calls[0]["args"] for calls in grown if calls]  # a partial parse on the way
    full = _aggregate(chunks)
    assert full.text == "Sure." and _without_ids(full.tool_calls) == [{"name": "Add", "args": CALL.arguments, "type": "tool_call"}]
    assert full.tool_calls[0]["id"] == pieces[0]["id"]
    assert full.response_metadata["finish_reason"] == "tool_calls"  # as OpenAI's: the reply ended with its calls
    generation = WSDChatModel(tools=[Add]).generate([[HumanMessage("x")]]).generations[0][0]
    assert generation.generation_info["finish_reason"] == generation.message.response_metadata["finish_reason"] == "tool_calls"


def test_a_streamed_call_found_invalid_at_the_end_is_reported_under_its_id(fake):
    """A call cut short by max_tokens streams as far as it was written; the last chunk names its
    error under the id it streamed with, and an invoked message lists it as invalid, with the text
    the model wrote (not `{"a": 1}`, the parse of it so far, which reads as whole arguments)."""
    raw = '<tool_call>\n{"name": "Add", "arguments": {"a": 1, "b'
    error = "the call is not closed with </tool_call> (the reply used up max_tokens=20 first; raise max_tokens)"
    fake.reply = fake_result(raw, content="", invalid_tool_calls=(InvalidToolCall(raw, error, "Add", "call_9"),))
    fake.piece = 4
    for model in (WSDChatModel(), WSDChatModel(streaming=True)):
        chunks = list(model.bind_tools([Add]).stream("x"))
        streamed_id = chunks[0].tool_call_chunks[0]["id"]
        assert chunks[-1].response_metadata["tool_call_errors"] == {streamed_id: error}
        assert chunks[-1].response_metadata["wsd"]["invalid_tool_call_text"] == {streamed_id: raw}
        assert all(k in ("model_name", "model_provider", "finish_reason", "tool_call_errors", "wsd") for k in chunks[-1].response_metadata)
        invoked = model.bind_tools([Add]).invoke("x")
        assert invoked.tool_calls == [] and [(c["name"], c["args"], c["error"]) for c in invoked.invalid_tool_calls] == [("Add", raw, error)]


def test_an_invalid_call_that_never_showed_reaches_content_block_streams(fake):
    """A call found invalid before it showed (cut short before its name) comes in a chunk before the
    last, which holds only usage and metadata: LangChain's content blocks of a last chunk leave out a
    call that does not parse, so `stream_events(version="v3")`, and an invoke under a v2 streaming
    handler (LangGraph's v2 message stream), lost the call: an agent saw an empty reply."""
    from langchain_core.tracers._streaming import _V2StreamingCallbackHandler

    class V2(BaseCallbackHandler, _V2StreamingCallbackHandler):
        def on_stream_event(self, event: Any, **kwargs: Any) -> None:
            pass

    raw = '<tool_call>\n{"na'
    error = "the call is not closed with </tool_call> (the reply used up max_tokens=5 first; raise max_tokens)"
    fake.reply = replace(fake_result(raw, content="", invalid_tool_calls=(InvalidToolCall(raw, error, None, "call_9"),)), finish_reason="length")
    model = WSDChatModel().bind_tools([Add], tool_choice="required")
    chunks = list(model.stream("x"))
    assert chunks[-1].chunk_position == "last" and not chunks[-1].tool_call_chunks and chunks[-1].usage_metadata is not None
    assert [(c["id"], c["args"]) for c in chunks[-2].tool_call_chunks] == [("call_9", raw)]
    assert [(c["id"], c["args"]) for c in model.stream_events("x", version="v3").output.invalid_tool_calls] == [("call_9", raw)]
    for output_version in ("v0", "v1"):
        invoked = WSDChatModel(output_version=output_version).bind_tools([Add], tool_choice="required").invoke("x", config={"callbacks": [V2()]})
        assert invoked.tool_calls == [] and [(c["id"], c["args"], c["error"]) for c in invoked.invalid_tool_calls] == [("call_9", raw, error)]
        if output_version == "v1":  # its content block has the runtime's error too
            assert [(b["type"], b["error"]) for b in invoked.content] == [("invalid_tool_call", error)]


def test_text_replays_with_its_sources_when_tools_are_bound(fake):
    chunks = list(WSDChatModel().bind_tools([Add], tool_choice="none").stream("x"))
    assert [c.text for c in chunks] == ["Hi", " there", ""]
    assert [c.response_metadata.get("wsd_source") for c in chunks[:2]] == [["draft"], ["base"]]


def test_an_answer_streams_while_tools_are_bound(fake, monkeypatch):
    """With tools bound, text before any call streams as it is written (an agent's final answer
    too); a partial tag and the whitespace before a call wait, and markup never shows."""
    pieces = [("Let", "draft"), (" me", "draft"), (" add", "base"), (".\n", "base"), ("<tool", "base"), ('_call>\n{"name": "Add"}\n</tool_call>', "base")]
    text = "".join(p for p, _ in pieces)
    fake.reply = fake_result(text, content="Let me add.", tool_calls=(CALL,))
    sent: list[str] = []

    def stream(messages: Any, **params: Any) -> Iterator[Any]:
        for piece, source in pieces:
            sent.append(piece)
            yield TextDelta(piece, source)
        yield FinalEvent(fake.reply)

    monkeypatch.setattr(fake, "stream", stream)
    seen = []
    for chunk in WSDChatModel().bind_tools([Add]).stream("x"):
        seen.append((chunk.text, chunk.response_metadata.get("wsd_source"), len(sent)))
    assert seen[:4] == [("Let", ["draft"], 1), (" me", ["draft"], 2), (" add", ["base"], 3), (".", ["base"], 4)]
    assert [s[0] for s in seen[4:]] == ["", ""] and len(seen) == 6  # the call, then the last chunk: no more text
    assert "".join(s[0] for s in seen) == "Let me add."


def test_shown_text_joins_to_the_content_whatever_the_pieces():
    """integration.ShownText, under both adapters: pieces cut anywhere, a '<' that is not a call,
    a call after text (with space before the text: its content kept it, as shown, where before it
    was stripped and the stream failed), text after a call, and no tools (everything shows as it comes)."""
    from wsd_llms.integration import ShownText
    from wsd_llms.tools import parse_reply

    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    for text, content, hide in (
        ("a < b, so 2 <  3.", "a < b, so 2 <  3.", True),
        ("Checking.\n\n" + call, "Checking.", True),
        (" Checking.\n" + call, " Checking.", True),
        ("\n" + call + "\nDone.", "Done.", True),
        (call, "", True),
        ("Plain text, " + call, "Plain text, " + call, False),
    ):
        if hide:
            assert parse_reply(text, [{"name": "f", "parameters": {"type": "object"}}])[0] == content
        for cut in range(1, 7):
            shown = ShownText(parse_params(**({"tools": [{"name": "f"}]} if hide else {})))
            pieces = [(text[i : i + cut], "draft" if i < 6 else "base") for i in range(0, len(text), cut)]
            runs = [run for piece, source in pieces for run in shown.add(piece, source)] + shown.finish(content)
            assert "".join(t for t, _ in runs) == content, (text, cut)
            assert all("<tool" not in t for t, _ in runs) or not hide
            assert [s for _, s in runs] == sorted((s for _, s in runs), key=["draft", "base"].index)  # draft text, then base text


def test_a_response_format_value_streams_whatever_its_strings_hold():
    """Beside a response_format, only a reply that starts as calls do is read as calls: a value
    whose string holds the call tag streams as it is written (it had waited from the tag to the end)."""
    from wsd_llms.integration import ShownText

    value, call = '{"note": "use <tool_call> here"}', '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    with_format = parse_params(tools=[{"name": "f"}], response_format={"type": "object"})
    shown = ShownText(with_format)
    seen = ["".join(t for t, _ in shown.add(value[i : i + 3], "base")) for i in range(0, len(value), 3)]
    assert "".join(seen) == value and all(seen)  # every piece shows as it comes
    calls = ShownText(with_format)
    assert not "".join(t for i in range(0, len(call), 3) for t, _ in calls.add(call[i : i + 3], "base"))


@pytest.mark.parametrize("choice", ["none", {"type": "none"}])
def test_text_streams_as_it_comes_when_tool_choice_is_none(fake, monkeypatch, choice):
    """With tool_choice="none" (in any form) no call markup is taken out, so nothing needs holding back."""
    sent: list[Any] = []

    def stream(messages: Any, **params: Any) -> Iterator[Any]:
        for event in fake._events(messages, params):
            sent.append(event)
            yield event

    monkeypatch.setattr(fake, "stream", stream)
    fake.reply = fake_result("Hi <tool_call> is text here")  # what would be held back with tools on
    chunks = WSDChatModel().bind_tools([Add]).stream("x", tool_choice=choice)  # a call's own, as given
    assert [(c.text, len(sent)) for c in chunks] == [("Hi", 1), (" <tool_call> is text here", 2), ("", 3)]


def test_a_plain_text_response_format_streams_calls_as_without_one(fake):
    """OpenAI's {"type": "text"} is no response_format (the runtime drops it): beside tools, the text
    streams up to the call and the call streams as a call, as with no format at all (the stream had
    read the reply as a value and shown the call's markup as text)."""
    fake.reply = fake_result(f"Let me add.\n{CALL_TEXT}", content="Let me add.", tool_calls=(CALL,))
    model = WSDChatModel().bind_tools([Add])
    for response_format in ({"type": "text"}, None):
        chunks = list(model.stream("x", response_format=response_format))
        assert "".join(c.text for c in chunks) == "Let me add." and all("<tool_call>" not in c.text for c in chunks)
        assert [(c["name"], c["args"]) for c in _aggregate(chunks).tool_calls] == [("Add", {"a": 1, "b": 2})]


@pytest.mark.parametrize("choice", ["auto", {"type": "auto"}])
def test_a_call_left_to_the_model_keeps_the_constructor_s_stops(fake, choice):
    """tool_choice auto, in any of its forms, forces no call, so the constructor's stop strings stay
    (a dict form had counted as a forced call, whose grammar ends the reply, and dropped them)."""
    WSDChatModel(stop=["\n\n"]).bind_tools([Add]).invoke("x", tool_choice=choice)  # a call's own, as given
    assert fake.requests[-1][1]["stop"] == ["\n\n"]
    WSDChatModel(stop=["\n\n"]).bind_tools([Add]).invoke("x", tool_choice={"type": "any"})
    assert fake.requests[-1][1]["stop"] == []


@pytest.mark.parametrize("strategy", ["provider", "default"])
def test_create_agent_with_provider_strategy_and_tools(fake, monkeypatch, strategy):
    """LangChain's create_agent with response_format=ProviderStrategy(...) binds tools and a
    response_format together: the model calls tools, then answers with the value. With a bare
    schema, create_agent picks that strategy itself, from the model's profile."""
    from langchain.agents import create_agent
    from langchain.agents.structured_output import ProviderStrategy

    from wsd_llms.params import parse_params

    class Weather(BaseModel):
        city: str
        degrees: int

    @tool
    def temperature(city: str) -> int:
        """The temperature in a city, in degrees."""
        return 21

    answer = '{"city": "Paris", "degrees": 21}'
    replies = [
        fake_result("<tool_call>...", content="", tool_calls=(ToolCall("call_1", "temperature", {"city": "Paris"}),)),
        fake_result(answer, content=answer, parsed=json.loads(answer)),
    ]
    events = fake._events
    monkeypatch.setattr(fake, "_events", lambda messages, params: (setattr(fake, "reply", replies.pop(0)), events(messages, params))[1])
    agent = create_agent(WSDChatModel(), tools=[temperature], response_format=ProviderStrategy(Weather) if strategy == "provider" else Weather)
    out = agent.invoke({"messages": [("user", "How warm is Paris?")]})
    assert out["structured_response"] == Weather(city="Paris", degrees=21)
    assert [m.type for m in out["messages"]] == ["human", "ai", "tool", "ai"]
    for _, params in fake.requests:  # what the runtime is asked, it accepts
        parsed = parse_params(**params)
        assert parsed.calls_tools and parsed.response_format["title"] == "Weather"


def test_profile_says_what_the_models_take_and_give(monkeypatch, tmp_path):
    """LangChain's model profile: text in and out, tools and native structured output. The context
    window is there when it costs nothing to read: before the first load has converted the embedded
    models it comes from their GGUF headers, and neither that nor building the model converts anything."""
    profile = WSDChatModel(mode="base").profile
    assert profile["structured_output"] and profile["tool_calling"] and profile["tool_choice"] and profile["text_inputs"]
    assert not profile["image_inputs"] and not profile["reasoning_output"]
    import wsd_llms.runtime

    monkeypatch.setattr(wsd_llms.runtime, "_registry", {})  # a runtime of its own, that has read nothing yet
    monkeypatch.setenv("WSD_LLMS_CACHE", str(tmp_path / "empty"))
    fresh = WSDChatModel()
    assert fresh.profile["max_input_tokens"] == 8191 and fresh.profile["structured_output"]  # SmolLM2's 8192 bounds online WSD
    assert not (tmp_path / "empty").exists()


@pytest.mark.embedded
def test_profile_reads_a_hub_model_from_the_cache_without_the_network(embedded, monkeypatch, tmp_path):
    """A repo id's window comes from the hub cache's snapshot, with no request made (hf_hub_download
    reaches out even with local_files_only); a repo not in the cache has none."""
    import shutil
    import warnings

    import huggingface_hub.constants

    import wsd_llms.runtime
    from wsd_llms.loading import EMBEDDED_BASE, EMBEDDED_DRAFT, local_source

    for name, source in (("draft", EMBEDDED_DRAFT), ("base", EMBEDDED_BASE)):
        repo = tmp_path / f"models--someone--{name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("abc123")
        (repo / "snapshots" / "abc123").mkdir(parents=True)
        shutil.copy(local_source(source) / "config.json", repo / "snapshots" / "abc123" / "config.json")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(wsd_llms.runtime, "_registry", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pytest-socket warns of a blocked request: that would fail the profile, and this test
        assert WSDChatModel(draft_model="someone/draft", base_model="someone/base").profile["max_input_tokens"] == 8191
        assert "max_input_tokens" not in WSDChatModel(draft_model="someone/draft", base_model="someone/other").profile


@pytest.mark.embedded
def test_profile_has_the_context_window_of_the_mode(embedded):
    from langchain.agents.middleware import SummarizationMiddleware

    windows = {mode: embedded.context_window(mode) for mode in ("online", "base", "draft")}  # converts the models, if not yet
    for mode, window in windows.items():
        assert WSDChatModel(mode=mode).profile["max_input_tokens"] == window - 1  # a reply needs a position
    assert WSDChatModel().profile["max_input_tokens"] == 8191  # the draft's window bounds online WSD
    SummarizationMiddleware(model=WSDChatModel(), trigger=("fraction", 0.8))  # needs the profile's window


class Joke(BaseModel):
    """A joke."""

    setup: str = Field(description="the question")
    punchline: str


class JokeDict(TypedDict):
    """A joke."""

    setup: str
    punchline: str


JOKE = {"setup": "Why?", "punchline": "Because."}


FLAT_JOKE = {"type": "function", "name": "Joke", "description": "A joke.", "parameters": Joke.model_json_schema()}  # OpenAI's Responses API's tool


@pytest.mark.parametrize("schema", [Joke, JokeDict, Joke.model_json_schema(), FLAT_JOKE])
@pytest.mark.parametrize("method", ["json_schema", "json_mode", "function_calling"])
def test_structured_output_each_schema_and_method(fake, schema, method):
    if method == "function_calling":
        name = "Joke" if schema is not JokeDict else "JokeDict"
        fake.reply = fake_result("<tool_call>...", content="", tool_calls=(ToolCall("call_1", name, JOKE),))
    else:
        fake.reply = fake_result(json.dumps(JOKE))
    parsed = WSDChatModel(stop=["\n"]).with_structured_output(schema, method=method).invoke("joke")
    assert parsed == (Joke(**JOKE) if schema is Joke else JOKE)
    params = fake.requests[-1][1]
    assert params["stop"] == []  # the grammar ends the value: the model's stops would cut it short
    WSDChatModel(stop=["\n"]).with_structured_output(schema, method=method).invoke("joke", stop=None)
    assert fake.requests[-1][1]["stop"] == []
    if method != "function_calling":  # however the request asks for JSON
        WSDChatModel(stop=["\n"]).invoke("joke", response_format={"type": "json_object"})
        assert fake.requests[-1][1]["stop"] == []
        WSDChatModel(stop=["\n"]).invoke("joke", response_format={"type": "regex", "pattern": "[a-z]+"})
        assert fake.requests[-1][1]["stop"] == ["\n"]  # a text grammar: the stops still end it
    if method in ("json_schema", "json_mode"):  # json_mode holds the object to a given schema too
        assert params["response_format"]["properties"].keys() == {"setup", "punchline"}
    else:
        assert params["tool_choice"] == "required" and len(params["tools"]) == 1


class ShortJoke(Joke):
    @pydantic.field_validator("punchline")
    @classmethod
    def _short(cls, value: str) -> str:
        if len(value) > 5:
            raise ValueError("too long")
        return value


@pytest.mark.parametrize("path", ["invoke", "bind", "stream", "ainvoke", "unstreamed", "constructor", "constructor-stream", "configurable"])
async def test_a_pydantic_response_format_is_parsed_into_its_class(fake, path):
    """As ChatOpenAI: a call whose response_format is a pydantic class has the value as that class
    in additional_kwargs["parsed"] (None when it does not parse, or fails the class's own validators,
    with the reason in parse_error); a schema as a dict gets no such key. The constructor's
    response_format is parsed into as a call's is, and so is a model's that LangChain's
    configurable_fields rebuilds from its fields (the class was kept aside, and was lost)."""
    from langchain_core.runnables import ConfigurableField

    fake.reply = fake_result(json.dumps(JOKE), parsed=JOKE)

    async def reply(model: WSDChatModel, **kwargs: Any) -> AIMessage:
        if path == "configurable":
            configurable = WSDChatModel(**kwargs).configurable_fields(temperature=ConfigurableField(id="temperature"))
            return configurable.invoke("joke", config={"configurable": {"temperature": 0.5}})
        if path.startswith("constructor"):
            model = WSDChatModel(**kwargs)
            return _aggregate(list(model.stream("joke"))) if path == "constructor-stream" else model.invoke("joke")
        if path == "bind":
            return model.bind(**kwargs).invoke("joke")
        if path == "ainvoke":
            return await model.ainvoke("joke", **kwargs)
        if path in ("stream", "unstreamed"):
            chunks = list((WSDChatModel(disable_streaming=True) if path == "unstreamed" else model).stream("joke", **kwargs))
            return _aggregate(chunks)
        return model.invoke("joke", **kwargs)

    message = await reply(WSDChatModel(), response_format=Joke)
    assert message.additional_kwargs["parsed"] == Joke(**JOKE) and type(message.additional_kwargs["parsed"]) is Joke
    assert "parse_error" not in message.response_metadata
    assert "parsed" not in (await reply(WSDChatModel(), response_format=Joke.model_json_schema())).additional_kwargs
    message = await reply(WSDChatModel(), response_format=ShortJoke)
    assert message.additional_kwargs["parsed"] is None
    assert "does not fit ShortJoke" in message.response_metadata["parse_error"] and "too long" in message.response_metadata["parse_error"]
    fake.reply = replace(fake_result('{"setup": "Wh', parse_error="cut short"), finish_reason="length")
    message = await reply(WSDChatModel(), response_format=Joke)
    assert message.additional_kwargs["parsed"] is None and message.response_metadata["parse_error"] == "cut short"


def test_a_constructor_s_pydantic_class_is_kept_and_dumped_as_its_schema(fake):
    """The field holds the class as given (what configurable_fields rebuilds from), while a dump,
    a copy's rebuild from it and the cache key (_identifying_params) hold its JSON schema."""
    model = WSDChatModel(response_format=Joke)
    assert model.response_format is Joke and copy.deepcopy(model).response_format is Joke
    assert model.model_dump()["response_format"] == Joke.model_json_schema() == model._identifying_params["response_format"]
    assert json.loads(model.model_dump_json())["response_format"] == Joke.model_json_schema()
    assert WSDChatModel.model_validate(model.model_dump()).response_format == Joke.model_json_schema()


UNTITLED = {"type": "object", "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}}, "required": ["setup", "punchline"]}


@pytest.mark.parametrize(
    "schema",
    [
        UNTITLED,
        {"type": "json_schema", "json_schema": {"name": "joke", "schema": UNTITLED}},
        {"name": "joke", "schema": UNTITLED},
        {"name": "joke", "description": "A joke.", "parameters": UNTITLED},
        {"name": "joke", "description": "A joke.", "input_schema": UNTITLED},  # Anthropic's tool form: it was sent as the schema, which held nothing
        {"type": "function", "name": "joke", "parameters": UNTITLED},  # OpenAI's Responses API's flat tool
        {"type": "custom", "name": "joke", "input_schema": UNTITLED},  # Anthropic's custom tool
    ],
)
def test_structured_output_takes_plain_and_openai_style_json_schemas(fake, schema):
    """As ChatOllama and ChatOpenAI do: a JSON schema without a title, OpenAI's response_format and
    function forms, and Anthropic's tool form, which LangChain's converters take."""
    fake.reply = fake_result(json.dumps(JOKE))
    assert WSDChatModel().with_structured_output(schema).invoke("joke") == JOKE
    assert fake.requests[-1][1]["response_format"] == UNTITLED


class Node(BaseModel):
    name: str
    children: list[Node] = []


class V1Joke(pydantic.v1.BaseModel):  # pydantic 1 models, which LangChain still takes, have no model_json_schema
    setup: str


TAGS = {"title": "Tags", "type": "array", "items": {"type": "string"}, "maxItems": 3}
SCORES = {"title": "Scores", "type": "object", "additionalProperties": {"type": "integer"}}


@pytest.mark.parametrize(
    "schema, sent",
    [
        (TAGS, TAGS),  # titled, and no properties: LangChain's converter kept only the title
        (SCORES, SCORES),
        ({"type": "function", "function": {"name": "joke", "parameters": UNTITLED}}, UNTITLED),
        (Node, Node.model_json_schema()),  # LangChain's converter wrote the recursion as any value
        (V1Joke, {"title": "V1Joke", "description": "", "type": "object", "properties": {"setup": {"type": "string"}}, "required": ["setup"]}),
    ],
)
def test_structured_output_sends_the_whole_schema(fake, schema, sent):
    fake.reply = fake_result(json.dumps({"name": "a", "children": []} if schema is Node else {"setup": "a"} if schema is V1Joke else ["a"]))
    WSDChatModel().with_structured_output(schema, method="json_schema").invoke("x")
    assert fake.requests[-1][1]["response_format"] == sent
    if schema is Node:
        assert sent["$defs"]["Node"]["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}


NODE_REF = {"title": "Node", "$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object", "properties": {"v": {"type": "integer"}}, "required": ["v"]}}}


@pytest.mark.parametrize(
    ("schema", "parameters"),
    [
        (NODE_REF, {key: NODE_REF[key] for key in ("$ref", "$defs")}),  # a root $ref
        ({"name": "Thing", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, "strict": True}, {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
        ({"title": "U", "anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}]}, {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}]}),
    ],
)
def test_a_dict_schema_the_converter_drops_is_the_calls_parameters(fake, schema, parameters):
    """function_calling with a dict schema whose root is a $ref or an anyOf, or in OpenAI's
    {"name", "schema"} wrapper: LangChain's converter made a function with no parameters, so the call
    took any arguments and `{}` came back as a valid value."""
    fake.reply = fake_result("", tool_calls=(ToolCall("call_1", "x", {}),))
    WSDChatModel().with_structured_output(schema, method="function_calling").invoke("x")
    assert fake.requests[-1][1]["tools"][0]["function"]["parameters"] == parameters
    WSDChatModel().bind_tools([schema]).invoke("x")
    assert fake.requests[-1][1]["tools"][0]["function"]["parameters"] == parameters


def test_an_array_schema_as_a_tool_is_told_it_must_be_an_object():
    """It was refused as "not a function tool (a tool its provider runs itself)"."""
    with pytest.raises(InvalidParameterError, match="parameters must be a JSON schema of type 'object'"):
        WSDChatModel().with_structured_output({"title": "Arr", "type": "array", "items": {"type": "integer"}}, method="function_calling").invoke("x")


def test_a_recursive_tool_schema_stays_recursive(fake):
    """bind_tools (and function_calling) sends a pydantic schema with references as its own JSON
    schema, as a tool or as a @tool's argument: LangChain's converter wrote the recursion as any
    value, so the grammar let through calls the model then refused. A schema without references
    is sent as LangChain converts it."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    @tool
    def store(node: Node) -> str:
        """Store a tree."""
        return "ok"

    class Flat(BaseModel):
        """A flat schema."""

        name: str

    fake.reply = fake_result("Hi")
    WSDChatModel().bind_tools([Node, store, Flat]).invoke("x")
    node, stored, flat = (t["function"]["parameters"] for t in fake.requests[-1][1]["tools"])
    assert node == Node.model_json_schema() and node["$defs"]["Node"]["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}
    assert stored["$defs"]["Node"]["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}
    assert flat == convert_to_openai_tool(Flat)["function"]["parameters"]
    fake.reply = fake_result("", tool_calls=(ToolCall("call_1", "Node", {"name": "a", "children": [{"name": "b"}]}),))
    assert WSDChatModel().with_structured_output(Node, method="function_calling").invoke("x") == Node(name="a", children=[Node(name="b")])
    assert fake.requests[-1][1]["tools"][0]["function"]["parameters"] == Node.model_json_schema()


def test_a_recursive_tool_is_counted_as_it_is_sent(shared_runtime, monkeypatch):
    """get_num_tokens_from_messages counts the tools' block as bind_tools sends it: a schema with
    $defs as its own JSON schema (the count had used LangChain's conversion: 342 tokens for 452)."""
    monkeypatch.setattr(WSDChatModel, "wsd_runtime", lambda self: shared_runtime)
    model = WSDChatModel(max_tokens=2)
    sent = model.bind_tools([Node]).invoke("hi").usage_metadata["input_tokens"]
    assert model.get_num_tokens_from_messages([HumanMessage("hi")], tools=[Node]) == sent


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
@pytest.mark.parametrize("pydantic", [True, False])
def test_a_json_reply_cut_by_max_tokens_fails_saying_so(fake, method, pydantic):
    """Where max_tokens ended the JSON, the parse fails with the runtime's parse_error, which says
    to raise max_tokens (not only that the JSON is invalid). A pydantic class still validates what
    LangChain's parsing makes of a cut JSON (it closes an open string and brackets, as for any
    provider): only where that fails does its parse fail, then with the same reason."""
    from langchain_core.exceptions import OutputParserException

    from wsd_llms.params import parse_params
    from wsd_llms.structured import Cut, structured_fields

    class City(BaseModel):
        name: str

    def cut_reply(text: str) -> WSDResult:
        fields = structured_fields(text, parse_params(response_format=City.model_json_schema()), Cut("the reply used up max_tokens=6", "raise max_tokens"))
        return replace(fake_result(text, parsed=None, parse_error=fields["parse_error"]), finish_reason="length")

    schema = City if pydantic else City.model_json_schema()
    fake.reply = cut_reply('{"na')
    with pytest.raises(OutputParserException, match=r"^the reply used up max_tokens=6 before its JSON was complete .*; raise max_tokens"):
        WSDChatModel().with_structured_output(schema, method=method).invoke("a city")
    with pytest.raises(OutputParserException, match=r"^the reply used up max_tokens=6"):  # a stream at its end, as invoke
        list(WSDChatModel().with_structured_output(schema, method=method).stream("a city"))
    fake.reply = cut_reply('{"name": "Par')
    if pydantic:
        assert WSDChatModel().with_structured_output(schema, method=method).invoke("a city") == City(name="Par")
        assert list(WSDChatModel().with_structured_output(schema, method=method).stream("a city"))[-1] == City(name="Par")
    else:
        with pytest.raises(OutputParserException, match="used up max_tokens=6"):
            WSDChatModel().with_structured_output(schema, method=method).invoke("a city")
    # a stop string the call gave cut it: the same, naming the stop
    fields = structured_fields('{"na', parse_params(response_format=City.model_json_schema()), Cut("the stop string 'me' ended the reply", "leave 'me' out of stop"))
    fake.reply = fake_result('{"na', parsed=None, parse_error=fields["parse_error"], stop_reason="me")
    with pytest.raises(OutputParserException, match=r"^the stop string 'me' ended the reply before its JSON was complete .*; leave 'me' out of stop"):
        WSDChatModel().with_structured_output(schema, method=method).invoke("a city", stop=["me"])


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
async def test_a_structured_stream_that_fails_ends_the_model_run_first(fake, method):
    """A structured stream fails at the model's last chunk; the model's run still ends as a finished
    call, with its message and usage (for tracing and token counts), before the parse fails: it had
    ended with GeneratorExit (astream) or not at all (stream)."""
    from langchain_core.exceptions import OutputParserException

    class Ends(BaseCallbackHandler):
        def __init__(self) -> None:
            self.ends: list[Any] = []

        def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            self.ends.append(response.generations[0][0].message.usage_metadata["output_tokens"])

        def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
            self.ends.append(error)

    raw = '<tool_call>\n{"name": "Joke", "arg' if method == "function_calling" else '{"set'
    invalid = (InvalidToolCall(raw, "the call is not closed", "Joke", "call_1"),) if method == "function_calling" else ()
    fake.reply = replace(fake_result(raw, content="", invalid_tool_calls=invalid, parse_error=None if invalid else "cut"), finish_reason="length")
    structured = WSDChatModel().with_structured_output(Joke, method=method)
    handler = Ends()
    with pytest.raises(OutputParserException):
        list(structured.stream("joke", config={"callbacks": [handler]}))
    with pytest.raises(OutputParserException):
        [x async for x in structured.astream("joke", config={"callbacks": [handler]})]
    assert handler.ends == [to_usage_metadata(fake.reply)["output_tokens"]] * 2


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_a_value_off_its_schema_is_a_parsing_error(fake, method):
    """A TypedDict or JSON schema has no pydantic class to check the value: the runtime's
    parse_error (a keyword the grammar does not enforce) fails the parse, as a bad JSON would."""
    from langchain_core.exceptions import OutputParserException

    error = "['a', 'a'] has non-unique elements (at $.tags, keyword 'uniqueItems')"
    fake.reply = fake_result('{"tags": ["a", "a"]}', parsed={"tags": ["a", "a"]}, parse_error=error)
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}
    with pytest.raises(OutputParserException, match="non-unique"):
        WSDChatModel().with_structured_output(schema, method=method).invoke("tags")
    out = WSDChatModel().with_structured_output(schema, method=method, include_raw=True).invoke("tags")
    assert out["parsed"] is None and "uniqueItems" in str(out["parsing_error"]) and out["raw"].response_metadata["parse_error"] == error
    with pytest.raises(OutputParserException, match="non-unique"):  # a stream at its end too (it had given the value)
        list(WSDChatModel().with_structured_output(schema, method=method).stream("tags"))
    fake.reply = fake_result('{"tags": ["a", "b"]}', parsed={"tags": ["a", "b"]})
    assert WSDChatModel().with_structured_output(schema, method=method).invoke("tags") == {"tags": ["a", "b"]}
    assert list(WSDChatModel().with_structured_output(schema, method=method).stream("tags"))[-1] == {"tags": ["a", "b"]}


class Tally(BaseModel):
    counts: dict[str, int]


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_a_key_written_twice_fails_a_pydantic_class_too(fake, method):
    """pydantic keeps a repeated key's last value without a word, so for a pydantic class the
    runtime's parse_error for it fails the parse, as it does for a JSON schema; a reply with
    another parse_error is still pydantic's to judge."""
    from langchain_core.exceptions import OutputParserException

    from wsd_llms.structured import parse_json

    text = '{"counts": {"a": 1, "b": 2, "a": 3}}'
    fake.reply = fake_result(text, parsed=None, parse_error=parse_json(text, Tally.model_json_schema())[1])
    structured = WSDChatModel().with_structured_output(Tally, method=method)
    with pytest.raises(OutputParserException, match="the key 'a' is written more than once"):
        structured.invoke("tally")
    with pytest.raises(OutputParserException, match="the key 'a' is written more than once"):
        list(structured.stream("tally"))
    out = WSDChatModel().with_structured_output(Tally, method=method, include_raw=True).invoke("tally")
    assert out["parsed"] is None and "written more than once" in str(out["parsing_error"])
    fake.reply = fake_result('{"counts": {"a": 1}}', parsed=None, parse_error="a keyword pydantic judges")
    assert structured.invoke("tally") == Tally(counts={"a": 1})


def test_json_mode_without_a_schema_is_any_json_object(fake):
    fake.reply = fake_result(json.dumps(JOKE))
    assert WSDChatModel().with_structured_output(method="json_mode").invoke("joke") == JOKE
    assert fake.requests[-1][1]["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_include_raw(fake, method):
    fake.reply = fake_result('{"setup": "Why?"}', content="", tool_calls=(ToolCall("call_1", "Joke", {"setup": "Why?"}),)) if method == "function_calling" else fake_result('{"setup": "Why?"}')
    out = WSDChatModel().with_structured_output(Joke, method=method, include_raw=True).invoke("joke")
    assert isinstance(out["raw"], AIMessage) and out["parsed"] is None and out["parsing_error"] is not None
    fake.reply = fake_result(json.dumps(JOKE), content="", tool_calls=(ToolCall("call_1", "Joke", JOKE),)) if method == "function_calling" else fake_result(json.dumps(JOKE))
    out = WSDChatModel().with_structured_output(Joke, method=method, include_raw=True).invoke("joke")
    assert out["parsed"] == Joke(**JOKE) and out["parsing_error"] is None


def _merged(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    out: Any = None
    for chunk in chunks:
        out = chunk if out is None else out + chunk
    return out


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
async def test_include_raw_streams_end_as_invoke_does(fake, method):
    """With include_raw, a stream whose parse fails at its end gives the error as `parsing_error`,
    as invoke does (it raised: LangChain's fallbacks catch only a failure before the first chunk);
    the message streams as `raw`, then `parsed` and `parsing_error` come."""
    raw = '<tool_call>\n{"name": "Joke", "arg' if method == "function_calling" else '{"set'
    invalid = (InvalidToolCall(raw, "the call is not closed", "Joke", "call_1"),) if method == "function_calling" else ()
    cut = replace(fake_result(raw, content="", invalid_tool_calls=invalid, parse_error=None if invalid else "cut short"), finish_reason="length")
    whole = fake_result(json.dumps(JOKE), content="", tool_calls=(ToolCall("call_1", "Joke", JOKE),)) if method == "function_calling" else fake_result(json.dumps(JOKE))
    structured = WSDChatModel().with_structured_output(Joke, method=method, include_raw=True)
    for reply in (cut, whole):
        fake.reply = reply
        invoked = structured.invoke("joke")
        for chunks in (list(structured.stream("joke")), [c async for c in structured.astream("joke")]):
            assert all(set(c) == {"raw"} for c in chunks[:-1]) and set(chunks[-1]) == {"parsed", "parsing_error"}
            streamed = _merged(chunks)
            assert streamed["parsed"] == invoked["parsed"] and repr(streamed["parsing_error"]) == repr(invoked["parsing_error"])
            assert streamed["raw"].text == invoked["raw"].text and streamed["raw"].usage_metadata == invoked["raw"].usage_metadata
        assert (invoked["parsed"] is None) == (reply is cut) and (invoked["parsing_error"] is None) == (reply is whole)


@pytest.mark.parametrize("off", [{"disable_streaming": True}, {"streaming": False}, {"disable_streaming": "tool_calling"}])
async def test_a_reply_not_streamed_streams_as_one_last_chunk(fake, off):
    """Where streaming is off, stream gives the invoked reply as one last chunk, its calls (and an
    invalid call's error) kept: LangChain yields the AIMessage itself, which its stream parsers
    rebuilt without calls (a tools parser then streamed nothing) and as not ended (a JSON that
    max_tokens cut short streamed as a value where invoke fails)."""
    from langchain_core.exceptions import OutputParserException
    from langchain_core.output_parsers.openai_tools import PydanticToolsParser

    bad = InvalidToolCall('<tool_call>\n{"name": "Joke", "arguments": {}}\n</tool_call>', "'setup' is a required property", "Joke", "call_2")
    fake.reply = fake_result("", tool_calls=(ToolCall("call_1", "Joke", JOKE),), invalid_tool_calls=(bad,))
    model = WSDChatModel(**off)
    for chunks in (list(model.bind_tools([Joke]).stream("joke")), [c async for c in model.bind_tools([Joke]).astream("joke")]):
        (chunk,) = chunks
        assert isinstance(chunk, AIMessageChunk) and chunk.chunk_position == "last" and chunk.usage_metadata is not None
        assert chunk.tool_calls == [{"name": "Joke", "args": JOKE, "id": "call_1", "type": "tool_call"}]
        assert [(c["id"], c["error"]) for c in chunk.invalid_tool_calls] == [("call_2", bad.error)]
    fake.reply = fake_result("", tool_calls=(ToolCall("call_1", "Joke", JOKE),))
    assert list(model.with_structured_output(Joke, method="function_calling").stream("joke")) == [Joke(**JOKE)]
    assert list((model.bind_tools([Joke], tool_choice="Joke") | PydanticToolsParser(tools=[Joke])).stream("joke")) == [[Joke(**JOKE)]]
    fake.reply = replace(fake_result('{"set', parse_error="the reply used up max_tokens=3 before its JSON was complete"), finish_reason="length")
    with pytest.raises(OutputParserException, match="used up max_tokens=3"):
        model.with_structured_output(JokeDict).invoke("joke")
    with pytest.raises(OutputParserException, match="used up max_tokens=3"):
        list(model.with_structured_output(JokeDict).stream("joke"))


@pytest.mark.parametrize("schema", [Joke, JokeDict])
def test_function_calling_without_a_valid_call_is_a_parsing_error(fake, schema):
    """A call cut short by max_tokens fails the parse with the runtime's error (LangChain's parser gave None)."""
    from langchain_core.exceptions import OutputParserException

    raw = '<tool_call>\n{"name": "Joke", "arg'
    fake.reply = fake_result(raw, content="", invalid_tool_calls=(InvalidToolCall(raw, "the call is not closed", "Joke", "call_1"),))
    with pytest.raises(OutputParserException, match="the call is not closed"):
        WSDChatModel().with_structured_output(schema, method="function_calling").invoke("joke")
    out = WSDChatModel().with_structured_output(schema, method="function_calling", include_raw=True).invoke("joke")
    assert out["parsed"] is None and "not closed" in str(out["parsing_error"])
    for piece in (0, 4):  # a stream fails at its end as invoke does (it had given nothing and no error), streamed call or not
        fake.piece = piece
        with pytest.raises(OutputParserException, match="the call is not closed"):
            list(WSDChatModel().with_structured_output(schema, method="function_calling").stream("joke"))
    begun = '<tool_call>\n{"name": "Joke", "arguments": {"setup": "Wh'
    fake.reply = fake_result(begun, content="", invalid_tool_calls=(InvalidToolCall(begun, "the call is not closed", "Joke", "call_1"),))
    with pytest.raises(OutputParserException, match="its call is invalid: 'Joke': the call is not closed"):
        list(WSDChatModel().with_structured_output(schema, method="function_calling").stream("joke"))
    fake.piece = 0
    fake.reply = fake_result("ok", content="ok")
    with pytest.raises(OutputParserException, match="it made no call"):
        WSDChatModel().with_structured_output(schema, method="function_calling").invoke("joke")
    fake.reply = fake_result("<tool_ca", content="", invalid_tool_calls=(InvalidToolCall("<tool_ca", "the call's tag is cut short", None, "call_3"),))
    with pytest.raises(OutputParserException, match="its call is invalid: a call: the call's tag is cut short"):  # not "None: ..."
        WSDChatModel().with_structured_output(schema, method="function_calling").invoke("joke")
    fake.reply = fake_result("<tool_call>...", content="", tool_calls=(ToolCall("call_1", schema.__name__, JOKE),))
    chunks = list(WSDChatModel().with_structured_output(schema, method="function_calling").stream("joke"))
    assert chunks[-1] == (Joke(**JOKE) if schema is Joke else JOKE)


def test_a_structured_stream_ends_on_the_call_invoke_takes(fake):
    """With parallel calls, a call that streamed before the runtime found it off its schema is not
    the stream's last value: the valid call invoke takes is (the stream had ended on the invalid one)."""
    bad = '<tool_call>\n{"name": "Joke", "arguments": {"setup": "a", "punchline": "a"}}\n</tool_call>'
    good = '<tool_call>\n{"name": "Joke", "arguments": {"setup": "b", "punchline": "c"}}\n</tool_call>'
    fake.reply = fake_result(
        f"{bad}\n{good}", content="", tool_calls=(ToolCall("call_2", "Joke", {"setup": "b", "punchline": "c"}),),
        invalid_tool_calls=(InvalidToolCall(bad, "'a' is not unique (at $, keyword 'not')", "Joke", "call_1"),),
    )
    fake.piece = 5
    model = WSDChatModel(parallel_tool_calls=True).with_structured_output(Joke, method="function_calling")
    assert model.invoke("joke") == list(model.stream("joke"))[-1] == Joke(setup="b", punchline="c")
    fake.piece = 0


def test_structured_output_bad_arguments():
    with pytest.raises(ValueError, match="method="):
        WSDChatModel().with_structured_output(Joke, method="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsupported arguments"):
        WSDChatModel().with_structured_output(Joke, colour="red")
    # a text grammar's reply is text: it failed at the parse, as "Invalid json output"
    with pytest.raises(ValueError, match=r"a regex format is a text grammar, not a JSON schema: .*model.bind\(response_format="):
        WSDChatModel().with_structured_output({"type": "regex", "pattern": "a+b"})
    # LangChain's converters said "no signature found for builtin type" and "Unsupported function"
    for method in ("json_schema", "function_calling"):
        for schema in (int, list[int], "Joke"):
            with pytest.raises(ValueError, match=r"is not a schema: with_structured_output takes a pydantic class, a TypedDict, a JSON schema dict"):
                WSDChatModel().with_structured_output(schema, method=method)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"^schema is an instance of Joke, not a schema: pass the class Joke$"):
            WSDChatModel().with_structured_output(Joke(**JOKE), method=method)  # type: ignore[arg-type]


# ---------------------------------------------------------------- tools on the embedded models


@pytest.mark.embedded
def test_embedded_forced_tool_call_stream_matches_invoke_and_history_runs(embedded):
    model = WSDChatModel(max_tokens=48).bind_tools([Add], tool_choice="Add")
    question = HumanMessage("What is 17 plus 25?")
    invoked = model.invoke([question])
    chunks = list(model.stream([question]))
    full = _aggregate(chunks)
    assert len([c for c in chunks if c.tool_call_chunks]) > 3 and not chunks[-1].tool_call_chunks  # as it was written
    assert invoked.content == full.content == ""
    assert len(invoked.tool_calls) == 1 and invoked.invalid_tool_calls == []
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [(c["name"], c["args"]) for c in invoked.tool_calls]
    call = invoked.tool_calls[0]
    answer = WSDChatModel(max_tokens=12).bind_tools([Add], tool_choice="none").invoke(
        [question, invoked, ToolMessage(str(call["args"]["a"] + call["args"]["b"]), tool_call_id=call["id"])]
    )
    assert answer.text.strip() and not answer.tool_calls


@pytest.mark.embedded
def test_embedded_structured_output(embedded):
    joke = WSDChatModel(max_tokens=48).with_structured_output(Joke).invoke("Tell me a joke about cats.")
    assert isinstance(joke, Joke)


def test_structured_output_is_the_whole_reply_whatever_the_constructor_says(fake):
    """with_structured_output leaves out the constructor's tools (json_schema, json_mode) and
    response_format (function_calling), and so does a call that forces a tool call: they made a
    request the runtime refused (a response_format beside a forced call), or offered tools where
    the value was asked for."""
    weather = {"type": "function", "function": {"name": "weather", "description": "d", "parameters": {"type": "object", "properties": {}}}}
    answers, calls = WSDChatModel(response_format={"type": "json_object"}), WSDChatModel(tools=[weather], tool_choice="required")
    answers.with_structured_output(Add, method="function_calling", include_raw=True).invoke("x")
    params = fake.requests[-1][1]
    assert params["response_format"] is None and [t["function"]["name"] for t in params["tools"]] == ["Add"] and params["tool_choice"] == "required"
    answers.bind_tools([weather], tool_choice="weather").invoke("x")
    assert fake.requests[-1][1]["response_format"] is None
    answers.bind_tools([weather]).invoke("x")  # tools on auto beside the value: the reply is a call or the value
    assert fake.requests[-1][1]["response_format"] == {"type": "object"}
    for method in ("json_schema", "json_mode"):
        calls.with_structured_output(Add, method=method, include_raw=True).invoke("x")
        params = fake.requests[-1][1]
        assert params["tools"] == [] and params["tool_choice"] == "auto" and params["response_format"] == Add.model_json_schema()


@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")  # still LangGraph's, and what agents built on it call
def test_structured_output_reads_a_conversation_that_ends_with_an_answer(differ_runtime, monkeypatch):
    """LangGraph's create_react_agent(..., response_format=...) asks for the structured response with
    the whole history, which ends with the agent's answer (an AIMessage): with_structured_output
    reads it as a finished turn and writes the value as the next one, in each method. As a forced
    start of a JSON reply the answer did not fit the grammar, and the agent failed. A plain call
    with continue_final_message=True (not the default) still continues a trailing AIMessage, and
    the structured calls write a new turn all the same. Tiny models: the grammar holds the value."""
    from langgraph.prebuilt import create_react_agent

    class Verdict(BaseModel):
        correct: bool

    @tool
    def check(claim: str) -> str:
        """Check a claim."""
        return "checked"

    monkeypatch.setattr(WSDChatModel, "wsd_runtime", lambda self: differ_runtime)
    model = WSDChatModel(max_tokens=60, continue_final_message=True)
    history = [HumanMessage("Is 2+3 equal to 5?"), AIMessage("Yes, it is.")]
    assert model.invoke(history).text.startswith("Yes, it is.")
    for method in ("json_schema", "function_calling", "json_mode"):
        schema = Verdict if method != "json_mode" else Verdict.model_json_schema()
        value = model.with_structured_output(schema, method=method).invoke(history)
        assert isinstance(value, Verdict) or set(value) == {"correct"}, (method, value)
    out = create_react_agent(model, [check], response_format=Verdict).invoke({"messages": [history[0]]}, {"recursion_limit": 8})
    assert isinstance(out["structured_response"], Verdict) and isinstance(out["messages"][-1], AIMessage)


def test_summarization_middleware_shortens_a_summary_prompt_that_overflows(draft_tokenizer, monkeypatch):
    """An agent whose history has outgrown the draft model's window keeps going under LangChain's
    SummarizationMiddleware: the summary call raises ContextOverflowError, which the middleware
    answers by summarizing a shorter cut of the history. Tiny models (a 256-token draft window),
    so the real runtime decodes the summary and the answer in a moment."""
    from dataclasses import replace

    from langchain.agents import create_agent
    from langchain.agents.middleware import SummarizationMiddleware

    draft = replace(tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0), context_window=256)
    runtime = WSDRuntime.from_models(draft, tiny_llama(draft_tokenizer, 1, "tiny-base", sharpen=3.0))
    monkeypatch.setattr(WSDChatModel, "wsd_runtime", lambda self: runtime)
    try:
        model = WSDChatModel(max_tokens=6)
        assert model.profile["max_input_tokens"] == 255
        log = "The quick brown fox jumps over the lazy dog. Water boils at 100 degrees. " * 24
        history = [HumanMessage(log), AIMessage("Noted."), HumanMessage(log), AIMessage("Noted."), HumanMessage(QUESTION)]
        assert model.get_num_tokens_from_messages(history[:4]) > 2 * 256
        errors = Events()
        summarize = SummarizationMiddleware(
            model=model, trigger=("messages", 4), keep=("messages", 1), trim_tokens_to_summarize=None, summary_prompt="Summarize:\n{messages}"
        )
        out = create_agent(model, middleware=[summarize]).invoke({"messages": history}, config={"callbacks": [errors]})
        assert errors.events.count("WSDContextOverflowError") == 1  # the first summary call, and no other call
        summary, question, answer = out["messages"]
        assert summary.text.startswith("Here is a summary of the conversation to date:")
        assert question.text == QUESTION and isinstance(answer, AIMessage) and answer.text
    finally:
        runtime.close()
