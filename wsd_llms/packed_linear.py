"""CPU linear layers on oneDNN with weights prepacked once at load.

For the few rows of a decode step or scoring pass, MKL's float32 kernel behind `nn.Linear` is
slow, and its result for a row depends on how many rows share the call. oneDNN with a prepacked
weight is several times faster there (the embedded base's 8-row output projection: 69 ms against
17 ms; a whole decode step of 8 now costs 1.2-1.5x a single one, benchmarks/bench_passes.py), and
each row's result is bit-identical whatever the batch (a lone row is fed as two, see forward),
so batched serving and one-at-a-time serving compute the same numbers. torch.compile's CPU freezing packs linear layers the same way.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import warnings
from typing import Any

import torch

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
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48, dtype=dtype)
    x = torch.randn(5, 64, generator=generator).to(dtype)
    try:
        with torch.inference_mode():
            packed, plain = PackedLinear(linear)(x), linear(x)
    except RuntimeError as exc:
        warnings.warn(f"oneDNN linear layers failed a self-check ({exc}); CPU linear layers stay on nn.Linear", stacklevel=2)
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    return torch.allclose(packed.float(), plain.float(), atol=tolerance, rtol=tolerance)


_ONE_ROW_DIFFERS: dict[tuple[int, int, torch.dtype], bool] = {}


def _one_row_kernel_differs(packed: torch.Tensor, in_features: int, out_features: int, dtype: torch.dtype) -> bool:
    """Whether oneDNN gives a row alone other bits than the same row among others, for this shape
    (oneDNN picks kernels by shape, so the first weight of a shape answers for all). The inputs are
    heavy-tailed, like activations, so that another summation order shows even through bfloat16's
    rounding of the result (with Gaussian inputs it rarely does)."""
    key = (in_features, out_features, dtype)
    if key not in _ONE_ROW_DIFFERS:
        x = torch.randn(16, in_features, generator=torch.Generator().manual_seed(0)).pow(3).mul(8).to(dtype)
        with torch.inference_mode():
            together = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            alone = [torch.ops.mkldnn._linear_pointwise(x[i : i + 1], packed, None, "none", [], "") for i in range(len(x))]
        _ONE_ROW_DIFFERS[key] = not torch.equal(torch.cat(alone), together)
    return _ONE_ROW_DIFFERS[key]


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
        self.one_row_differs = _one_row_kernel_differs(self.packed, self.in_features, self.out_features, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_row_differs and x.numel() == x.shape[-1]:
            # One row goes in as two: for some shapes (down projections, on this machine) oneDNN's
            # one-row kernel sums in another order than its many-row one, and a lone decode step
            # must give the bits a batched one gives.
            rows = x.reshape(1, -1).expand(2, -1).contiguous()
            return self._linear(rows)[:1].reshape(*x.shape[:-1], self.out_features)
        return self._linear(x.contiguous())

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: Any) -> int:
    """Swap each plain `nn.Linear` of a CPU model for a `PackedLinear`; returns how many were swapped.

    Layers that cannot be packed (another device or dtype, or a build without oneDNN) stay as they are.
    """
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and can_pack(child.weight):
                setattr(module, name, PackedLinear(child))
                swapped += 1
    if swapped:
        _release_replaced_weights(model)
    return swapped


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
