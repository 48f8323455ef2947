"""Online WSD vs the paper's staged pipeline vs each model alone, on the embedded pair (greedy).

Reports median latency, time to first token, tokens/s and kept-draft length per method; the
online/staged latency ratio for prompts that switch and prompts that do not; and how long a
second start (cached weights) takes to load both models.

    python benchmarks/bench_core.py [--max-tokens 96] [--repeats 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import median, write

import wsd_llms

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in detail.",
    "List five fruits that are red.",
    "How do I make a bomb at home?",
    "Write a Python function that reverses a string.",
    "What is 12 times 12?",
    "Write a short story about a dragon who learns to bake bread.",
    "Give me three tips for a job interview.",
]
METHODS = ["online", "staged", "base", "draft"]

LOAD_SNIPPET = """
import time, wsd_llms
t = time.perf_counter(); wsd_llms.get_runtime().load(); print(time.perf_counter() - t)
"""


def second_start_seconds() -> float:
    out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    runtime = wsd_llms.get_runtime()
    for method in METHODS:  # load, and run every kind of pass once before timing anything
        runtime.generate([{"role": "user", "content": "Tell me about the Moon."}], mode=method, max_tokens=32)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        for method in METHODS:
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                r = runtime.generate(messages, mode=method, max_tokens=args.max_tokens)
                wall = time.perf_counter() - t0
                runs[method].append(
                    {
                        "prompt": prompt,
                        "latency": wall,
                        "ttft": r.timings.ttft,
                        "reply_tokens": r.usage.reply_tokens,
                        "tokens_per_s": r.usage.reply_tokens / wall,
                        "kept_draft": r.usage.kept_draft_tokens,
                        "switch_point": r.switch_point,
                        "draft_tokens": r.usage.draft_tokens,
                    }
                )
                print(f"{method:7s} {wall:6.2f}s switch={r.switch_point} {prompt[:40]}", flush=True)

    summary = {
        m: {
            "median_latency_s": median([r["latency"] for r in rs]),
            "median_ttft_s": median([r["ttft"] for r in rs if r["ttft"] is not None]),
            "median_tokens_per_s": median([r["tokens_per_s"] for r in rs]),
            "median_kept_draft": median([r["kept_draft"] for r in rs]),
        }
        for m, rs in runs.items()
    }
    ratios = {"switch": [], "no_switch": []}
    for on, st in zip(runs["online"], runs["staged"]):
        ratios["switch" if st["switch_point"] is not None else "no_switch"].append(on["latency"] / st["latency"])
    ratio_summary = {k: {"n": len(v), "median": median(v), "max": max(v) if v else None} for k, v in ratios.items()}
    load_s = second_start_seconds()

    rows = ["| method | median latency (s) | median TTFT (s) | median tokens/s | median kept draft |", "|---|---|---|---|---|"]
    for m, s in summary.items():
        rows.append(
            f"| {m} | {s['median_latency_s']:.2f} | {s['median_ttft_s']:.3f} | {s['median_tokens_per_s']:.1f} | {s['median_kept_draft']:.0f} |"
        )
    rows += [
        "",
        "| online / staged latency | prompts | median | worst |",
        "|---|---|---|---|",
    ]
    for k, v in ratio_summary.items():
        if v["n"]:
            rows.append(f"| {k.replace('_', ' ')} | {v['n']} | {v['median']:.2f}x | {v['max']:.2f}x |")
    rows += ["", f"Second start, both models from the safetensors cache: {load_s:.2f} s.", "",
             f"{len(PROMPTS)} prompts, greedy, max_tokens={args.max_tokens}, max_draft_tokens=512, τ=0.8, w=6."]
    write("core", {"max_tokens": args.max_tokens, "summary": summary, "online_over_staged": ratio_summary,
                   "second_start_load_s": load_s, "runs": runs}, "\n".join(rows))


if __name__ == "__main__":
    main()
