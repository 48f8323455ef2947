"""WSDLLM tools and structured output: ToolSelections, history, stream/non-stream agreement, constrained JSON."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import llama_index.core.instrumentation as instrument
import pytest
from llama_index.core.base.llms.types import ChatMessage, ToolCallBlock
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.span_handlers import SimpleSpanHandler
from llama_index.core.prompts import ChatPromptTemplate, PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field

from llama_index.llms.wsd import WSDLLM
from wsd_llms.errors import InvalidParameterError
from wsd_llms.events import FinalEvent, TextDelta, Timings, Usage, WSDResult
from wsd_llms.loading import EMBEDDED_BASE, EMBEDDED_DRAFT, local_source
from wsd_llms.messages import ToolCall
from wsd_llms.params import parse_params
from wsd_llms.tools import InvalidToolCall


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


TOOLS = [FunctionTool.from_defaults(add), FunctionTool.from_defaults(multiply)]
ASK = "What is 3 plus 4?"


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)


PROMPT = PromptTemplate("Name a famous city in {place}.")


def calls(llm: WSDLLM, response: Any) -> list[tuple[str, dict]]:
    return [(c.tool_name, c.tool_kwargs) for c in llm.get_tool_calls_from_response(response)]


@pytest.fixture(scope="module")
def llm(embedded: wsd_llms.WSDRuntime) -> WSDLLM:
    return WSDLLM(max_tokens=48)


@pytest.mark.embedded
@pytest.mark.parametrize("how", [{"tool_required": True}, {"tool_choice": "multiply"}])
async def test_forced_calls_parse_and_stream_agrees(llm: WSDLLM, how: dict) -> None:
    response = llm.chat_with_tools(TOOLS, user_msg=ASK, **how)
    selected = calls(llm, response)
    assert len(selected) == 1 and "<tool_call>" not in response.message.content
    name, kwargs = selected[0]
    assert name == how.get("tool_choice", name) and set(kwargs) == {"a", "b"}
    assert all(isinstance(v, int) for v in kwargs.values())
    if "tool_choice" in how:  # the async and streaming paths once, with tool_required
        return
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg=ASK, **how))
    achunks = [c async for c in await llm.astream_chat_with_tools(TOOLS, user_msg=ASK, **how)]
    for stream in (chunks, achunks):
        assert all("<tool_call" not in (c.message.content or "") for c in stream)
        assert stream[-1].message.content == response.message.content
        assert calls(llm, stream[-1]) == selected


@pytest.mark.embedded
async def test_an_agent_s_structured_answer_ends_its_integers(embedded: wsd_llms.WSDRuntime) -> None:
    """FunctionAgent(output_cls=...) asks for its answer over the conversation, in XML: the embedded
    pair wrote the int field as "1000000..." until max_tokens ran out, and the agent's answer was None
    (with a warning). An integer is held to 64 bits, so the number ends and the answer parses."""
    from llama_index.core.agent.utils import generate_structured_response

    class Weather(BaseModel):
        city: str
        temperature_c: int

    conversation = [
        ChatMessage(role="user", content="What's the weather in Paris?"),
        ChatMessage(role="assistant", content="The weather in Paris is quite unique, with a mix of sunny and rainy days."),
    ]
    answer = await generate_structured_response(conversation, WSDLLM(max_tokens=200), Weather)
    assert Weather.model_validate(answer).city == "Paris" and abs(answer["temperature_c"]) < 2**63


@pytest.mark.embedded
async def test_tool_result_history_runs(llm: WSDLLM) -> None:
    first = llm.chat_with_tools(TOOLS, user_msg=ASK, tool_required=True)
    call = llm.get_tool_calls_from_response(first)[0]
    result = ChatMessage(role="tool", content=str(add(**call.tool_kwargs)), additional_kwargs={"tool_call_id": call.tool_id})
    history = [ChatMessage(role="user", content=ASK), first.message, result]
    final = await llm.achat_with_tools(TOOLS, chat_history=history, tool_choice="none")
    assert final.message.content.strip()
    assert llm.get_tool_calls_from_response(final, error_on_no_tool_call=False) == []


@pytest.mark.embedded
async def test_structured_predict_family_validates(llm: WSDLLM) -> None:
    city = llm.structured_predict(City, PROMPT, place="Europe")
    assert isinstance(city, City)
    assert await llm.astructured_predict(City, PROMPT, place="Europe") == city
    streamed = list(llm.stream_structured_predict(City, PROMPT, place="Europe"))
    assert len(streamed) > 1 and streamed[-1] == city
    astreamed = [x async for x in await llm.astream_structured_predict(City, PROMPT, place="Europe")]
    assert astreamed[-1] == city
    reply = llm.as_structured_llm(City).chat([ChatMessage(role="user", content="Name a famous city in Europe.")])
    assert City.model_validate_json(reply.message.content) and isinstance(reply.raw, City)


class Scripted:
    """Stands in for the runtime's streams: streams `text` and ends with `result`, then the `later`
    (text, result) pairs on the calls after it, the last one again; records the messages."""

    def __init__(self, text: str, result: WSDResult, later: Sequence[tuple[str, WSDResult]] = ()) -> None:
        self.replies, self.messages, self.params = [(text, result), *later], [], []

    def stream(self, messages: list[dict[str, Any]], **params: Any) -> Iterator[Any]:
        text, result = self.replies[min(len(self.messages), len(self.replies) - 1)]
        self.messages.append(messages)
        self.params.append(params)
        yield from (TextDelta(ch, "draft") for ch in text)
        yield FinalEvent(result)

    async def astream(self, messages: list[dict[str, Any]], **params: Any) -> AsyncIterator[Any]:
        for event in self.stream(messages, **params):
            yield event


def reply(text: str, **result: Any) -> WSDResult:
    return WSDResult(text, "stop", None, text, Usage(), Timings(), "d", "b", "online", **result)


def scripted(monkeypatch: pytest.MonkeyPatch, text: str, later: Sequence[tuple[str, WSDResult]] = (), **result: Any) -> tuple[WSDLLM, Scripted]:
    llm = WSDLLM(draft_model=str(local_source(EMBEDDED_DRAFT)), base_model=str(local_source(EMBEDDED_BASE)))  # configs only: never loaded
    script = Scripted(text, reply(text, **result), later)
    monkeypatch.setattr(llm.wsd_runtime(), "stream", script.stream)
    monkeypatch.setattr(llm.wsd_runtime(), "astream", script.astream)
    return llm, script


def test_parallel_calls_become_tool_selections(monkeypatch: pytest.MonkeyPatch) -> None:
    text = '<tool_call>\n{"name": "add", ...}\n</tool_call>\n<tool_call>\n{"name": "multiply", ...}\n</tool_call>'
    made = (ToolCall("c1", "add", {"a": 3, "b": 4}), ToolCall("c2", "multiply", {"a": 5, "b": 6}))
    llm, _ = scripted(monkeypatch, text, content="", tool_calls=made)
    response = llm.chat_with_tools(TOOLS, user_msg="3+4 and 5*6?", allow_parallel_tool_calls=True)
    assert [(c.tool_id, c.tool_name, c.tool_kwargs) for c in llm.get_tool_calls_from_response(response)] == [
        ("c1", "add", {"a": 3, "b": 4}),
        ("c2", "multiply", {"a": 5, "b": 6}),
    ]
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg="3+4 and 5*6?", allow_parallel_tool_calls=True))
    assert [c.message.content for c in chunks] == [""] and calls(llm, chunks[-1]) == calls(llm, response)
    assert response.raw["finish_reason"] == chunks[-1].raw["finish_reason"] == "tool_calls"  # as OpenAI's


def test_a_tool_keeps_its_own_name_in_any_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    """LlamaIndex's OpenAI spec renames "add.v2" to "add_v2"; the runtime takes any name, so the
    model calls the tool as it is named, predict_and_call finds it (a KeyError, 'add_v2', before),
    and tool_choice may name it."""
    renamed = [FunctionTool.from_defaults(add, name="add.v2"), FunctionTool.from_defaults(multiply, name="mal nehmen")]
    text = '<tool_call>\n{"name": "add.v2", ...}\n</tool_call>'
    llm, script = scripted(monkeypatch, text, content="", tool_calls=(ToolCall("c1", "add.v2", {"a": 3, "b": 4}),))
    assert llm.predict_and_call(renamed, user_msg="3+4?").response == "7"
    llm.chat_with_tools(renamed, user_msg="3+4?", tool_choice="add.v2")
    assert [t["function"]["name"] for t in script.params[-1]["tools"]] == ["add.v2", "mal nehmen"]
    assert script.params[-1]["tool_choice"] == "add.v2"
    parse_params(tools=script.params[-1]["tools"], tool_choice=script.params[-1]["tool_choice"])  # the runtime's check takes them


def test_text_before_a_call_streams_without_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {\n"a": 1, "b": 2\n}}\n</tool_call>'  # spaced as the grammar may
    llm, _ = scripted(monkeypatch, text, content="Let me add.", tool_calls=(ToolCall("c1", "add", {"a": 1, "b": 2}),))
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg="1+2?"))
    assert "".join(c.delta for c in chunks) == chunks[-1].message.content == "Let me add."  # the newline before the call is held back
    assert all("<" not in (c.message.content or "") for c in chunks) and calls(llm, chunks[-1]) == [("add", {"a": 1, "b": 2})]


def test_a_call_streams_as_it_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """As OpenAI's calls stream in LlamaIndex: each response carries the calls begun so far, their
    arguments parsed as far as they are written, under one id from the first response to the last."""
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {\n"a": 1, "b": 2\n}}\n</tool_call>'  # spaced as the grammar may
    llm, _ = scripted(monkeypatch, text, content="Let me add.", tool_calls=(ToolCall("c1", "add", {"a": 1, "b": 2}),))
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg="1+2?"))
    seen = [llm.get_tool_calls_from_response(c, error_on_no_tool_call=False) for c in chunks]
    during = [s[0] for s in seen[:-1] if s]
    assert during and {c.tool_id for c in during} == {seen[-1][0].tool_id} and seen[-1][0].tool_id.startswith("call_")
    assert [c.tool_kwargs for c in during][:1] == [{}] and {"a": 1} in [c.tool_kwargs for c in during]
    assert (seen[-1][0].tool_name, seen[-1][0].tool_kwargs) == ("add", {"a": 1, "b": 2})
    listed = [c.message.additional_kwargs["tool_calls"][0]["function"]["arguments"] for c in chunks if c.message.additional_kwargs.get("tool_calls")]
    assert all(b.startswith(a) for a, b in zip(listed, listed[1:])) and listed[-1] == '{\n"a": 1, "b": 2\n}'  # the final too, as written
    assert chunks[-1].message.content == "Let me add." and all("<" not in (c.message.content or "") for c in chunks)


def test_a_streaming_program_builds_partial_objects_from_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """FunctionCallingProgram.stream_call reads the call as it is written (it had given empty objects
    until the end)."""
    from llama_index.core.program import FunctionCallingProgram

    class Sum(BaseModel):
        a: int
        b: int

    text = '<tool_call>\n{"name": "Sum", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    llm, _ = scripted(monkeypatch, text, content="", tool_calls=(ToolCall("c1", "Sum", {"a": 1, "b": 2}),))
    program = FunctionCallingProgram.from_defaults(output_cls=Sum, llm=llm, prompt_template_str="Add {x}.")
    objects = list(program.stream_call(x="1 and 2"))
    assert (objects[-1].a, objects[-1].b) == (1, 2)
    assert (1, None) in [(o.a, o.b) for o in objects[:-1]]


def test_a_streamed_call_found_invalid_at_the_end_leaves_the_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that max_tokens cut short shows while written, and the final response lists it as
    invalid under the same id, with no ToolCallBlock."""
    raw = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b'
    bad = InvalidToolCall(raw, "the call is not closed with </tool_call>", "add", "c9")
    llm, _ = scripted(monkeypatch, raw, content="", invalid_tool_calls=(bad,))
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg="1+2?"))
    streamed = llm.get_tool_calls_from_response(chunks[-2], error_on_no_tool_call=False)
    assert [(c.tool_name, c.tool_kwargs) for c in streamed] == [("add", {"a": 1})]  # the unfinished key left out
    agent: dict[str, Any] = {"__name__": "llama_index.core.agent.workflow.an_agent"}  # code of LlamaIndex's that asks, as FunctionAgent does
    exec("def ask(llm, response):\n    return llm.get_tool_calls_from_response(response, error_on_no_tool_call=False)", agent)
    with pytest.warns(RuntimeWarning, match="no valid tool call: its 1 tool call") as warned:
        assert agent["ask"](llm, chunks[-1]) == []
        assert agent["ask"](llm, chunks[-1]) == []  # FunctionAgent asks twice
    assert len(warned) == 1 and warned[0].filename == __file__  # of one reply, once, at the user's line (not LlamaIndex's)
    assert chunks[-1].message.additional_kwargs["invalid_tool_calls"] == [{"raw": raw, "error": bad.error, "name": "add", "id": streamed[0].tool_id}]


def test_every_chunk_says_which_model_wrote_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last chunk too: with tools bound it may carry text held back in case it began a call."""
    llm, _ = scripted(monkeypatch, "Use a <tool", content="Use a <tool")
    chunks = list(llm.stream_chat_with_tools(TOOLS, user_msg=ASK))
    assert chunks[-1].delta == " <tool" and [c.additional_kwargs["wsd_source"] for c in chunks] == ["draft"] * len(chunks)


def test_function_mode_streams_structured_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic_program_mode="function" (LlamaIndex's FunctionCallingProgram) reads streamed calls from
    additional_kwargs["tool_calls"], as other integrations give them (it streamed an empty object)."""
    oslo = {"name": "Oslo", "country": "Norway"}
    llm, _ = scripted(monkeypatch, "<tool_call>...</tool_call>", content="", tool_calls=(ToolCall("c1", "City", oslo),))
    llm.pydantic_program_mode = "function"
    assert llm.structured_predict(City, PROMPT, place="Norway") == City(**oslo)
    assert list(llm.stream_structured_predict(City, PROMPT, place="Norway"))[-1] == City(**oslo)


@pytest.fixture
def spans() -> Iterator[SimpleSpanHandler]:
    """Records the instrumentation spans that end while a test runs."""
    handler = SimpleSpanHandler()
    instrument.get_dispatcher().add_span_handler(handler)
    yield handler
    instrument.get_dispatcher().span_handlers.remove(handler)


def span_names(spans: SimpleSpanHandler, part: str) -> list[str]:
    """The names ("WSDLLM.chat", ...) of the ended spans whose name holds `part`, in the order they ended."""
    return [name for span in spans.completed_spans if part in (name := span.id_.split("-")[0])]


def test_without_the_structured_extra_structured_calls_parse_text(monkeypatch: pytest.MonkeyPatch, spans: SimpleSpanHandler) -> None:
    """Without xgrammar (the structured extra), is_function_calling_model is False and structured
    calls run LlamaIndex's text-completion program, as for any LLM that cannot constrain its output."""
    from llama_index.llms.wsd import base

    monkeypatch.setattr(base, "can_constrain", lambda: False)
    llm, script = scripted(monkeypatch, '{"name": "Oslo", "country": "Norway"}')
    assert not llm.metadata.is_function_calling_model
    assert llm.structured_predict(City, PROMPT, place="Norway") == City(name="Oslo", country="Norway")
    assert script.params[-1].get("response_format") is None
    assert span_names(spans, "structured_predict") == ["WSDLLM.structured_predict"]  # one span, not two nested


def test_invalid_calls_are_reported_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = InvalidToolCall('<tool_call>\n{"name":', "the call is not closed", None, "c9")
    llm, _ = scripted(monkeypatch, bad.raw, content="", invalid_tool_calls=(bad,))
    response = llm.chat_with_tools(TOOLS, user_msg=ASK, tool_required=True)
    assert response.message.additional_kwargs["invalid_tool_calls"] == [
        {"raw": bad.raw, "error": bad.error, "name": None, "id": "c9"}
    ]
    # FunctionAgent asks without error_on_no_tool_call and takes the reply as its answer: a warning says why it is empty
    with pytest.warns(RuntimeWarning, match="no valid tool call: its 1 tool call.* invalid.*not closed"):
        assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="1 tool call.* invalid.*not closed"):
        llm.get_tool_calls_from_response(response)
    # a result for it answers the call's text by place (it names no call the runtime is given: no warning)
    from llama_index.llms.wsd.base import to_runtime_messages
    from wsd_llms.messages import normalize_messages, results_naming_no_call

    result = ChatMessage(role="tool", content="Error: the call is not closed", additional_kwargs={"tool_call_id": "c9"})
    sent = to_runtime_messages([ChatMessage(role="user", content=ASK), response.message, result])
    assert sent[1]["content"] == bad.raw and sent[2] == {"role": "tool", "content": "Error: the call is not closed"}
    assert results_naming_no_call(normalize_messages(sent)) == []
    later = to_runtime_messages([ChatMessage(role="user", content=ASK), response.message, ChatMessage(role="user", content="And now?"), result])
    assert later[3]["tool_call_id"] == "c9"  # after a user turn it answers no call shown before: warned of


def test_something_that_is_not_a_tool_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare function among the tools is an InvalidParameterError naming it and the wrapper (it was an
    AttributeError on .metadata, then a TypeError while chat(tools=...) gave InvalidParameterError)."""
    llm, _ = scripted(monkeypatch, "7.")

    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(InvalidParameterError, match=r"^tools\[1\] is <function .*add.*not a LlamaIndex tool.*FunctionTool.from_defaults"):
        llm.chat_with_tools([TOOLS[0], add], user_msg=ASK)


async def test_a_call_s_tools_may_be_llamaindex_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """chat(tools=[FunctionTool]) was refused ("tools[0] must be a dict, got FunctionTool") though the
    constructor and chat_with_tools take them: a call's tools are converted as theirs are, in every
    chat and completion method; anything else is refused with LlamaIndex's reason, as the
    constructor's is (it was the runtime's "tools[1] must be a dict, got function")."""
    from wsd_llms.tools import normalize_tools

    llm, script = scripted(monkeypatch, "7.")
    specs = llm._prepare_chat_with_tools(TOOLS, user_msg=ASK)["tools"]
    assert llm._prepare_chat_with_tools(specs, user_msg=ASK)["tools"] == specs  # OpenAI-style dicts, as chat(tools=...) takes them
    llm.chat([ChatMessage(role="user", content=ASK)], tools=TOOLS)
    await llm.acomplete(ASK, tools=TOOLS[:1])
    assert [normalize_tools(params["tools"]) for params in script.params] == [normalize_tools(specs), normalize_tools(specs[:1])]

    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(InvalidParameterError, match=r"^tools\[1\] is <function .*add.*not a LlamaIndex tool.*FunctionTool.from_defaults"):
        llm.chat([ChatMessage(role="user", content=ASK)], tools=[TOOLS[0], add])
    with pytest.raises(InvalidParameterError, match=r"^tools\[1\] is <function .*add.*not a LlamaIndex tool"):
        await llm.achat([ChatMessage(role="user", content=ASK)], tools=[TOOLS[0], add])


def test_history_with_calls_and_results_reaches_the_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    llm, script = scripted(monkeypatch, "7.")
    history = [
        ChatMessage(role="user", content=ASK),
        ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id="c1", tool_name="add", tool_kwargs={"a": 3, "b": 4})]),
        ChatMessage(role="tool", content="7", additional_kwargs={"tool_call_id": "c1"}),
        ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [{"id": "c2", "function": {"name": "add", "arguments": "{}"}}]}),
    ]
    llm.chat(history[:3])
    assert script.messages[-1][1:] == [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "add", "arguments": {"a": 3, "b": 4}}]},
        {"role": "tool", "content": "7", "tool_call_id": "c1"},
    ]
    llm.chat([*history, ChatMessage(role="user", content="Again?")])
    assert script.messages[-1][3]["tool_calls"] == [{"id": "c2", "function": {"name": "add", "arguments": "{}"}}]


def test_one_call_not_in_a_list_is_refused_as_such() -> None:
    """additional_kwargs["tool_calls"] holding one call as a dict was taken for its keys, and
    refused as "tool_calls[0] must be a dict, got str" though a dict was given."""
    import wsd_llms
    from llama_index.llms.wsd.base import to_runtime_messages
    from wsd_llms.messages import normalize_messages

    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    history = [ChatMessage(role="user", content=ASK), ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": call})]
    with pytest.raises(wsd_llms.InvalidMessagesError, match=r"messages\[1\].tool_calls must be a list, got dict"):
        normalize_messages(to_runtime_messages(history))


async def test_function_agent_after_a_failing_return_direct_tool_writes_a_new_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """FunctionAgent leaves an assistant copy of a failed return_direct tool's output last; that is
    a finished turn (a chat API's model writes the next one), not a start for the reply to continue."""
    from llama_index.core.agent.workflow import FunctionAgent

    def lookup(city: str) -> str:
        """Look up the population of a city."""
        raise ValueError("the database is busy")

    call = '<tool_call>\n{"name": "lookup", "arguments": {"city": "Paris"}}\n</tool_call>'
    llm, script = scripted(monkeypatch, call, [("I could not look it up.", reply("I could not look it up."))],
                           content="", tool_calls=(ToolCall("c1", "lookup", {"city": "Paris"}),))
    tool = FunctionTool.from_defaults(lookup, return_direct=True)
    agent = FunctionAgent(tools=[tool], llm=llm, allow_parallel_tool_calls=False)
    answer = await agent.run(user_msg="How many people live in Paris?")
    assert str(answer) == "I could not look it up."
    called, last = script.messages[1][-2:]
    assert [c["name"] for c in called["tool_calls"]] == ["lookup"]  # under the id it streamed with
    assert last["role"] == "tool" and last["tool_call_id"] == called["tool_calls"][0]["id"] and "the database is busy" in last["content"]
    # Not a tool's copy (no matching result before it): a trailing assistant message is still the reply's start.
    llm.chat([ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Hello", additional_kwargs={"tool_call_id": "c1"})])
    assert script.messages[-1][-1] == {"role": "assistant", "content": "Hello"}


def test_a_trailing_assistant_message_is_a_finished_turn_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """As LlamaIndex's OpenAI and HuggingFaceLLM read it, a chat that ends with an assistant message
    asks for the next turn; continue_final_message=True (a call's or the constructor's) makes it the reply's start."""
    llm, script = scripted(monkeypatch, "More.")
    history = [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Hello")]
    llm.chat(history)
    llm.chat(history, continue_final_message=True)
    llm.continue_final_message = True
    llm.complete("Hi")
    assert [params["continue_final_message"] for params in script.params] == [False, True, True]


class _Collect(BaseEventHandler):
    """Records LlamaIndex instrumentation events by class name."""

    names: list[str] = []

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.names.append(type(event).__name__)


@pytest.fixture
def events() -> Iterator[list[str]]:
    handler = _Collect(names=[])
    root = instrument.get_dispatcher()
    root.add_event_handler(handler)
    yield handler.names
    root.event_handlers.remove(handler)


async def test_structured_predict_fires_llamaindex_events(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
    llm, script = scripted(monkeypatch, '{"name": "Oslo", "country": "Norway"}')
    llm.stop = ["\n", "Observation:"]  # a ReAct agent's, say: the grammar ends the JSON, so these must not cut it
    started, ended = "LLMStructuredPredictStartEvent", "LLMStructuredPredictEndEvent"
    assert llm.structured_predict(City, PROMPT, place="Europe") == City(name="Oslo", country="Norway")
    assert script.params[-1]["stop"] == []
    assert events.count(started) == events.count(ended) == 1
    assert await llm.astructured_predict(City, PROMPT, place="Europe")
    assert events.count(started) == events.count(ended) == 2
    events.clear()
    streamed = list(llm.stream_structured_predict(City, PROMPT, place="Europe"))
    structured = [e for e in events if e.startswith("LLMStructuredPredict")]
    assert structured == [started] + ["LLMStructuredPredictInProgressEvent"] * len(streamed) + [ended]
    events.clear()
    astreamed = [x async for x in await llm.astream_structured_predict(City, PROMPT, place="Europe")]
    structured = [e for e in events if e.startswith("LLMStructuredPredict")]
    assert structured == [started] + ["LLMStructuredPredictInProgressEvent"] * len(astreamed) + [ended]
    # as LlamaIndex's own, a stream that is made but never read starts nothing: no request, no event
    events.clear()
    calls_before = len(script.messages)
    made, amade = llm.stream_structured_predict(City, PROMPT, place="Europe"), await llm.astream_structured_predict(City, PROMPT, place="Europe")
    assert not [e for e in events if e.startswith(("LLMStructuredPredictStart", "LLMChatStart"))] and len(script.messages) == calls_before
    made.close()
    await amade.aclose()
    llm.structured_predict(City, PROMPT, llm_kwargs={"stop": ["}"]}, place="Europe")
    assert script.params[-1]["stop"] == ["}"]  # a structured call's own stop still counts
    llm.structured_predict(City, PROMPT, llm_kwargs={"stop": None}, place="Europe")
    llm.chat([ChatMessage(role="user", content="A city.")], response_format=City)
    assert script.params[-2]["stop"] == script.params[-1]["stop"] == []
    # the tool path's arguments, which FunctionCallingProgram drops (code written for OpenAI passes them)
    tool_path = {"tool_required": True, "tool_choice": "required", "allow_parallel_tool_calls": True}
    assert llm.structured_predict(City, PROMPT, llm_kwargs=tool_path, place="Europe") == City(name="Oslo", country="Norway")
    assert script.params[-1] == script.params[-3]


async def test_a_streamed_object_cut_short_fails_the_object_not_the_chat(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
    """A structured stream whose JSON max_tokens cut short raises ReplyCutShortError at its end, as
    structured_predict does; the chat under it still ends as a chat does (its end event with the
    response and usage, for tracing and token counting), not with an exception event."""
    from dataclasses import replace

    from wsd_llms import ReplyCutShortError

    text = '{"name": "Os'
    llm, script = scripted(monkeypatch, text)
    script.replies = [(text, replace(reply(text), finish_reason="length", parse_error="the reply used up max_tokens=4 before its JSON was complete"))]
    with pytest.raises(ReplyCutShortError, match="^City: the reply used up max_tokens=4"):
        list(llm.stream_structured_predict(City, PROMPT, place="Europe"))
    with pytest.raises(ReplyCutShortError, match="^City: the reply used up max_tokens=4"):
        [x async for x in await llm.astream_structured_predict(City, PROMPT, place="Europe")]
    assert "ExceptionEvent" not in events and events.count("LLMChatEndEvent") == 2
    assert events.index("LLMChatEndEvent") > events.index("LLMChatInProgressEvent")


async def test_a_key_written_twice_fails_the_object(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic keeps a repeated key's last value without a word: the runtime's parse_error for it
    fails structured_predict and a structured stream (at its end) with InvalidReplyError, a ValueError."""
    from wsd_llms import InvalidReplyError
    from wsd_llms.structured import parse_json

    class Tally(BaseModel):
        counts: dict[str, int]

    text = '{"counts": {"a": 1, "b": 2, "a": 3}}'
    llm, _ = scripted(monkeypatch, text, parse_error=parse_json(text, Tally.model_json_schema())[1])
    needle = "^Tally: the key 'a' is written more than once in one object"
    with pytest.raises(InvalidReplyError, match=needle):
        llm.structured_predict(Tally, PROMPT, place="Europe")
    with pytest.raises(InvalidReplyError, match=needle):
        await llm.astructured_predict(Tally, PROMPT, place="Europe")
    with pytest.raises(InvalidReplyError, match=needle):
        list(llm.stream_structured_predict(Tally, PROMPT, place="Europe"))
    assert issubclass(InvalidReplyError, ValueError)
    once = '{"counts": {"a": 1}}'
    llm, _ = scripted(monkeypatch, once, parse_error="a keyword pydantic judges")
    assert llm.structured_predict(Tally, PROMPT, place="Europe") == Tally(counts={"a": 1})


def test_constructor_tool_choice_and_parallel_calls_are_the_defaults():
    """An agent cannot pass tool_choice per call: the constructor's setting holds unless the call
    gives one (or tool_required)."""
    llm = WSDLLM(tool_choice="required", parallel_tool_calls=True)
    prepared = llm._prepare_chat_with_tools(TOOLS, user_msg=ASK)
    assert (prepared["tool_choice"], prepared["parallel_tool_calls"]) == ("required", True)
    assert llm._prepare_chat_with_tools(TOOLS, user_msg=ASK, tool_choice="add")["tool_choice"] == "add"
    plain = WSDLLM()._prepare_chat_with_tools(TOOLS, user_msg=ASK, tool_required=True)
    assert (plain["tool_choice"], plain["parallel_tool_calls"]) == ("required", False)
    assert WSDLLM()._prepare_chat_with_tools(TOOLS, user_msg=ASK)["tool_choice"] == "auto"
    # OpenAI's strict: calls are always decoded under their schemas
    assert WSDLLM()._prepare_chat_with_tools(TOOLS, user_msg=ASK, strict=True) == WSDLLM()._prepare_chat_with_tools(TOOLS, user_msg=ASK)


@pytest.mark.parametrize("flag", ["allow_parallel_tool_calls", "tool_required"])
def test_the_tool_flags_must_be_bools(flag):
    """As the runtime's own flags: "yes" was read as True (tool_required forced a call), or named
    as parallel_tool_calls, a parameter the caller never passed."""
    import wsd_llms

    with pytest.raises(wsd_llms.InvalidParameterError, match=f"invalid {flag}='yes': must be a bool"):
        WSDLLM()._prepare_chat_with_tools(TOOLS, user_msg=ASK, **{flag: "yes"})


def test_constructor_tools_are_llamaindex_tools() -> None:
    """Tools given to the constructor are LlamaIndex tools, as chat_with_tools takes them (a
    FunctionTool was refused as "tools[0] must be a dict"); anything else is a ValidationError naming it."""
    from pydantic import ValidationError

    from wsd_llms.tools import normalize_tools

    llm = WSDLLM(tools=TOOLS, tool_choice=TOOLS[0].metadata.name)
    assert llm.tools == normalize_tools(llm._prepare_chat_with_tools(TOOLS, user_msg=ASK)["tools"])

    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(ValidationError, match=r"tools\[1\] is <function .*add.*not a LlamaIndex tool.*FunctionTool.from_defaults"):
        WSDLLM(tools=[TOOLS[0], add])


async def test_predict_and_call_decodes_the_calls_it_can_run(monkeypatch: pytest.MonkeyPatch, spans: SimpleSpanHandler) -> None:
    """predict_and_call runs one call unless its own allow_parallel_tool_calls says more (its
    single-call branch raises 'Invalid' on two): the runtime decodes that many, whatever the
    constructor's parallel_tool_calls. A reply without a call gives its text."""
    text = '<tool_call>\n{"name": "add", ...}\n</tool_call>'
    llm, script = scripted(monkeypatch, text, content="", tool_calls=(ToolCall("c1", "add", {"a": 3, "b": 4}),))
    llm.parallel_tool_calls = True
    assert llm.predict_and_call(TOOLS, user_msg="3+4?").response == "7"
    assert (await llm.apredict_and_call(TOOLS, user_msg="3+4?")).response == "7"
    assert llm.predict_and_call(TOOLS, user_msg="3+4?", allow_parallel_tool_calls=True).response == "7"
    assert llm.predict_and_call(TOOLS, "3+4?", None, False, True).response == "7"  # as positional arguments
    assert [params["parallel_tool_calls"] for params in script.params] == [False, False, True, True]
    # each is one span (the override's), not one inside another of the same name
    spans.completed_spans.clear()
    llm.predict_and_call(TOOLS, user_msg="3+4?")
    await llm.apredict_and_call(TOOLS, user_msg="3+4?")
    assert span_names(spans, "predict_and_call") == ["WSDLLM.predict_and_call", "WSDLLM.apredict_and_call"]
    llm, _ = scripted(monkeypatch, "It is seven.")
    llm.parallel_tool_calls = True
    assert llm.predict_and_call(TOOLS, user_msg="3+4?", error_on_no_tool_call=False).response == "It is seven."


def test_structured_reply_cut_by_max_tokens_says_so() -> None:
    """A JSON reply that max_tokens cut short gets an error naming max_tokens, not a bare parse error."""
    from llama_index.core.base.llms.types import ChatResponse
    from pydantic import BaseModel

    from llama_index.llms.wsd.base import _validated
    from wsd_llms import ReplyCutShortError

    class City(BaseModel):
        name: str

    from wsd_llms.params import parse_params
    from wsd_llms.structured import Cut, structured_fields

    text, schema = '{"name": "Par', {"type": "json_schema", "json_schema": {"schema": City.model_json_schema()}}
    error = structured_fields(text, parse_params(response_format=schema), Cut("the reply used up max_tokens=8", "raise max_tokens"))["parse_error"]
    raw = {"finish_reason": "length", "parse_error": error, "usage": {"output_tokens": 8}}
    cut = ChatResponse(message=ChatMessage(role="assistant", content=text), raw=raw)
    with pytest.raises(ReplyCutShortError, match=r"^City: the reply used up max_tokens=8 before its JSON was complete \(the reply is not valid JSON: .*\); raise max_tokens$"):
        _validated(City, cut)
    error = structured_fields('{"na', parse_params(response_format=schema), Cut("the stop string 'me' ended the reply", "leave 'me' out of stop"))["parse_error"]
    stopped = ChatResponse(message=ChatMessage(role="assistant", content='{"na'), raw={"finish_reason": "stop", "stop_reason": "me", "parse_error": error})
    with pytest.raises(ReplyCutShortError, match=r"^City: the stop string 'me' ended the reply before its JSON was complete .*; leave 'me' out of stop$"):
        _validated(City, stopped)
    whole = ChatResponse(message=ChatMessage(role="assistant", content='{"name": "Paris"}'), raw={"finish_reason": "stop"})
    assert _validated(City, whole) == City(name="Paris")
    # a raw tab, which xgrammar lets through in a string with maxLength and pydantic's JSON parser refuses
    tab = ChatResponse(message=ChatMessage(role="assistant", content='{"name": "Par\tis"}'), raw={"finish_reason": "stop"})
    assert _validated(City, tab) == City(name="Par\tis")


def test_constructor_takes_what_a_call_takes() -> None:
    """Defaults go through the request parameters' own conversions: tool_choice=None (auto),
    OpenAI-style tools; a pydantic class as response_format is checked as its schema, kept as
    given, and written as its schema (to_dict)."""
    from pydantic import BaseModel

    class City(BaseModel):
        name: str

    schema = {"name": "add", "description": "Add two numbers.", "parameters": {"type": "object", "properties": {}}}
    llm = WSDLLM(response_format=City, tool_choice=None, tools=[{"type": "function", "function": schema}])
    assert llm.response_format is City and llm.to_dict()["response_format"] == City.model_json_schema() and llm.tool_choice == "auto"
    assert llm.tools == (schema,)


async def test_http_extras_in_a_call_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """LlamaIndex's DocumentContextExtractor calls achat(..., extra_headers=...) whatever the LLM; it
    had failed every node with "unknown parameter" (caught and logged by the extractor)."""
    llm, script = scripted(monkeypatch, "Context.")
    response = await llm.achat([ChatMessage(role="user", content="Situate this chunk.")], max_tokens=16, extra_headers={"anthropic-beta": "x"})
    assert response.message.content == "Context." and script.params[-1]["max_tokens"] == 16 and "extra_headers" not in script.params[-1]


def test_a_structured_chat_reads_a_conversation_that_ends_with_an_answer(differ_runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """`as_structured_llm(...).chat` over a conversation that ends with the assistant's answer writes
    the value as a new turn (continue_final_message=False), where the answer as a forced start of
    the JSON reply did not fit the grammar and failed; `llm_kwargs` may still ask to continue it,
    and a plain chat continues it when asked to. Tiny models: the grammar holds the value."""
    from wsd_llms import InvalidParameterError
    from wsd_llms.integration import WSDSettings

    class Verdict(BaseModel):
        correct: bool

    monkeypatch.setattr(WSDSettings, "wsd_runtime", lambda self: differ_runtime)
    llm = WSDLLM(max_tokens=60)
    history = [ChatMessage(role="user", content="Is 2+3 equal to 5?"), ChatMessage(role="assistant", content="Yes, it is.")]
    assert llm.chat(history, continue_final_message=True).message.content.startswith("Yes, it is.")
    assert isinstance(llm.as_structured_llm(Verdict).chat(history).raw, Verdict)
    llm.continue_final_message = True  # the structured calls ask for a new turn whatever the default
    template = ChatPromptTemplate(message_templates=history)
    assert isinstance(llm.structured_predict(Verdict, template), Verdict)
    with pytest.raises(InvalidParameterError, match="does not fit the request's grammar"):
        llm.structured_predict(Verdict, template, llm_kwargs={"continue_final_message": True})


def test_structured_calls_are_the_whole_reply_whatever_the_constructor_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """A structured call leaves out the constructor's tools, and a call that must call a tool
    (FunctionCallingProgram's) its response_format: the program's request was refused (a
    response_format beside a forced call), and tools were offered where the value was asked for."""
    from llama_index.core.program import FunctionCallingProgram

    llm, script = scripted(monkeypatch, '{"name": "Paris", "country": "France"}')
    llm.tools, llm.response_format = (TOOLS[0].metadata.to_openai_tool(),), None
    assert llm.structured_predict(City, PROMPT, place="Europe") == City(name="Paris", country="France")
    assert script.params[-1]["tools"] == () and script.params[-1]["response_format"] is City
    llm, script = scripted(monkeypatch, "", content="", tool_calls=(ToolCall("c1", "City", {"name": "Paris", "country": "France"}),))
    llm.response_format = {"type": "json_object"}
    program = FunctionCallingProgram.from_defaults(output_cls=City, prompt=PROMPT, llm=llm)
    assert program(place="Europe") == City(name="Paris", country="France")
    assert script.params[-1]["response_format"] is None and script.params[-1]["tool_choice"] == "required"
