"""Several server processes on one machine (`uvicorn --workers 2`, `gunicorn -w 2`, two task-queue
workers): each process's runtime runs PyTorch's CPU ops on a thread team as wide as the machine, so
processes serving at once oversubscribe the cores. The same prompts are served by one process, and
by two processes at once (half each, one request at a time each) with PyTorch's default threads and
with the cores split between them (`torch.set_num_threads`); by one process two at a time, which
batches them; and by one process beside a busy one (a Python loop taking a core), with the default
threads and with one. Aggregate tokens/s over all serving processes, from when all have loaded.

    python benchmarks/bench_processes.py [--max-tokens 64] [--prompts 8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from typing import Any

from bench_serving import PROMPTS
from common import serve, warm_runtime, write


def _serve(threads: int | None, prompts: list[str], concurrent: int, max_tokens: int, ready: Any, out: Any) -> None:
    """One server process: its threads set before any PyTorch work, its models loaded, then its
    prompts served once every process is ready. A failure is sent back, and breaks the barrier the
    others wait at, so that the run ends instead of waiting for it."""
    import torch

    try:
        if threads is not None:
            torch.set_num_threads(threads)
        runtime = warm_runtime()
        ready.wait(timeout=1800)
        start = time.time()
        results, wall, _, _ = serve(runtime, prompts, concurrent, max_tokens=max_tokens, temperature=0)
        out.put({"tokens": sum(r.usage.reply_tokens for r in results), "start": start, "end": start + wall, "threads": torch.get_num_threads()})
    except BaseException as exc:
        ready.abort()
        out.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def _spin() -> None:
    """A busy neighbour: a pure-Python loop that takes one core."""
    while True:
        pass


def run_case(processes: int, threads: int | None, concurrent: int, prompts: list[str], max_tokens: int, busy: bool) -> dict:
    """Serve `prompts` split over `processes` spawned processes, each `concurrent` at a time (with
    `busy`, beside a process that takes a core)."""
    ctx = mp.get_context("spawn")  # as a server's workers: each its own interpreter, models and threads
    ready, out = ctx.Barrier(processes), ctx.Queue()
    children = [
        ctx.Process(target=_serve, args=(threads, prompts[i::processes], concurrent, max_tokens, ready, out), daemon=True)
        for i in range(processes)
    ]
    neighbour = ctx.Process(target=_spin, daemon=True) if busy else None
    for child in [*children, *([neighbour] if neighbour else [])]:
        child.start()
    try:
        done = [out.get(timeout=1800) for _ in children]
    finally:
        if neighbour is not None:
            neighbour.kill()
    if errors := [d["error"] for d in done if "error" in d]:
        raise RuntimeError(f"a server process failed: {errors[0]}")
    for child in children:
        child.join()
    wall = max(d["end"] for d in done) - min(d["start"] for d in done)
    tokens = sum(d["tokens"] for d in done)
    return {"processes": processes, "threads": done[0]["threads"], "concurrent": concurrent, "tokens": tokens, "wall": wall, "tok_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8, help="how many of bench_serving's prompts (split between processes)")
    args = parser.parse_args()
    prompts = PROMPTS[: args.prompts]
    cores = os.cpu_count() or 1
    half = max(cores // 2, 1)
    cases = {  # name: processes, threads a process (None: PyTorch's default), requests at a time, beside a busy process
        "1 process, one request at a time": (1, None, 1, False),
        "2 processes, default threads": (2, None, 1, False),
        f"2 processes, {half} thread{'s' if half > 1 else ''} each": (2, half, 1, False),
        "1 process, 2 requests at a time": (1, None, 2, False),
        "1 process beside a busy one, default threads": (1, None, 1, True),
        f"1 process beside a busy one, {cores - 1} thread{'s' if cores > 2 else ''}": (1, max(cores - 1, 1), 1, True),
    }
    runs = {}
    for name, (processes, threads, concurrent, busy) in cases.items():
        runs[name] = run_case(processes, threads, concurrent, prompts, args.max_tokens, busy)
        print(f"{name}: {runs[name]['tok_s']:.1f} tok/s ({runs[name]['wall']:.1f} s)", flush=True)
    one = runs["1 process, one request at a time"]["tok_s"]
    rows = ["| how the prompts are served | threads a process | aggregate tok/s | vs 1 process |", "|---|---|---|---|"]
    rows += [f"| {name} | {r['threads']} | {r['tok_s']:.1f} | {r['tok_s'] / one:.2f}x |" for name, r in runs.items()]
    rows += ["", f"{len(prompts)} prompts, online WSD, greedy, max_tokens={args.max_tokens}, {cores} cores; each process loads the models itself."]
    write("processes", {"max_tokens": args.max_tokens, "prompts": len(prompts), "runs": runs}, "\n".join(rows))


if __name__ == "__main__":
    main()
