"""How long a running stream pauses when a request with a grammar arrives: the longest time between
the worker's step starts (time spent between steps counts) while the request is served, with its
grammar compiled beside the worker (as the runtime does) and, for comparison, on the worker itself.

Cases: the first structured request of a process (xgrammar builds its table of each tokenizer's
words, 262k for the embedded base: `structured._cache` is emptied before it), a request with a
schema not compiled before, and a burst of such requests at once (past MAX_COMPILES, they wait for
a compile thread). The two ways take turns, so the machine's drift falls on both alike.

    python benchmarks/bench_grammar_pause.py [--rounds 2] [--burst 16]

Writes results/grammar_pause.json and .md.
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common import alternate, median, write

import wsd_llms
from wsd_llms import runtime as runtime_module
from wsd_llms import structured

STREAM = [{"role": "user", "content": "Explain photosynthesis in detail."}]
ASK = [{"role": "user", "content": "Give me JSON."}]
CASES = ["first structured request", "new schema", "new schemas at once"]


def schema(n: int) -> dict[str, Any]:
    """A small object schema no earlier request used."""
    return {"type": "object", "properties": {f"field{n}_{i}": {"type": "string"} for i in range(3)}, "required": [f"field{n}_0"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--burst", type=int, default=16, help="requests with new schemas sent at once in the last case")
    args = parser.parse_args()
    rt = wsd_llms.get_runtime(device="cpu")
    engine = rt.load()
    rt.generate(ASK, max_tokens=4)
    starts: list[float] = []
    step = engine.step

    def timed_step() -> None:
        starts.append(time.perf_counter())
        step()

    engine.step = timed_step  # type: ignore[method-assign]
    fresh = iter(range(10**6))

    def run(case: str) -> dict[str, float]:
        if case == CASES[0]:
            structured._cache.clear()  # the next compile builds each tokenizer's table again
        stream = threading.Thread(target=rt.generate, args=(STREAM,), kwargs={"max_tokens": 64, "switch_threshold": 1.0})
        stream.start()
        time.sleep(1.0)
        t0 = time.perf_counter()
        if case == CASES[2]:
            with ThreadPoolExecutor(args.burst) as pool:
                list(pool.map(lambda n: rt.generate(ASK, max_tokens=20, response_format=schema(n)), [next(fresh) for _ in range(args.burst)]))
        else:
            rt.generate(ASK, max_tokens=20, response_format=schema(next(fresh)))
        t1 = time.perf_counter()
        stream.join()
        during = [s for s in starts if t0 - 0.5 <= s <= t1]
        before = [s for s in starts if s < t0 - 0.2][-20:]
        return {
            "pause": max(b - a for a, b in zip(during, during[1:])),
            "step": median([b - a for a, b in zip(before, before[1:])]),
            "request": t1 - t0,
        }

    beside = runtime_module.MAX_COMPILES
    ways = {  # with no room beside it, the worker compiles the grammar itself as it takes the request
        "beside the worker": lambda: setattr(runtime_module, "MAX_COMPILES", beside),
        "on the worker": lambda: setattr(runtime_module, "MAX_COMPILES", 0),
    }
    runs = alternate(args.rounds, ways, CASES, run, lambda r: f"longest pause {r['pause']:.3f} s (a step {r['step']:.3f} s), request {r['request']:.2f} s")
    runtime_module.MAX_COMPILES = beside
    rows, data = [], {}
    for case in CASES:
        got = {way: {k: median([r[k] for r in runs[way][case]]) for k in ("pause", "step", "request")} for way in ways}
        data[case] = got
        aside, worker = got["beside the worker"], got["on the worker"]
        rows.append(
            f"| {case} | {worker['pause']:.2f} / {aside['pause']:.2f} | {aside['pause'] / worker['pause']:.2f}x | "
            f"{aside['step']:.3f} | {worker['request']:.2f} / {aside['request']:.2f} |"
        )
    table = "\n".join(
        [
            "| grammar request | longest pause between a running stream's steps (s), compiled on the worker / beside it | ratio | a step (s) | the request's latency (s), on / beside |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Online WSD, greedy; one stream of 64 tokens running, then a JSON-schema request of 20 tokens (in the last case {args.burst} at once, "
            f"the request's latency the burst's); MAX_COMPILES={beside}; medians of {args.rounds} rounds, alternating.",
        ]
    )
    write("grammar_pause", {"rounds": args.rounds, "results": data}, table)


if __name__ == "__main__":
    main()
