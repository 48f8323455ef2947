"""LlamaIndex agents on WSD: a FunctionAgent and a ReActAgent, each with two tools (add, multiply).

Runs offline on the embedded default models, which are too small to choose tools unaided:

- FunctionAgent: its first turn must call tools (constrained decoding, parallel calls allowed);
  the tools return directly, since the models, left free after a tool result, keep calling tools.
- ReActAgent: each step is held to the ReAct format (`wsd_llms.react_format`): while a tool is
  unused the step must call one of the unused tools, then it must answer. Unaided, both models
  answer at once ("Thought: 3 + 4 = 7") without a tool; free after the calls, they keep calling.

Every call is printed as `[tool] name(kwargs) -> output`, then the answer.

    python examples/llamaindex_agent.py
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

from llama_index.core.agent.workflow import FunctionAgent, ReActAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, ChatResponseAsyncGen
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Workflow

from llama_index.llms.wsd import WSDLLM
from wsd_llms import react_format

QUESTION = "What is 3 plus 4, and what is 5 times 6?"


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


TOOLS = [FunctionTool.from_defaults(add, return_direct=True), FunctionTool.from_defaults(multiply, return_direct=True)]
REACT_TOOLS = [FunctionTool.from_defaults(add), FunctionTool.from_defaults(multiply)]


class ReActStepLLM(WSDLLM):
    """Holds each reply to one ReAct step: a call of a tool not used yet, then, once all are, the answer."""

    tool_specs: list[dict[str, Any]] = []

    def _step_format(self, messages: Sequence[ChatMessage]) -> dict[str, Any]:
        used = {name for m in messages if m.role == "assistant" for name in re.findall(r"^Action: (\S+)", m.content or "", re.M)}
        unused = [t for t in self.tool_specs if t["function"]["name"] not in used]
        return react_format(unused, answer=False) if unused else react_format([], answer=True)

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await super().achat(messages, response_format=self._step_format(messages), **kwargs)

    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return await super().astream_chat(messages, response_format=self._step_format(messages), **kwargs)


async def ask(name: str, agent: Workflow) -> None:
    print(f"[{name}] Q: {QUESTION}")
    handler = agent.run(user_msg=QUESTION)
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            print(f"[tool] {event.tool_name}({event.tool_kwargs}) -> {event.tool_output.content}")
    print(f"[{name}] A: {await handler}\n")


async def main() -> None:
    llm = WSDLLM(max_tokens=96)
    await ask("FunctionAgent", FunctionAgent(tools=TOOLS, llm=llm, initial_tool_choice="required"))
    # ReActAgent reads actions from text, so the model must stop before writing an Observation.
    react_llm = ReActStepLLM(max_tokens=96, stop=["Observation:"], tool_specs=[t.metadata.to_openai_tool() for t in REACT_TOOLS])
    await ask("ReActAgent", ReActAgent(tools=REACT_TOOLS, llm=react_llm))


if __name__ == "__main__":
    asyncio.run(main())
