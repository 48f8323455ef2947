"""CPU linear layers on oneDNN with weights prepacked once at load.

For the few rows of a decode step or scoring pass, MKL's float32 kernel behind `nn.Linear` is
slow, and its result for a row depends on how many rows share the call. oneDNN with a prepacked
weight is several times faster there (the embedded base's 8-row output projection: 69 ms against
17 ms; a whole decode step of 8 now costs 1.2-1.5x a single one, benchmarks/bench_passes.py), and
each row's result is bit-identical whatever the batch (fewer than MIN_ROWS rows are fed as that
many, see forward), so batched serving and one-at-a-time serving compute the same numbers.
torch.compile's CPU freezing packs linear layers the same way.

Sibling layers that read the same input (an attention layer's query, key and value projections;
an MLP's gate and up projections) run as one GEMM over their weights stacked (`SharedInput`): one
call instead of three streams the same weights faster (a draft decode step's linear layers: 13.2 ->
10.3 ms), and each layer's output keeps its bits.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .errors import user_stacklevel

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def can_pack(weight: torch.Tensor) -> bool:
    """Whether `weight` can run as a oneDNN packed linear: a CPU weight of a packable dtype, on a
    PyTorch build whose oneDNN linear gives the same numbers as `nn.Linear`."""
    return weight.device.type == "cpu" and weight.dtype in PACKABLE_DTYPES and _onednn_linear_works(weight.dtype)


@functools.cache
def _onednn_linear_works(dtype: torch.dtype) -> bool:
    """Probe the oneDNN ops once per dtype (they are PyTorch internals): present, and matching `nn.Linear`."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16 and not _cpu_runs_bfloat16():
        return False  # no warning: a CPU without bfloat16 instructions is expected, not a failure
    generator = torch.Generator().manual_seed(0)
    linear = linear_of(torch.randn(48, 64, generator=generator).div(8).to(dtype), torch.randn(48, generator=generator).to(dtype))
    x = torch.randn(5, 64, generator=generator).to(dtype)
    try:
        with torch.inference_mode():
            packed, plain = PackedLinear(linear)(x), linear(x)
    except RuntimeError as exc:
        warnings.warn(f"oneDNN linear layers failed a self-check ({exc}); CPU linear layers stay on nn.Linear", RuntimeWarning, stacklevel=user_stacklevel())
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return torch.allclose(packed.float(), plain.float(), atol=tolerance, rtol=tolerance)


def _cpu_runs_bfloat16() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX512-BW/VL/DQ or AVX-NE-CONVERT; an AVX2
    CPU has none, and its bfloat16 layers stay on nn.Linear)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return check is None or bool(check())  # without the check, the probe's own error decides


# A layer is fed at least this many rows: oneDNN's kernels for fewer run slower on this machine
# (benchmarks/bench_gemm.py: a draft step's linear layers take 24.7 ms for one row, 22.5 for two and
# 16.4 for four; a lone stream served 1.11x the tokens/s padded, 8 at a time 1.03x) and its one-row
# kernel sums the long rows of some shapes (down projections) in another order than its many-row
# ones. From two rows up a row gets the same bits in any batch (tests/test_model_runner.py), so
# padding keeps a lone row's bits a batched one's.
MIN_ROWS = 4


class PackedLinear(torch.nn.Module):
    """`nn.Linear` computed by oneDNN from a copy of its weight in oneDNN's own layout.

    The dense weight is not kept: the layer's memory stays the same unless the weight is shared
    (a tied output projection keeps the input embedding's copy).
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = linear.bias

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear:
        """A packed layer computing `x @ weight.T + bias` (the weight is copied into oneDNN's layout)."""
        return cls(linear_of(weight, bias))

    @classmethod
    def stacked(cls, linears: list[torch.nn.Linear]) -> PackedLinear:
        """One layer computing all of `linears` (same input size and dtype), their outputs side by side."""
        biases = [linear.bias for linear in linears]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])  # type: ignore[union-attr]
        return cls.of(torch.cat([linear.weight.detach() for linear in linears]), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows >= MIN_ROWS:
            return self._linear(x.contiguous())
        flat = x.reshape(rows, -1)
        fed = torch.cat([flat, flat[:1].expand(MIN_ROWS - rows, -1)])  # its first row again
        return self._linear(fed)[:rows].reshape(*x.shape[:-1], self.out_features)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def linear_of(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """An `nn.Linear` around these tensors (made on the meta device: no weights drawn and thrown away)."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias, requires_grad=False)
    return linear


class SharedInput:
    """Sibling linear layers that read the same input, computed as one GEMM (`PackedLinear.stacked`).

    The first of them called with an input computes every sibling's output; the others, called
    with that same tensor, take their part of it. Once each has taken its part the GEMM's output
    is let go, so nothing outlives the forward pass. What a pass holds is its thread's own, so
    threads that run one model at once (two runtimes over the same loaded model) do not mix.
    """

    def __init__(self, linears: list[torch.nn.Linear]) -> None:
        self.layer = PackedLinear.stacked(linears)
        self.spans = self.spans_of(linears)
        self._pass = threading.local()  # .input, .output, .untaken: the current pass in this thread

    @staticmethod
    def spans_of(linears: list[torch.nn.Linear]) -> list[tuple[int, int]]:
        """Where each layer's outputs lie in the stacked layer's: (start, end) columns."""
        ends = list(itertools.accumulate(linear.out_features for linear in linears))
        return [(end - linear.out_features, end) for linear, end in zip(linears, ends)]

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Sibling `index`'s output for `x`."""
        now = self._pass
        if getattr(now, "input", None) is not x:
            now.output, now.input, now.untaken = self.layer(x), x, set(range(len(self.spans)))
        output = now.output
        now.untaken.discard(index)
        if not now.untaken:
            now.input = now.output = None
        start, end = self.spans[index]
        return output[..., start:end]


class SharedInputPart(torch.nn.Module):
    """One sibling of a `SharedInput`, standing where its `nn.Linear` stood."""

    def __init__(self, shared: SharedInput, index: int, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.shared, self.index = shared, index
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(self.index, x)

    def extra_repr(self) -> str:
        start, end = self.shared.spans[self.index]
        return f"in_features={self.in_features}, out_features={self.out_features}, columns {start}:{end} of a shared GEMM"


def pack_linears(model: Any, probe: Callable[[], Any] | None = None) -> int:
    """Swap each plain `nn.Linear` of a CPU model for a `PackedLinear`; returns how many were swapped.

    With `probe` (a forward pass of the model), siblings that read the same input during it share
    one GEMM (`SharedInput`) where oneDNN gives each of them its own bits that way. Layers that
    cannot be packed (another device or dtype, or a build without oneDNN) stay as they are.
    """
    linears = [
        (module, name, child)
        for module in list(model.modules())
        for name, child in list(module.named_children())
        if type(child) is torch.nn.Linear and can_pack(child.weight)
    ]
    groups = [group for group in (_shared_input_groups(linears, probe) if probe is not None and linears else []) if _stacking_exact(group)]
    grouped = {id(child) for group in groups for _, _, child in group}
    for module, name, child in linears:
        if id(child) not in grouped:
            setattr(module, name, PackedLinear(child))
    for group in groups:
        shared = SharedInput([child for _, _, child in group])
        for index, (module, name, child) in enumerate(group):
            setattr(module, name, SharedInputPart(shared, index, child))
    if groups:
        try:
            with torch.inference_mode():
                probe()  # type: ignore[misc]
        except RuntimeError:  # the model reshapes a layer's output in a way a column slice cannot take
            for module, name, child in (sibling for group in groups for sibling in group):
                setattr(module, name, PackedLinear(child))
    if linears:
        _release_replaced_weights(model)
    return len(linears)


Sibling = tuple[Any, str, torch.nn.Linear]  # (parent module, attribute name, the layer)


def _shared_input_groups(linears: list[Sibling], probe: Callable[[], Any]) -> list[list[Sibling]]:
    """Siblings (same parent, dtype, and bias or none) that each read one same tensor, once, in
    `probe`, with nothing writing to it between their reads."""
    reads: dict[int, list[torch.Tensor]] = {}
    first_seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (the tensor, its values when first read)
    written: set[int] = set()

    def record(layer: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not args:  # called with keywords only: left out of any group
            return
        x = args[0]
        reads.setdefault(id(layer), []).append(x)
        if id(x) not in first_seen:
            first_seen[id(x)] = (x, x.clone())
        elif not torch.equal(x, first_seen[id(x)][1]):
            written.add(id(x))

    hooks = [child.register_forward_pre_hook(record) for _, _, child in linears]
    try:
        with torch.inference_mode():
            probe()
    except Exception:  # noqa: BLE001 - a model the probe cannot run keeps one GEMM per layer
        return []
    finally:
        for hook in hooks:
            hook.remove()
    by_input: dict[tuple[int, int, torch.dtype, bool], list[Sibling]] = {}
    for sibling in linears:
        module, _, child = sibling
        inputs = reads.get(id(child), [])
        if len(inputs) == 1 and id(inputs[0]) not in written:  # the tensors stay referenced, so no id is reused
            key = (id(module), id(inputs[0]), child.weight.dtype, child.bias is not None)
            by_input.setdefault(key, []).append(sibling)
    return [group for group in by_input.values() if len(group) > 1]


_STACKING_EXACT: dict[tuple[int, tuple[int, ...], torch.dtype, bool], bool] = {}


def _stacking_exact(group: list[Sibling]) -> bool:
    """Whether oneDNN gives each layer of this shape of group the bits it gets alone when their
    weights are stacked, for one row and several (random layers of the same shapes answer for all)."""
    children = [child for _, _, child in group]
    dtype, bias = children[0].weight.dtype, children[0].bias is not None
    key = (children[0].in_features, tuple(child.out_features for child in children), dtype, bias)
    if key not in _STACKING_EXACT:
        generator = torch.Generator().manual_seed(0)  # not the global one: loading a model draws no user randomness
        layers = [
            linear_of(
                torch.randn(n, key[0], generator=generator).div(key[0] ** 0.5).to(dtype),
                torch.randn(n, generator=generator).to(dtype) if bias else None,
            )
            for n in key[1]
        ]
        x = torch.randn(5, key[0], generator=generator).pow(3).mul(8).to(dtype)  # heavy-tailed, like activations
        stacked, alone = PackedLinear.stacked(layers), [PackedLinear(layer) for layer in layers]
        spans = SharedInput.spans_of(layers)
        with torch.inference_mode():
            _STACKING_EXACT[key] = all(
                torch.equal(stacked(x[:m])[:, start:end], layer(x[:m])) for m in (1, 5) for layer, (start, end) in zip(alone, spans)
            )
    return _STACKING_EXACT[key]


def _release_replaced_weights(model: Any) -> None:
    """Let the memory of the dense weights just replaced go back to the OS.

    A model loaded from safetensors maps its file, and the mapping stays resident, the replaced
    weights' pages included, while any tensor still points into it: so the remaining weights
    (embeddings, norms) are copied out. Weights made in memory (converted at load) are freed to
    the heap, where glibc keeps blocks of a few MB for reuse: trim it.
    """
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, whatever mode the caller is in
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)
        if hasattr(libc, "malloc_trim"):  # glibc; musl has no such call and returns memory itself
            libc.malloc_trim(0)
