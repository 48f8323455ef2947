"""Code as the README writes it, for a type checker (tests/test_packaging.py runs mypy on it; it is
never run): the constructors, calls and results a user's mypy or pyright reads from our hints."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from llama_index.core.base.llms.types import ChatResponse, CompletionResponse
from llama_index.core.llms import ChatMessage
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel

import wsd_llms
from langchain_wsd import WSDChatModel
from llama_index.llms.wsd import WSDLLM
from wsd_llms import FinalEvent, RuntimeStats, TextDelta, WSDResult, WSDRuntime


class Joke(BaseModel):
    setup: str
    punchline: str


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def runtime_usage() -> None:
    runtime: WSDRuntime = wsd_llms.get_runtime(device=torch.device("cpu"), dtype=torch.float32, max_running=8)
    WSDRuntime("HuggingFaceTB/SmolLM2-135M-Instruct", Path("./base"), device="cpu", dtype="float32")
    messages = [{"role": "user", "content": "Give me three tips for a job interview."}]
    for event in runtime.stream(messages, max_tokens=200):
        if isinstance(event, TextDelta):
            text: str = event.text
        elif isinstance(event, FinalEvent):
            result: WSDResult = event.result
    result = runtime.generate(messages, temperature=0.7, seed=1)
    switch: int | None = result.switch_point
    stats: RuntimeStats = runtime.stats()
    finished: int = stats.finished + stats.queued
    runtime.configure(max_running=32, prefill_chunk=256)


async def async_runtime_usage(runtime: WSDRuntime) -> None:
    async with contextlib.aclosing(runtime.astream([{"role": "user", "content": "hi"}])) as events:
        async for event in events:
            print(event)
    result: WSDResult = await runtime.agenerate([{"role": "user", "content": "hi"}])


def langchain_usage() -> None:
    llm = WSDChatModel(max_tokens=200)
    WSDChatModel(
        draft_model=Path("./draft"), base_model="google/gemma-3-270m", device=torch.device("cpu"), dtype=torch.float32,
        temperature=0.7, seed=1, mode="online", switch_threshold=0.8, switch_window=6, max_draft_tokens=64,
        timeout=30.0, streaming=True, stop="\n\n", tools=[multiply], tool_choice="auto", response_format=Joke,
    )
    WSDChatModel(api_key="unused", max_retries=2, stream_usage=True)  # taken and dropped, as the README says
    WSDChatModel(tools=[multiply], tool_choice={"type": "function", "function": {"name": "multiply"}})
    reply: AIMessage = llm.invoke("Give me three tips for a job interview.")
    if reply.usage_metadata is not None:
        tokens: int = reply.usage_metadata["input_tokens"]
    for chunk in llm.stream("Why is the sky blue?"):
        piece: AIMessageChunk = chunk
    prompt = ChatPromptTemplate.from_messages([("system", "Answer briefly."), ("human", "{question}")])
    answer: str = (prompt | llm.bind(stop=["\n\n"]) | StrOutputParser()).invoke({"question": "What is a black hole?"})
    for call in llm.bind_tools([multiply, Joke], tool_choice="any").invoke([HumanMessage("3 * 4?")]).tool_calls:
        print(call["name"], call["args"])
    joke: Joke = llm.with_structured_output(Joke).invoke("A joke about cats.")  # an instance of the class
    print(joke.punchline, llm.with_structured_output(Joke, include_raw=True).invoke("Another.")["parsed"])
    count: int = llm.get_num_tokens("hello")
    llm.wsd_runtime().configure(max_running=32)


def llamaindex_usage() -> None:
    llm = WSDLLM(max_tokens=200)
    WSDLLM(
        draft_model=Path("./draft.gguf"), device=torch.device("cpu"), dtype=torch.float32, temperature=0.7, seed=1,
        context_window=2048, parallel_tool_calls=True, continue_final_message=True, stop=["Observation:"],
    )
    response: ChatResponse = llm.chat([ChatMessage(role="user", content="hi")])
    for part in llm.stream_chat([ChatMessage(role="user", content="hi")]):
        delta: str | None = part.delta
    completion: CompletionResponse = llm.complete("hi")
    add = FunctionTool.from_defaults(fn=lambda a, b: a + b, name="add")
    calls = llm.get_tool_calls_from_response(llm.chat_with_tools([add], user_msg="3 + 4?", tool_required=True), error_on_no_tool_call=False)
    window: int = llm.metadata.context_window
