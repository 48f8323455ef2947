"""The linear layers of a decode step, by the rows it carries: what bounds batching on this CPU.

A decode step runs every linear layer of the model's decoder once (the runner's oneDNN layers,
siblings stacked, packed_linear.py). With one row a step streams all the weights from memory; with
more rows the same weights do more arithmetic, until the cores' arithmetic, not memory, sets the
time. This measures both models' linear layers alone (no attention, no output projection), run in
order over inputs of 1 to 64 rows, and the arithmetic rate they reach. It calls oneDNN's kernel as
it is for each row count: the runner feeds fewer than `packed_linear.MIN_ROWS` rows as that many,
since the kernels for fewer are slower here (this table is how that was found).

    python benchmarks/bench_gemm.py

Writes results/gemm.json and .md.
"""

from __future__ import annotations

import statistics
import time

import torch
from common import write

import wsd_llms
from wsd_llms.packed_linear import PackedLinear, SharedInputPart

ROWS = (1, 2, 4, 8, 16, 32, 64)


def decoder_gemms(model: torch.nn.Module) -> list[PackedLinear]:
    """The packed layers a pass of `model`'s decoder runs, in order (a stacked sibling group once)."""
    gemms: dict[int, PackedLinear] = {}
    for module in model.base_model.modules():  # type: ignore[union-attr]
        layer = module.shared.layer if isinstance(module, SharedInputPart) else module
        if isinstance(layer, PackedLinear):
            gemms.setdefault(id(layer), layer)
    return list(gemms.values())


@torch.inference_mode()
def step_seconds(gemms: list[PackedLinear], rows: int, repeat: int = 9) -> float:
    """Median time to run every layer once over `rows` rows (each layer's input made beforehand)."""
    inputs = [torch.randn(rows, g.in_features) for g in gemms]
    for g, x in zip(gemms, inputs):  # warm-up: oneDNN makes its kernel for each new shape
        g._linear(x)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for g, x in zip(gemms, inputs):
            g._linear(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    engine = wsd_llms.get_runtime(device="cpu").load()
    results, lines = {}, []
    for name, loaded in (("draft", engine.draft), ("base", engine.base)):
        gemms = decoder_gemms(loaded.model)
        flops = 2 * sum(g.in_features * g.out_features for g in gemms)  # per row
        weights = 4 * sum(g.in_features * g.out_features for g in gemms)  # float32 bytes
        runs = {rows: step_seconds(gemms, rows) for rows in ROWS}
        results[name] = {
            "model": loaded.name,
            "layers": len(gemms),
            "gflop_per_row": flops / 1e9,
            "weight_mb": weights / 1e6,
            "seconds": {str(r): s for r, s in runs.items()},
        }
        for rows, seconds in runs.items():
            lines.append(
                f"| {name} ({loaded.name}) | {rows} | {1000 * seconds:.1f} | {seconds / runs[1]:.2f}x | "
                f"{1000 * seconds / rows:.2f} | {flops * rows / seconds / 1e9:.0f} | {weights / seconds / 1e9:.0f} |"
            )
    table = "\n".join(
        [
            "| model | rows | linear layers of a step (ms) | vs 1 row | per row (ms) | GFLOP/s | weights streamed (GB/s) |",
            "|---|---|---|---|---|---|---|",
            *lines,
            "",
            "float32, the oneDNN kernels of each decoder's packed layers (siblings stacked) for each row count, run in",
            f"order over random inputs; medians of 9. Per row: draft {results['draft']['gflop_per_row']:.2f} GFLOP over "
            f"{results['draft']['weight_mb']:.0f} MB of weights, base {results['base']['gflop_per_row']:.2f} GFLOP over "
            f"{results['base']['weight_mb']:.0f} MB.",
        ]
    )
    write("gemm", {"dtype": "float32", "rows": list(ROWS), "models": results}, table)


if __name__ == "__main__":
    main()
