"""What one graphed pass costs on a GPU, per model: for a decode step over 1, 4 and 16 rows, the
wall time (waiting for the GPU), the GPU events it launches and their GPU time, and the kernels
that take it; then an eager 60-token prefill. On an H200 these showed the passes bound by their
number of kernels (about 1500, at 1 to 3.5 us each), not by rows (benchmarks/README.md, "On a GPU").

    python benchmarks/gpu_kernels.py > benchmarks/results/kernels_cuda.txt    (needs CUDA)
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

import wsd_llms


def main() -> None:
    runtime = wsd_llms.get_runtime(device="cuda")
    for name, runner in runtime.load().runners.items():
        kvs = []
        for i in range(16):
            kv = runner.new_cache()
            runner.extend(kv, list(range(100, 140 + i)))
            kvs.append(kv)
        for b in (1, 4, 16):
            batch = kvs[:b]
            for _ in range(3):  # captures the graph for this shape, then replays it
                runner.extend_batch(batch, [[7]] * b, [0] * b)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                runner.extend_batch(batch, [[7]] * b, [0] * b)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 20 * 1000
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    runner.extend_batch(batch, [[7]] * b, [0] * b)
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu_ms = sum(e.device_time for e in kernels) / 5 / 1000
            print(f"{name} {b} rows: {wall:.2f} ms a pass (wall, synced), {len(kernels) / 5:.0f} GPU events a pass, {gpu_ms:.2f} ms GPU time a pass", flush=True)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15), flush=True)
        kv = runner.new_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.extend(kv, list(range(100, 160)))
        torch.cuda.synchronize()
        print(f"{name}: eager 60-token prefill {1000 * (time.perf_counter() - t0):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
