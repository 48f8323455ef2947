"""Forward-pass costs of the embedded models, the facts the scheduler's batching rests on:

- the output projection: `F.linear` (MKL) against the oneDNN packed layer the CPU runner uses
  (packed_linear.PackedLinear);
- one decode step for 1, 4, 8 and 16 sequences (batched, caches of 40-75 tokens);
- a pass's fixed cost against its cost per token (scheduler.PASS_OVERHEAD), from scoring passes
  of 1 to 512 tokens;
- 4 decode steps over 2000-position caches in one pass: ragged (each row attends over its own
  cache, the CPU runner's way) and padded (the caches copied into one batch); what the padded
  pass pays per cached position of each row (scheduler.POSITION_COST), against 4 short caches.

    python benchmarks/bench_passes.py [--device auto] [--dtype auto]    (GPU results: results/passes_cuda.*)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import device_suffix, write

import wsd_llms
from wsd_llms.model_runner import KVCache, ModelRunner
from wsd_llms.packed_linear import PackedLinear


def timed(fn: Callable[[], object], repeat: int = 7) -> float:
    """Median milliseconds of `fn` after two warm-up calls (waiting for the GPU, if there is one)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn(), fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def head_costs(runner: ModelRunner) -> list[dict]:
    """A CPU output projection of the model's shape and dtype: `nn.Linear` against `PackedLinear` (GPUs keep `nn.Linear`)."""
    head = runner.model.get_output_embeddings()
    if not isinstance(head, PackedLinear):
        return []
    dtype = runner.model.get_input_embeddings().weight.dtype
    linear = torch.nn.Linear(head.in_features, head.out_features, bias=False, dtype=dtype)
    packed = PackedLinear(linear)
    rows = []
    for n in [1, 2, 8, 16, 64]:
        x = torch.randn(n, head.in_features, dtype=dtype)
        with torch.inference_mode():
            rows.append({"rows": n, "linear_ms": timed(lambda: linear(x)), "packed_ms": timed(lambda: packed(x))})
    return rows


def step_costs(runner: ModelRunner) -> dict:
    def cache(n: int) -> KVCache:
        kv = runner.new_cache()
        runner.extend(kv, list(range(100, 100 + n)))
        return kv

    caches = [cache(40 + 5 * i) for i in range(16)]

    def step(batch: list[KVCache]) -> None:
        for kv in batch:
            kv.crop(40)
        runner.extend_batch(batch, [[7]] * len(batch), [0] * len(batch))

    decode = {b: timed(lambda b=b: step(caches[:b])) for b in [1, 4, 8, 16]}

    def scoring(m: int) -> None:
        caches[0].crop(40)
        runner.extend(caches[0], list(range(200, 200 + m)), keep=m)

    scored = {m: timed(lambda m=m: scoring(m)) for m in [1, 8, 32, 128, 512]}
    per_token = (scored[512] - scored[32]) / 480
    long = [cache(2000) for _ in range(4)]

    def long_step() -> None:
        for kv in long:
            kv.crop(2000)
        runner.extend_batch(long, [[7]] * 4, [0] * 4)

    ragged, runner.ragged = runner.ragged, False
    long_ms = timed(long_step)
    decode_4_padded = timed(lambda: step(caches[:4]))
    runner.ragged = ragged
    ragged_ms = timed(long_step) if ragged else None
    per_position = (long_ms - decode_4_padded) / (4 * (2000 - 47))
    return {
        "decode_ms": decode,
        "decode_8_vs_1": decode[8] / decode[1],
        "scoring_ms": scored,
        "per_token_ms": per_token,
        "pass_overhead_ms": scored[1] - per_token,
        # None where a token costs nothing measurable (a launch-bound GPU: the 512-token pass can time below the 32-token one)
        "pass_overhead_tokens": (scored[1] - per_token) / per_token if per_token > 0 else None,
        "decode_4_long_padded_ms": long_ms,
        "decode_4_long_ragged_ms": ragged_ms,
        "position_cost_tokens": per_position / per_token if per_token > 0 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    runtime = wsd_llms.get_runtime(device=args.device, dtype=args.dtype)
    # Load here and run every pass in this thread, with no worker: one thread running PyTorch's CPU
    # ops, as in serving. A second such thread makes libgomp's thread teams share the cores and
    # throttle their spinning, which inflates every pass (README, "CPU threads").
    engine = runtime.load()
    data: dict = {}
    rows = [
        "| model | decode 1 / 4 / 8 / 16 seqs (ms) | 8 vs 1 | pass fixed cost (ms, tokens) | 4 seqs over 2000-position caches, "
        "ragged / padded (ms); padded per position and row (tokens) | output projection, rows 1 / 8 / 64: `nn.Linear` vs packed (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, runner in engine.runners.items():
        steps, heads = step_costs(runner), head_costs(runner)
        data[name] = {"model": runner.loaded.name, "steps": steps, "head": heads}
        d = steps["decode_ms"]
        h = {r["rows"]: r for r in heads}
        rows.append(
            f"| {name} ({runner.loaded.name}) | {d[1]:.0f} / {d[4]:.0f} / {d[8]:.0f} / {d[16]:.0f} | {steps['decode_8_vs_1']:.2f}x | "
            f"{steps['pass_overhead_ms']:.0f}, "
            + ("n/a (no cost per token above noise)" if steps["pass_overhead_tokens"] is None else f"{steps['pass_overhead_tokens']:.1f}")
            + " | "
            + ("n/a" if steps["decode_4_long_ragged_ms"] is None else f"{steps['decode_4_long_ragged_ms']:.0f}")
            + f" / {steps['decode_4_long_padded_ms']:.0f}; "
            + ("n/a" if steps["position_cost_tokens"] is None else f"{steps['position_cost_tokens']:.4f}")
            + " | "
            + (" / ".join(f"{h[n]['linear_ms']:.0f} vs {h[n]['packed_ms']:.0f}" for n in (1, 8, 64)) if h else "n/a")
            + " |"
        )
    rows += [
        "",
        f"dtype {runtime.dtype}. Median of 7 after warm-up; decode caches hold 40-75 tokens; "
        "fixed cost = a 1-token scoring pass less one token's cost.",
    ]
    write("passes" + device_suffix(runtime.device), data, "\n".join(rows))


if __name__ == "__main__":
    main()
