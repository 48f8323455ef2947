"""A soak under mixed load: many random requests, N at a time, through one runtime, checking each
reply and reporting memory round by round.

Requests mix greedy and sampled decoding, every mode, small and large max_tokens, switch settings,
stop strings, a JSON schema, a tool, forced starts, non-ASCII text, and streams closed after their
first event. Each finished reply must stream exactly its final text, and a greedy online reply must
equal the staged pipeline's (DESIGN 3). After each round: resident memory (with and without
malloc_trim's give-back), live tensors, the prefix cache's tokens (kept across requests by design,
up to its budget; its tensors count as live), and the runtime's counters, which must show nothing
left running or cached.

    python benchmarks/soak.py [--rounds 10] [--per-round 40] [--concurrent 8] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import torch
from common import write

import wsd_llms

QUESTIONS = [
    "List five fruits.",
    "Why is the sky blue?",
    "Write a haiku about autumn.",
    "Describe the water cycle.",
    "Give me a recipe for pancakes.",
    "Translate 'good morning' to French and Spanish.",
    "Write a Python function that reverses a string.",
    "Count from one to twenty.",
    "Écris une phrase en français.",
    "用中文说你好",
    "What is 17*23? Show steps.",
    "Résumé: naïve café, with emojis 🎉🚀 please",
    "Spell 'bananas' letter by letter.",
]
FORCED_STARTS = ["Sure! ", "Here", "1.", "The answer is"]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age"],
}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def request(i: int, max_tokens: int) -> tuple[list[dict], dict[str, Any], bool]:
    """Request number i, drawn from its own seed: (messages, params, whether its stream is closed early)."""
    r = random.Random(i)
    messages = [{"role": "user", "content": r.choice(QUESTIONS)}]
    params: dict[str, Any] = {
        "max_tokens": r.choice([1, 2, 3, 5, 12, max_tokens]),
        "switch_window": r.choice([1, 2, 4, 6, 8]),
        "switch_threshold": r.choice([0.05, 0.3, 0.5, 0.8, 1.0]),
        "mode": r.choice(["online"] * 5 + ["staged", "base", "draft"]),
    }
    kind = r.random()
    if kind < 0.12:
        params["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    elif kind < 0.2:
        params.update(tools=[TOOL], tool_choice=r.choice(["auto", "required"]))
    elif r.random() < 0.2:  # a grammar need not admit a forced start
        messages.append({"role": "assistant", "content": r.choice(FORCED_STARTS)})
    if r.random() < 0.5:
        params.update(temperature=r.choice([0.5, 0.8, 1.0, 1.4]), seed=r.randrange(10**6), top_p=r.choice([1.0, 0.9]), top_k=r.choice([0, 20]))
    if r.random() < 0.25:
        params["max_draft_tokens"] = r.choice([1, 2, 5, 30])
    if r.random() < 0.25:
        params["stop"] = r.sample(["\n", ".", " the", ",", "**", "ana"], r.randint(1, 2))
    return messages, params, r.random() < 0.1


def check(runtime: wsd_llms.WSDRuntime, i: int, max_tokens: int) -> tuple[int, str | None]:
    """Serve request i: (reply tokens, what went wrong or None)."""
    messages, params, close_early = request(i, max_tokens)
    events = runtime.stream(messages, **params)
    if close_early:
        next(events, None)
        events.close()
        return 0, None
    seen = list(events)
    streamed = "".join(e.text for e in seen if isinstance(e, wsd_llms.TextDelta))
    result = seen[-1].result
    if streamed != result.text:
        return 0, f"request {i} {params}: streamed {streamed!r} but the reply is {result.text!r}"
    if params["mode"] == "online" and "temperature" not in params:
        staged = runtime.generate(messages, **{**params, "mode": "staged"})
        if staged.text != result.text:
            return 0, f"request {i} {params}: online {result.text!r} but staged {staged.text!r}"
    return result.usage.reply_tokens, None


def serve(runtime: wsd_llms.WSDRuntime, i: int, max_tokens: int) -> tuple[int, str | None]:
    """check(), with the errors a request may rightly get (a forced start its grammar cannot take) counted as served."""
    try:
        return check(runtime, i, max_tokens)
    except wsd_llms.InvalidParameterError:
        return 0, None
    except Exception as exc:  # noqa: BLE001 - reported, and the soak goes on
        return 0, f"request {i} {request(i, max_tokens)[1]}: {type(exc).__name__}: {exc}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=40)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    runtime = wsd_llms.get_runtime()
    runtime.generate([{"role": "user", "content": "Hi"}], max_tokens=4)  # load and warm up
    process, libc = psutil.Process(), ctypes.CDLL("libc.so.6")
    rounds, problems = [], []
    with ThreadPoolExecutor(args.concurrent) as pool:
        for r in range(args.rounds):
            numbers = range(r * args.per_round, (r + 1) * args.per_round)
            t0 = time.perf_counter()
            outcomes = list(pool.map(lambda i: serve(runtime, i, args.max_tokens), numbers))
            wall = time.perf_counter() - t0
            problems += [p for _, p in outcomes if p]
            deadline = time.monotonic() + 10  # requests closed early leave at the worker's next step
            while runtime.stats().running and time.monotonic() < deadline:
                time.sleep(0.05)
            gc.collect()
            rss = process.memory_info().rss / 2**20
            libc.malloc_trim(0)
            stats = runtime.stats()
            rounds.append({
                "round": r,
                "requests": args.per_round,
                "wall_s": wall,
                "reply_tokens_per_s": sum(t for t, _ in outcomes) / wall,
                "problems": sum(1 for _, p in outcomes if p),
                "rss_mib": rss,
                "rss_after_trim_mib": process.memory_info().rss / 2**20,
                "live_tensors": sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)),
                "running": stats.running,
                "cached_tokens": stats.cached_tokens,
                "reserved_tokens": stats.reserved_tokens,
                "prefix_cache_tokens": stats.prefix_cache["cached_tokens"],  # kept by design, up to its budget: their tensors count as live
                "finished": stats.finished,
                "failed": stats.failed,
                "cancelled": stats.cancelled,
            })
            print({k: round(v, 1) if isinstance(v, float) else v for k, v in rounds[-1].items()}, flush=True)
    for problem in problems:
        print("PROBLEM:", problem)
    rows = [
        "| round | requests | reply tok/s (staged checks not counted) | problems | RSS (MiB) | RSS after malloc_trim (MiB) | live tensors | prefix cache (tokens) | running / cached / reserved after | finished / failed / cancelled (total) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in rounds:
        rows.append(
            f"| {v['round']} | {v['requests']} | {v['reply_tokens_per_s']:.1f} | {v['problems']} | {v['rss_mib']:.0f} | "
            f"{v['rss_after_trim_mib']:.0f} | {v['live_tensors']} | {v['prefix_cache_tokens']} | {v['running']} / {v['cached_tokens']} / {v['reserved_tokens']} | "
            f"{v['finished']} / {v['failed']} / {v['cancelled']} |"
        )
    rows += ["", f"{args.rounds * args.per_round} mixed requests, {args.concurrent} at a time, max_tokens up to {args.max_tokens}; problems: {len(problems)}."]
    write("soak", {"args": vars(args), "rounds": rounds, "problems": problems}, "\n".join(rows))


if __name__ == "__main__":
    main()
