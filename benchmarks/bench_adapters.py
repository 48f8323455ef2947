"""Adapter overhead: WSDChatModel.stream and WSDLLM.stream_chat against the runtime's own stream,
same prompts, greedy, interleaved so load drifts hit all three alike.

    python benchmarks/bench_adapters.py [--max-tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

from common import median, write
from langchain_core.messages import HumanMessage
from langchain_wsd import WSDChatModel
from llama_index.core.llms import ChatMessage
from llama_index.llms.wsd import WSDLLM

import wsd_llms

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
    write("adapters", {"max_tokens": args.max_tokens, "seconds": times, "ratio": {k: median(v) / base for k, v in times.items()}}, "\n".join(rows))


if __name__ == "__main__":
    main()
