"""A long conversation under two prefix-store sizes: each turn's time to first text, where the
store (the runtime's `prefix_cache_tokens`) holds the whole history so far, or only its start.

    python benchmarks/bench_long_chat.py [--turns 30] [--records 8] [--max-tokens 24] [--small 4096] [--rounds 1] [--device auto]

Each turn the user pastes a few records (about 25 base tokens each) and asks about them; the whole
conversation goes back each turn, as a chat product or an agent loop sends it. A prompt that starts
like the last turn's feeds only what the store does not hold: with a store smaller than the
history, everything past it is fed again every turn. The two sizes take turns, each starting from
an empty store; the replies must be the same both ways.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench_long_prompt import CITIES
from bench_prefix_cache import ask
from common import device_suffix, write

import wsd_llms

GOODS = ["apples", "copper", "paper", "glass", "wool", "salt"]


def message(turn: int, records: int) -> str:
    """The user's message at `turn`: a few records, then a question on them."""
    lines = [
        f"Record {turn}.{i}: the warehouse in {CITIES[(turn + i) % len(CITIES)]} shipped {(turn * 53 + i * 37) % 900 + 100} crates of "
        f"{GOODS[(turn + i) % len(GOODS)]} on day {(turn * 7 + i * 11) % 28 + 1}."
        for i in range(records)
    ]
    return "\n".join(lines) + f"\n\nWhich warehouse shipped the most crates in these records of turn {turn}?"


def chat(runtime: wsd_llms.WSDRuntime, turns: int, records: int, max_tokens: int) -> list[dict]:
    """The conversation, turn by turn: time to first text, positions fed, the reply."""
    messages: list[dict] = [{"role": "system", "content": "You are a careful clerk. Answer in one sentence."}]
    measured = []
    for turn in range(turns):
        messages.append({"role": "user", "content": message(turn, records)})
        ttft, _, result = ask(runtime, messages, max_tokens)
        usage = result.usage
        measured.append(
            {
                "ttft_s": ttft,
                "prompt_tokens": usage.draft_prompt_tokens + usage.base_prompt_tokens,
                "fed_tokens": usage.draft_prompt_tokens + usage.base_prompt_tokens - usage.draft_cached_prompt_tokens - usage.base_cached_prompt_tokens,
                "text": result.text,
            }
        )
        messages.append({"role": "assistant", "content": result.text})
    return measured


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--records", type=int, default=8, help="records the user pastes each turn")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--small", type=int, default=4096, help="the smaller store, in positions per model")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    runtime = wsd_llms.get_runtime(device=args.device)
    runtime.generate([{"role": "user", "content": "Hi"}], max_tokens=4)  # load and warm up
    sizes = {"small": args.small, "default": runtime.engine.prefix_cache_tokens}
    runs: dict[str, list[list[dict]]] = {arm: [] for arm in sizes}
    for _ in range(args.rounds):
        for arm, size in sizes.items():
            runtime.configure(prefix_cache_tokens=0)  # an empty store
            runtime.configure(prefix_cache_tokens=size)
            t0 = time.perf_counter()
            runs[arm].append(chat(runtime, args.turns, args.records, args.max_tokens))
            print(f"{arm} ({size}): {args.turns} turns in {time.perf_counter() - t0:.1f}s", flush=True)
    same = all(a["text"] == b["text"] for small, default in zip(runs["small"], runs["default"]) for a, b in zip(small, default))
    shown = sorted({0, *range(4, args.turns, 5), args.turns - 1})
    rows = [
        f"| turn | prompt tokens (both models) | fed, store of {sizes['small']} / {sizes['default']} | TTFT (s), store of {sizes['small']} / {sizes['default']} | ratio |",
        "|---|---|---|---|---|",
    ]
    for turn in shown:
        ttft = [statistics.median(run[turn]["ttft_s"] for run in runs[arm]) for arm in sizes]
        fed = [runs[arm][0][turn]["fed_tokens"] for arm in sizes]
        rows.append(f"| {turn + 1} | {runs['default'][0][turn]['prompt_tokens']} | {fed[0]} / {fed[1]} | {ttft[0]:.2f} / {ttft[1]:.2f} | {ttft[1] / ttft[0]:.2f}x |")
    totals = [statistics.median(sum(t["ttft_s"] for t in run) for run in runs[arm]) for arm in sizes]
    rows += [
        "",
        f"Time to first text summed over the {args.turns} turns: {totals[0]:.1f} s / {totals[1]:.1f} s ({totals[1] / totals[0]:.2f}x). "
        f"Medians of {args.rounds} round(s), alternating; {args.records} records a turn, max_tokens={args.max_tokens}, "
        f"prefill_chunk={runtime.engine.prefill_chunk}, dtype {runtime.dtype}; replies {'identical' if same else 'DIFFER'} both ways.",
    ]
    write("long_chat" + device_suffix(runtime.device), {"turns": args.turns, "records": args.records, "sizes": sizes, "replies_equal": same, "runs": runs}, "\n".join(rows))
    runtime.close()


if __name__ == "__main__":
    main()
