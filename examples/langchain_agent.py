"""A LangChain agent on WSD: `create_agent` with a calculator and a lookup tool, streamed as messages.

The embedded pair is too small to decide by itself when to call a tool, so a `wrap_model_call`
middleware sets `tool_choice` per turn: a tool must be called while one of the two has not been
used yet; then the model answers the question from the tool results, given as plain text with no
tools bound (shown its own calls, it would imitate them instead of answering).

    python examples/langchain_agent.py "What is the population of Paris in millions, times 3?"
"""

from __future__ import annotations

import argparse
import ast
import operator
from collections.abc import Callable

from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, ModelResponse, wrap_model_call
from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool

from langchain_wsd import WSDChatModel

FACTS = {"paris": "Paris has a population of 2.1 million.", "london": "London has a population of 8.9 million."}
_OPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses, such as "2.1 * 3"."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")

    try:
        return str(round(value(ast.parse(expression, mode="eval").body), 6))
    except (SyntaxError, ValueError, ZeroDivisionError) as exc:
        return f"error: {exc}"


@tool
def lookup(topic: str) -> str:
    """Look up a fact about a city, such as its population."""
    hits = [fact for key, fact in FACTS.items() if key in topic.lower()]
    return " ".join(hits) or f"Nothing known about {topic!r}; known: {', '.join(FACTS)}."


@wrap_model_call
def one_call_per_tool(request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> ModelResponse:
    """Force a tool call until every tool has been used, then let the model answer from the results."""
    results = [m for m in request.messages if isinstance(m, ToolMessage)]
    missing = [t.name for t in request.tools if t.name not in {m.name for m in results}]
    if missing:
        return handler(request.override(tool_choice="any" if len(missing) == len(request.tools) else missing[0]))
    # The answer turn: the question and the tool results as plain text, no tools. Shown its own
    # calls in the history, the small draft would write another call instead of an answer.
    question = next(m for m in request.messages if isinstance(m, HumanMessage)).text
    facts = "\n".join(f"- {m.name}: {m.text}" for m in results)
    prompt = f"{question}\n\nTool results:\n{facts}\n\nAnswer the question in one sentence using these results."
    return handler(request.override(messages=[HumanMessage(prompt)], tools=[], tool_choice=None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="Look up the population of Paris, then multiply it by 3.")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    agent = create_agent(WSDChatModel(max_tokens=args.max_tokens), tools=[calculator, lookup], middleware=[one_call_per_tool])
    print(f"Question: {args.question}")
    answering, turn = False, None
    for message, _ in agent.stream({"messages": [("user", args.question)]}, stream_mode="messages"):
        if isinstance(message, ToolMessage):
            for call in turn.tool_calls if turn is not None else []:  # the turn's calls, whole, before their results
                print(f"Tool call [{call['name']}]: {call['args']}")
            turn = None
            print(f"Tool result [{message.name}]: {message.content}")
        elif isinstance(message, AIMessageChunk):
            turn = message if turn is None else turn + message  # a call streams: its name, then its arguments' JSON in pieces
            if message.text:
                if not answering:
                    print("Answer: ", end="")
                    answering = True
                print(message.text, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
