"""Adapter overhead: WSDChatModel.stream and WSDLLM.stream_chat against the runtime's own stream,
same prompts, greedy, interleaved so load drifts hit all three alike. Then a forced tool call
through each adapter's stream: when its first piece shows (the call streams as it is written)
against when the last chunk comes, and the whole against the runtime's own stream with the tool.

    python benchmarks/bench_adapters.py [--max-tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator

from common import median, write
from langchain_core.messages import HumanMessage
from langchain_wsd import WSDChatModel
from llama_index.core.llms import ChatMessage
from llama_index.llms.wsd import WSDLLM

import wsd_llms

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]},
    },
}
CALL_PROMPTS = ["What's the weather in Paris, in celsius?", "Weather in Tokyo in fahrenheit please.", "Is it raining in Lima? Use celsius."]

PROMPTS = [
    "What is the capital of France?",
    "List five fruits that are red.",
    "Write a Python function that reverses a string.",
    "Give me three tips for a job interview.",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runtime = wsd_llms.get_runtime()
    chat = WSDChatModel(max_tokens=args.max_tokens)
    llm = WSDLLM(max_tokens=args.max_tokens)
    runtime.generate([{"role": "user", "content": "Hi"}], max_tokens=4)  # load and warm up

    paths = {
        "runtime.stream": lambda p: "".join(e.text for e in runtime.stream([{"role": "user", "content": p}], max_tokens=args.max_tokens) if e.type == "text"),
        "WSDChatModel.stream": lambda p: "".join(c.text for c in chat.stream([HumanMessage(p)])),
        "WSDLLM.stream_chat": lambda p: [r.delta for r in llm.stream_chat([ChatMessage(role="user", content=p)])][-1] is not None,
    }
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.repeats):
        for prompt in PROMPTS:
            for name, run in paths.items():
                t0 = time.perf_counter()
                run(prompt)
                times[name].append(time.perf_counter() - t0)
    base = median(times["runtime.stream"])
    rows = ["| path | median total (s) | vs runtime |", "|---|---|---|"]
    for name, ts in times.items():
        rows.append(f"| {name} | {median(ts):.3f} | {median(ts) / base:.3f}x |")
    rows += ["", f"{len(PROMPTS)} prompts x {args.repeats} repeats, greedy, max_tokens={args.max_tokens}."]
    calls = _tool_calls(runtime, args.max_tokens, args.repeats)
    rows += ["", "A forced tool call, streamed (seconds, median):", "", "| path | first call piece | last chunk | vs runtime |", "|---|---|---|---|"]
    whole = median(calls["runtime.stream"]["last"])
    for name, t in calls.items():
        first = f"{median(t['first']):.3f}" if t["first"] else "-"
        rows.append(f"| {name} | {first} | {median(t['last']):.3f} | {median(t['last']) / whole:.3f}x |")
    rows += ["", f"{len(CALL_PROMPTS)} prompts x {args.repeats} repeats, tool_choice=required, max_tokens={args.max_tokens}."]
    ratio = {k: median(v) / base for k, v in times.items()}
    write("adapters", {"max_tokens": args.max_tokens, "seconds": times, "ratio": ratio, "tool_call": calls}, "\n".join(rows))


def _tool_calls(runtime: wsd_llms.WSDRuntime, max_tokens: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds to each path's first piece of the call (none for the runtime, whose stream is the
    call's text) and to its last event, per prompt and repeat, interleaved."""
    chat = WSDChatModel(max_tokens=max_tokens).bind_tools([WEATHER], tool_choice="required")
    llm = WSDLLM(max_tokens=max_tokens)
    tools = [WEATHER]
    paths: dict[str, Callable[[str], Iterator[bool]]] = {  # each event: whether it shows a piece of the call
        "runtime.stream": lambda p: (False for _ in runtime.stream([{"role": "user", "content": p}], max_tokens=max_tokens, tools=tools, tool_choice="required")),
        "WSDChatModel.stream": lambda p: (bool(c.tool_call_chunks) for c in chat.stream([HumanMessage(p)])),
        "WSDLLM.stream_chat": lambda p: (
            bool(r.message.additional_kwargs.get("tool_calls"))
            for r in llm.stream_chat([ChatMessage(role="user", content=p)], tools=tools, tool_choice="required")
        ),
    }
    out: dict[str, dict[str, list[float]]] = {k: {"first": [], "last": []} for k in paths}
    for _ in range(repeats):
        for prompt in CALL_PROMPTS:
            for name, events in paths.items():
                t0, first = time.perf_counter(), None
                for shows_call in events(prompt):
                    if shows_call and first is None:
                        first = time.perf_counter() - t0
                out[name]["last"].append(time.perf_counter() - t0)
                if first is not None:
                    out[name]["first"].append(first)
    return out


if __name__ == "__main__":
    main()
