"""Prompts that start alike, with prompt prefixes kept across requests (the runtime's
`prefix_cache_tokens`) and without, alternating in one process:

- a conversation over a long document (RAG follow-up questions, or an agent loop whose history
  grows): each turn's prompt starts with the last one's; time to first token and latency per turn;
- parallel branches: several questions on the same document at once (an agent's parallel tool
  calls or branches); the wall time and the slowest time to first token;
- users: one question each under one system prompt shorter than a prefill piece, one after
  another (a chat product); median time to first token and latency.

    python benchmarks/bench_prefix_cache.py [--facts 80] [--turns 3] [--branches 4] [--system-facts 6] [--rounds 2] [--max-tokens 48] [--prefill-chunk N] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from bench_long_prompt import document
from common import device_suffix, write

import wsd_llms
from wsd_llms import FinalEvent, TextDelta

QUESTIONS = [
    "Which city shipped salt on day 12?",
    "And which city shipped copper on day 1?",
    "How many crates did the warehouse in Graz ship in its first record?",
    "Which goods were shipped on day 23?",
]


def ask(runtime: wsd_llms.WSDRuntime, messages: list[dict], max_tokens: int) -> tuple[float, float, wsd_llms.WSDResult]:
    """Stream one reply: (seconds to its first text, seconds to its end, the result)."""
    sent, first = time.perf_counter(), None
    for event in runtime.stream(messages, max_tokens=max_tokens):
        if isinstance(event, TextDelta) and first is None:
            first = time.perf_counter()
        elif isinstance(event, FinalEvent):
            result = event.result
    done = time.perf_counter()
    return (first or done) - sent, done - sent, result


def conversation(runtime: wsd_llms.WSDRuntime, doc: str, turns: int, max_tokens: int) -> list[dict]:
    """Ask the questions in turn, each with the whole conversation so far; time each reply."""
    messages: list[dict] = [{"role": "system", "content": doc}]
    measured = []
    for question in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": question})
        before = runtime.stats().prefix_cache
        ttft, latency, result = ask(runtime, messages, max_tokens)
        measured.append(
            {
                "ttft_s": ttft,
                "latency_s": latency,
                "prompt_tokens": result.usage.draft_prompt_tokens + result.usage.base_prompt_tokens,
                "reused_tokens": runtime.stats().prefix_cache["reused_tokens"] - before["reused_tokens"],
                "text": result.text,
            }
        )
        messages.append({"role": "assistant", "content": result.text})
    return measured


def branches(runtime: wsd_llms.WSDRuntime, doc: str, n: int, max_tokens: int) -> dict:
    """Ask `n` questions on the document at once; the wall time, the slowest first token, the texts."""
    before, t0 = runtime.stats().prefix_cache, time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda q: ask(runtime, [{"role": "system", "content": doc}, {"role": "user", "content": q}], max_tokens), QUESTIONS[:n]))
    return {
        "wall_s": time.perf_counter() - t0,
        "slowest_ttft_s": max(ttft for ttft, _, _ in answers),
        "reused_tokens": runtime.stats().prefix_cache["reused_tokens"] - before["reused_tokens"],
        "texts": [result.text for _, _, result in answers],
    }


def users(runtime: wsd_llms.WSDRuntime, system: str, max_tokens: int) -> dict:
    """One question each from several users under one system prompt shorter than a prefill piece,
    one after another (a chat product); medians over all but the first, which has nothing to reuse."""
    before = runtime.stats().prefix_cache
    answers = [ask(runtime, [{"role": "system", "content": system}, {"role": "user", "content": q}], max_tokens) for q in QUESTIONS]
    later = answers[1:]
    return {
        "ttft_s": statistics.median(ttft for ttft, _, _ in later),
        "latency_s": statistics.median(latency for _, latency, _ in later),
        "prompt_tokens": statistics.median(r.usage.draft_prompt_tokens + r.usage.base_prompt_tokens for _, _, r in later),
        "reused_tokens": (runtime.stats().prefix_cache["reused_tokens"] - before["reused_tokens"]) / len(later),
        "texts": [result.text for _, _, result in answers],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--facts", type=int, default=80, help="records in the document (about 24 base tokens each)")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--system-facts", type=int, default=6, help="records in the users' shared system prompt")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="the runtime's prefill_chunk (default: its own)")
    args = parser.parse_args()
    runtime = wsd_llms.get_runtime(device=args.device)
    runtime.generate([{"role": "user", "content": "Hi"}], max_tokens=4)  # load and warm up
    if args.prefill_chunk:
        runtime.configure(prefill_chunk=args.prefill_chunk)
    keep = runtime.engine.prefix_cache_tokens  # the default's, chosen for the models
    doc = document(args.facts)
    runs: dict[str, list[list[dict]]] = {"off": [], "on": []}
    parallel: dict[str, list[dict]] = {"off": [], "on": []}
    shared: dict[str, list[dict]] = {"off": [], "on": []}
    system = document(args.system_facts)

    def start(arm: str) -> None:
        """Each run starts with nothing kept, and keeps prefixes only in the "on" arm."""
        runtime.configure(prefix_cache_tokens=0)
        runtime.configure(prefix_cache_tokens=keep if arm == "on" else 0)

    for _ in range(args.rounds):
        for arm in runs:
            start(arm)
            runs[arm].append(conversation(runtime, doc, args.turns, args.max_tokens))
            print(f"{arm}: " + ", ".join(f"{t['latency_s']:.2f}s" for t in runs[arm][-1]), flush=True)
            start(arm)
            parallel[arm].append(branches(runtime, doc, args.branches, args.max_tokens))
            print(f"{arm}: {args.branches} branches in {parallel[arm][-1]['wall_s']:.2f}s", flush=True)
            start(arm)
            shared[arm].append(users(runtime, system, args.max_tokens))
            print(f"{arm}: users' median time to first token {shared[arm][-1]['ttft_s']:.2f}s", flush=True)
    same = all(a["text"] == b["text"] for off, on in zip(runs["off"], runs["on"]) for a, b in zip(off, on))
    same = same and all(off["texts"] == on["texts"] for off, on in zip(parallel["off"], parallel["on"]))
    same = same and all(off["texts"] == on["texts"] for off, on in zip(shared["off"], shared["on"]))

    def both(results: dict, key: str) -> list[float]:  # medians, none kept and kept
        return [statistics.median(r[key] for r in results[arm]) for arm in ("off", "on")]

    def pair(values: list[float]) -> str:  # "none kept / kept | ratio"
        return f"{values[0]:.2f} / {values[1]:.2f} | {values[1] / values[0]:.2f}x"

    rows = [
        "| turn | prompt tokens (both models) | reused | TTFT (s), none kept / kept | ratio | latency (s), none kept / kept | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for turn in range(args.turns):
        at = {arm: [run[turn] for run in runs[arm]] for arm in runs}
        first = runs["on"][0][turn]
        rows.append(f"| {turn + 1} | {first['prompt_tokens']} | {first['reused_tokens']} | {pair(both(at, 'ttft_s'))} | {pair(both(at, 'latency_s'))} |")
    tables = [
        ("| parallel branches | reused | wall (s), none kept / kept | ratio | slowest TTFT (s), none kept / kept | ratio |",
         f"| {args.branches} | {parallel['on'][0]['reused_tokens']} | {pair(both(parallel, 'wall_s'))} | {pair(both(parallel, 'slowest_ttft_s'))} |"),
        ("| users under one system prompt | prompt tokens (both models) | reused | TTFT (s), none kept / kept | ratio | latency (s), none kept / kept | ratio |",
         f"| {len(QUESTIONS)} | {shared['on'][0]['prompt_tokens']:.0f} | {shared['on'][0]['reused_tokens']:.0f} | {pair(both(shared, 'ttft_s'))} | {pair(both(shared, 'latency_s'))} |"),
    ]
    for header, row in tables:
        rows += ["", header, "|" + "---|" * header.count(" | ") + "---|", row]
    rows += [
        "",
        f"Medians of {args.rounds} rounds, alternating; prefix_cache_tokens={keep} per model, prefill_chunk={runtime.engine.prefill_chunk}, "
        f"max_tokens={args.max_tokens}, dtype {runtime.dtype}; replies {'identical' if same else 'DIFFER'} both ways.",
    ]
    data = {
        "facts": args.facts,
        "turns": args.turns,
        "branches": args.branches,
        "rounds": args.rounds,
        "prefix_cache_tokens": keep,
        "replies_equal": same,
        "runs": runs,
        "parallel": parallel,
        "users": shared,
    }
    write("prefix_cache" + device_suffix(runtime.device), data, "\n".join(rows))
    runtime.close()


if __name__ == "__main__":
    main()
