"""Concurrent serving on the embedded pair: aggregate tokens/s, p50/p95 latency, p50/p95 time to
the first streamed text, and peak RSS for 1, 4, 8 and 16 concurrent requests (online WSD, greedy).

Every level serves the same workload (the 16 prompts below), N at a time, so the aggregate
tokens/s of the levels compare like for like.

    python benchmarks/bench_serving.py [--max-tokens 64] [--levels 1 4 8 16] [--rounds 1] [--device auto] [--compare-graphs] [--no-warm-up]

Before the levels, the prompts are served once at the highest level, untimed, so that first-use
costs (CUDA graphs captured for each new shape, oneDNN's kernels for new row counts) fall outside
the table, as in a server that has been up a while; the warm-up's wall time and the graphs it
captured are printed and recorded. --no-warm-up times the levels from a cold start instead.

With --rounds K each level serves the prompts K times over (results/serving_xK.*): fewer of the
requests run in the ramp-down at the end, closer to a steady state. On CUDA, --compare-graphs also
runs every level on a second runtime loaded with WSD_LLMS_CUDA_GRAPHS=0, right after the first, and
reports both and their ratio (peak GPU memory then includes both runtimes' models).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import torch
from common import device_suffix, serve, tokens_suffix, write

import wsd_llms

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in detail.",
    "List five fruits that are red.",
    "Write a Python function that reverses a string.",
    "Give me three tips for a job interview.",
    "Why is the sky blue?",
    "Write a haiku about autumn.",
    "What are the benefits of exercise?",
    "Describe the water cycle.",
    "How does a computer store numbers?",
    "Suggest a name for a coffee shop.",
    "What is the difference between weather and climate?",
    "Explain what a black hole is.",
    "Give me a recipe for pancakes.",
    "What should I pack for a beach trip?",
    "Summarize the plot of Romeo and Juliet.",
]


class PeakRSS:
    """Samples this process's resident memory in the background; `.peak` in MiB."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss / 2**20)
            time.sleep(0.02)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def report(levels: dict, args: argparse.Namespace, runtime: wsd_llms.WSDRuntime, requests: int, plain: dict | None = None, warm_up: dict | None = None) -> None:
    """Write the levels measured so far to results/serving*.json and .md (with `plain`, the same
    levels with CUDA graphs off, side by side)."""
    cuda = runtime.device.type == "cuda"
    single = levels[next(iter(levels))]["aggregate_tokens_per_s"]
    gpu_head, gpu_rule = (" peak GPU memory (MiB) |", "---|") if cuda else ("", "")
    if plain is not None:
        gpu_head, gpu_rule = gpu_head + " graphs off: tok/s | graphs / off |", gpu_rule + "---|---|"
    rows = [
        f"| concurrent | aggregate tok/s | vs 1 | p50 latency (s) | p95 latency (s) | p50 first text (s) | p95 first text (s) | peak RSS (MiB) |{gpu_head}",
        f"|---|---|---|---|---|---|---|---|{gpu_rule}",
    ]
    for n, v in levels.items():
        gpu = f" {v['peak_gpu_mib']:.0f} |" if cuda else ""
        if plain is not None and n in plain:
            off = plain[n]["aggregate_tokens_per_s"]
            gpu += f" {off:.1f} | {v['aggregate_tokens_per_s'] / off:.2f}x |"
        rows.append(
            f"| {n} | {v['aggregate_tokens_per_s']:.1f} | {v['aggregate_tokens_per_s'] / single:.2f}x | "
            f"{v['p50_latency_s']:.2f} | {v['p95_latency_s']:.2f} | {v['p50_first_text_s']:.2f} | {v['p95_first_text_s']:.2f} | "
            f"{v['peak_rss_mib']:.0f} |{gpu}"
        )
    rows += [
        "",
        "Where the time goes: seconds in forward passes per phase (a batched pass serving several phases is split by tokens fed), and passes run:",
        "",
        "| concurrent | draft decoding and prefill (s) | base scoring and prefill (s) | base decoding (s) | outside passes (s) | draft / base passes |",
        "|---|---|---|---|---|---|",
    ]
    for n, v in levels.items():
        sec, passes = v["pass_seconds"], v["passes"]
        rows.append(
            f"| {n} | {sec['draft']:.1f} | {sec['score']:.1f} | {sec['base']:.1f} | {v['wall_s'] - sum(sec.values()):.1f} | "
            f"{passes['draft']} / {passes['base']} |"
        )
    rows += ["", f"Online WSD, greedy, max_tokens={args.max_tokens}, dtype {runtime.dtype}; each level serves the same {requests} requests, N at a time."]
    if warm_up is not None:
        rows[-1] += f" Before the levels, an untimed warm-up served them {warm_up['concurrent']} at a time in {warm_up['wall_s']:.1f} s"
        rows[-1] += f" and captured {warm_up['graphs']} CUDA graphs (shapes first seen later are captured within their level)." if cuda else "."
    else:
        rows[-1] += " No warm-up: each level pays its own first-use costs."
    name = "serving" + tokens_suffix(args.max_tokens) + (f"_x{args.rounds}" if args.rounds != 1 else "")
    name += f"_{args.dtype}" if args.dtype != "auto" else ""
    name += device_suffix(runtime.device)
    data = {"max_tokens": args.max_tokens, "rounds": args.rounds, "dtype": str(runtime.dtype), "warm_up": warm_up, "levels": levels}
    if plain is not None:
        data["levels_graphs_off"] = plain
    write(name, data, "\n".join(rows))


def measure(runtime: wsd_llms.WSDRuntime, n: int, prompts: list[str], max_tokens: int) -> dict:
    """Serve `prompts`, `n` at a time, on `runtime`: throughput, latencies, memory and where the time went."""
    cuda = runtime.device.type == "cuda"

    def one(prompt: str) -> tuple[float, float, int]:
        """(latency, time to the first streamed text, reply tokens) of one request, as its caller sees them."""
        t0 = time.perf_counter()
        first = None
        for event in runtime.stream([{"role": "user", "content": prompt}], max_tokens=max_tokens):
            if first is None and isinstance(event, wsd_llms.TextDelta) and event.text:
                first = time.perf_counter() - t0
            if isinstance(event, wsd_llms.FinalEvent):
                result = event.result
        return time.perf_counter() - t0, first if first is not None else time.perf_counter() - t0, result.usage.reply_tokens

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = runtime.stats()
    with PeakRSS() as rss, ThreadPoolExecutor(n) as pool:
        t0 = time.perf_counter()
        outcomes = list(pool.map(one, prompts))
        wall = time.perf_counter() - t0
    after = runtime.stats()
    latencies = [o[0] for o in outcomes]
    first_texts = [o[1] for o in outcomes]
    tokens = sum(o[2] for o in outcomes)
    return {
        "concurrent": n,
        "requests": len(prompts),
        "wall_s": wall,
        "reply_tokens": tokens,
        "aggregate_tokens_per_s": tokens / wall,
        "p50_latency_s": percentile(latencies, 50),
        "p95_latency_s": percentile(latencies, 95),
        "p50_first_text_s": percentile(first_texts, 50),
        "p95_first_text_s": percentile(first_texts, 95),
        "peak_rss_mib": rss.peak,
        "peak_draft_batch": after.peaks["draft_batch"],
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "pass_seconds": {k: after.pass_seconds[k] - before.pass_seconds[k] for k in after.pass_seconds},
        "passes": {k: after.passes[k] - before.passes[k] for k in after.passes},
        "tokens_fed": {k: after.tokens[k] - before.tokens[k] for k in after.tokens},
    }


def graphs_captured(runtime: wsd_llms.WSDRuntime) -> int:
    """How many slot passes (CUDA graphs, decode_graphs) the runtime's models hold."""
    return sum(len(runner.graphs.passes) for runner in runtime.load().runners.values() if runner.graphs is not None)


def warm(runtime: wsd_llms.WSDRuntime, n: int, prompts: list[str], max_tokens: int) -> dict:
    """Serve `prompts` `n` at a time, untimed in the table: its wall time and the graphs captured meanwhile."""
    graphs = graphs_captured(runtime)
    _, wall, _, _ = serve(runtime, prompts, n, max_tokens=max_tokens)
    return {"concurrent": n, "wall_s": wall, "graphs": graphs_captured(runtime) - graphs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU), bfloat16, ...")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    parser.add_argument("--compare-graphs", action="store_true", help="on CUDA, the same levels with CUDA graphs off, side by side")
    parser.add_argument("--no-warm-up", action="store_true", help="time the levels without serving the prompts once first")
    args = parser.parse_args()
    prompts = PROMPTS * args.rounds
    runtime = wsd_llms.get_runtime(device=args.device, dtype=args.dtype, max_running=max(args.levels))
    if args.compare_graphs and runtime.device.type != "cuda":
        parser.error("--compare-graphs compares CUDA graphs with plain passes: it needs a CUDA device")
    runtime.generate([{"role": "user", "content": "Hi"}], max_tokens=4)  # load and warm up
    plain = None
    if args.compare_graphs:
        os.environ["WSD_LLMS_CUDA_GRAPHS"] = "0"  # read as a runtime loads its models
        plain = wsd_llms.WSDRuntime(device=args.device, dtype=args.dtype, max_running=max(args.levels))
        plain.generate([{"role": "user", "content": "Hi"}], max_tokens=4)
        del os.environ["WSD_LLMS_CUDA_GRAPHS"]
    warm_up = None
    if not args.no_warm_up:
        warm_up = warm(runtime, max(args.levels), prompts, args.max_tokens)
        print(f"warm-up, {warm_up['concurrent']} at a time: {warm_up['wall_s']:.1f} s, {warm_up['graphs']} graphs captured", flush=True)
        if plain is not None:
            warm(plain, max(args.levels), prompts, args.max_tokens)

    levels: dict[int, dict] = {}
    plain_levels: dict[int, dict] = {}
    for n in args.levels:
        levels[n] = measure(runtime, n, prompts, args.max_tokens)
        print(f"{n:3d} concurrent: {levels[n]['aggregate_tokens_per_s']:6.1f} tok/s, p50 {levels[n]['p50_latency_s']:.2f}s, first text p50 {levels[n]['p50_first_text_s']:.2f}s", flush=True)
        if plain is not None:
            plain_levels[n] = measure(plain, n, prompts, args.max_tokens)
            print(f"{n:3d} concurrent, graphs off: {plain_levels[n]['aggregate_tokens_per_s']:6.1f} tok/s", flush=True)
        report(levels, args, runtime, len(prompts), plain_levels if plain is not None else None, warm_up)  # after every level, so a cut-short run keeps what it measured


if __name__ == "__main__":
    main()
