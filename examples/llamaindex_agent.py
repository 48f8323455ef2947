"""A LlamaIndex FunctionAgent on WSD with two tools (add, multiply).

Runs offline on the embedded default models. Its first turn must call tools (constrained
decoding, parallel calls allowed); the tools return directly, since the tiny embedded models,
left free after a tool result, keep calling tools. Every call is printed as
`[tool] name(kwargs) -> output`, then the answer.

    python examples/llamaindex_agent.py
"""

from __future__ import annotations

import asyncio

from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.tools import FunctionTool
from llama_index.core.workflow import Workflow

from llama_index.llms.wsd import WSDLLM

QUESTION = "What is 3 plus 4, and what is 5 times 6?"


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


TOOLS = [FunctionTool.from_defaults(add, return_direct=True), FunctionTool.from_defaults(multiply, return_direct=True)]


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


if __name__ == "__main__":
    asyncio.run(main())
