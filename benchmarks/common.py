"""Shared by the benchmarks: the machine's description, serving a set of prompts, and writing results as JSON plus Markdown."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """What the figures were measured on: CPU and its kernel level, cores, versions, device."""
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2 or AVX512: which kernels (and bfloat16 ones) the CPU runs
        "device": "cpu",
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def device_suffix(device: object) -> str:
    """Results of a GPU run are named apart from the CPU ones: "" on CPU, "_cuda" on CUDA."""
    kind = getattr(device, "type", str(device))
    return "" if kind == "cpu" else f"_{kind}"


def side_by_side_parser(modes: bool = False) -> argparse.ArgumentParser:
    """The options of a benchmark that serves the serving prompts two ways in turns: --rounds,
    --levels, --max-tokens, and with `modes` --modes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8])
    if modes:
        parser.add_argument("--modes", nargs="+", default=["online", "base"])
    parser.add_argument("--max-tokens", type=int, default=64)
    return parser


def warm_runtime(**settings: Any) -> Any:
    """The process's runtime with these settings, its models loaded and warmed up by a short request."""
    import wsd_llms

    runtime = wsd_llms.get_runtime(**settings)
    runtime.generate([{"role": "user", "content": "Hi"}], max_tokens=4)
    return runtime


def tokens_suffix(max_tokens: int) -> str:
    """What a result's name gains for replies of other than the default 64 tokens."""
    return f"_t{max_tokens}" if max_tokens != 64 else ""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean_of(results: list[dict], key: str) -> float:
    """The mean of `key` over runs of one case (alternate's results)."""
    return sum(result[key] for result in results) / len(results)


def same_texts(results: list[dict]) -> bool:
    """Whether every run gave the replies the first one did (each result's "texts")."""
    return all(result["texts"] == results[0]["texts"] for result in results)


def drop_texts(runs: dict[str, dict[Any, list[dict]]]) -> None:
    """Take the replies out of alternate's runs before they are written: compared, not recorded."""
    for way in runs.values():
        for results in way.values():
            for result in results:
                result.pop("texts")


def write(name: str, data: dict, table: str) -> None:
    """Write results/<name>.json and results/<name>.md and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    m = data["machine"]
    header = f"Machine: {m['device']} ({m['cores']} cores, torch {m['torch']}), {data['date']}\n\n"
    (RESULTS / f"{name}.md").write_text(header + table + "\n")
    print(header + table)


def serve(runtime: Any, prompts: list[str], concurrent: int, **params: Any) -> tuple[list, float, Any, Any]:
    """Serve one user message per prompt, `concurrent` at a time: (results, wall seconds, stats
    before, stats after)."""
    before = runtime.stats()
    with ThreadPoolExecutor(concurrent) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda p: runtime.generate([{"role": "user", "content": p}], **params), prompts))
        wall = time.perf_counter() - t0
    return results, wall, before, runtime.stats()


def alternate(
    rounds: int, ways: dict[str, Callable[[], None]], cases: list, run: Callable[[Any], dict], say: Callable[[dict], str], warm_up: bool = False
) -> dict[str, dict[Any, list[dict]]]:
    """Run every case each way, the ways taking turns `rounds` times over, so that the shared
    machine's drift falls on all of them alike; `ways` maps a name to what sets it up. Returns
    runs[way][case], a list of `run(case)` results, and prints each with `say`. With `warm_up`,
    every case runs once each way first, untimed: on CUDA the graphs for the shapes a way meets
    are captured there, not in its first round (as bench_serving warms up)."""
    runs: dict[str, dict[Any, list[dict]]] = {way: {case: [] for case in cases} for way in ways}
    if warm_up:
        t0 = time.perf_counter()
        for setup in ways.values():
            setup()
            for case in cases:
                run(case)
        print(f"warm-up, every case once each way: {time.perf_counter() - t0:.1f} s", flush=True)
    for r in range(rounds):
        for way, setup in ways.items():
            setup()
            for case in cases:
                result = run(case)
                runs[way][case].append(result)
                print(f"round {r} {way:6} {case}: {say(result)}", flush=True)
    return runs
