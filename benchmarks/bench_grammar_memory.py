"""What compiled grammars cost in memory: schemas no earlier request used, compiled for both embedded
models' tokenizers as a request compiles them (structured.compiled_grammar), with the process's
resident memory (after malloc_trim's give-back) beside the bytes xgrammar's caches say they hold
(each bounded by structured.GRAMMAR_CACHE_BYTES) every `--every` schemas.

    python benchmarks/bench_grammar_memory.py [--schemas 15000] [--every 1000]

Writes results/grammar_memory.json and .md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

import psutil
import torch
from common import write

from wsd_llms import structured
from wsd_llms.loading import EMBEDDED_BASE, EMBEDDED_DRAFT, load_model

MIB = 2**20


def spec(n: int) -> str:
    """The structural tag of a small object schema no earlier one used."""
    schema = {"type": "object", "properties": {f"field_{n}": {"type": "string"}, "count": {"type": "integer"}}, "required": [f"field_{n}", "count"]}
    return json.dumps({"type": "structural_tag", "format": structured.json_format(schema)})


def resident() -> float:
    """Resident memory in MiB once malloc has given back what it can."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss / MIB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schemas", type=int, default=15000)
    parser.add_argument("--every", type=int, default=1000)
    args = parser.parse_args()
    models = [load_model(name, device=torch.device("cpu"), dtype=torch.float32) for name in (EMBEDDED_DRAFT, EMBEDDED_BASE)]
    loaded, rows, t0 = resident(), [], time.perf_counter()
    for n in range(1, args.schemas + 1):
        for model in models:
            structured.compiled_grammar(model, spec(n))
        if n % args.every == 0 or n == args.schemas:
            cached = [structured._cache[m.tokenizer].compiler.get_cache_size_bytes() / MIB for m in models]
            rows.append({"schemas": n, "rss_mib": resident(), "draft_cache_mib": cached[0], "base_cache_mib": cached[1], "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
    table = "\n".join(
        [
            "| schemas | resident memory over loaded (MiB) | xgrammar's caches: draft + base (MiB) |",
            "|---|---|---|",
            *(f"| {r['schemas']} | {r['rss_mib'] - loaded:.0f} | {r['draft_cache_mib']:.1f} + {r['base_cache_mib']:.1f} |" for r in rows),
        ]
    )
    table += f"\n\nLoaded models: {loaded:.0f} MiB resident; cache bound {structured.GRAMMAR_CACHE_BYTES / MIB:.0f} MiB per tokenizer."
    write("grammar_memory", {"loaded_rss_mib": loaded, "cache_limit_mib": structured.GRAMMAR_CACHE_BYTES / MIB, "rows": rows}, table)


if __name__ == "__main__":
    main()
