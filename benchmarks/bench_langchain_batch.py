"""`WSDChatModel.batch` on the serving benchmark's 16 prompts: LangChain's default thread pool
(min(32, CPUs + 4) invokes at a time, what `Runnable.batch` gives without a max_concurrency, and
what WSDChatModel.batch did before it sent every input at once) against WSDChatModel's own batch
(all 16, up to the runtime's max_running), taking turns in one process.

    python benchmarks/bench_langchain_batch.py [--max-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import time

from bench_serving import PROMPTS
from common import median, write
from langchain_wsd import WSDChatModel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    chat = WSDChatModel(max_tokens=args.max_tokens)
    chat.invoke("Hi", max_tokens=4)  # load and warm up
    pool = min(32, (os.cpu_count() or 1) + 4)
    ways = {f"LangChain's pool ({pool} at a time)": {"max_concurrency": pool}, "WSDChatModel.batch": None}
    runs: dict[str, list[tuple[float, int, list[str]]]] = {way: [] for way in ways}
    for r in range(args.rounds):
        for way, config in ways.items():
            t0 = time.perf_counter()
            replies = chat.batch(PROMPTS, config)
            wall = time.perf_counter() - t0
            tokens = sum(m.usage_metadata["output_tokens"] for m in replies)
            runs[way].append((wall, tokens, [m.text for m in replies]))
            print(f"round {r} {way}: {wall:.2f} s, {tokens / wall:.1f} tok/s", flush=True)
    first = next(iter(ways))
    base_wall = median([w for w, _, _ in runs[first]])
    rows = ["| batch of 16 | wall (s) | aggregate tok/s | vs LangChain's pool | replies equal |", "|---|---|---|---|---|"]
    data = {}
    for way, results in runs.items():
        wall = median([w for w, _, _ in results])
        rate = median([t / w for w, t, _ in results])
        equal = all(texts == runs[first][0][2] for _, _, texts in results)
        rows.append(f"| {way} | {wall:.2f} | {rate:.1f} | {base_wall / wall:.2f}x | {'yes' if equal else 'no'} |")
        data[way] = {"wall_s": [w for w, _, _ in results], "tokens": [t for _, t, _ in results], "replies_equal": equal}
    rows += ["", f"Online WSD, greedy, max_tokens={args.max_tokens}; medians of {args.rounds} rounds, the ways taking turns."]
    write("langchain_batch", {"max_tokens": args.max_tokens, "pool": pool, "runs": data}, "\n".join(rows))


if __name__ == "__main__":
    main()
