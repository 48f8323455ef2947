"""Where a serving step's time goes: cProfile of Engine.step in the runtime's worker, at 1 and 16
concurrent requests (online WSD, greedy), with the passes and seconds per phase from stats().

    python benchmarks/profile_steps.py [--device auto] [--requests 16]

Writes results/profile_steps[_cuda].txt: per level the throughput, the step count and mean step
time, then the 25 functions with the most time of their own. On an H200 this showed cuDNN
attention costing 1-1.7 ms of CPU per call (attention.CUDA_ATTENTION).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from bench_serving import PROMPTS
from common import RESULTS, device_suffix, machine

import wsd_llms
from wsd_llms.engine import Engine


def profile_level(runtime: wsd_llms.WSDRuntime, n: int, prompts: list[str]) -> str:
    """Serve `prompts` n at a time with every Engine.step profiled; a report of where the time went."""
    profiler, walls = cProfile.Profile(), []
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    step = Engine.step

    def profiled_step(engine: Engine) -> None:
        t0 = time.perf_counter()
        profiler.enable()
        try:
            step(engine)
        finally:
            profiler.disable()
            sync()
            walls.append(time.perf_counter() - t0)

    Engine.step = profiled_step  # type: ignore[method-assign]
    try:
        before, t0 = runtime.stats(), time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            replies = list(pool.map(lambda p: runtime.generate([{"role": "user", "content": p}], max_tokens=64), prompts))
        wall, after = time.perf_counter() - t0, runtime.stats()
    finally:
        Engine.step = step  # type: ignore[method-assign]
    tokens = sum(r.usage.reply_tokens for r in replies)
    out = io.StringIO()
    out.write(
        f"===== {n} concurrent: {tokens} tokens in {wall:.2f}s = {tokens / wall:.1f} tok/s (profiled); "
        f"{len(walls)} steps, mean step {1000 * sum(walls) / len(walls):.1f} ms\n"
        f"passes {({k: after.passes[k] - before.passes[k] for k in after.passes})} "
        f"pass s {({k: round(after.pass_seconds[k] - before.pass_seconds[k], 2) for k in after.pass_seconds})}\n"
    )
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    parser.add_argument("--requests", type=int, default=16)
    args = parser.parse_args()
    runtime = wsd_llms.get_runtime(device=args.device, max_running=16)
    runtime.generate([{"role": "user", "content": "Hi"}], max_tokens=4)  # load and warm up
    prompts = PROMPTS[: args.requests]
    report = f"Machine: {machine()}, dtype {runtime.dtype}\n\n"
    report += profile_level(runtime, 1, prompts[:6]) + profile_level(runtime, 16, prompts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"profile_steps{device_suffix(runtime.device)}.txt").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
