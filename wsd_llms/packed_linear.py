"""CPU linear layers on oneDNN with weights prepacked once at load.

For the few rows of a decode step or scoring pass, MKL's kernel behind `F.linear` is slow (an 8-row
output projection costs 2.4x a 1-row one on the 2-core CI machine) and its result for a row
depends on how many rows share the call. oneDNN with a prepacked weight is 2-3x faster there,
an 8-row step costs about 1.2x a single one, and each row's result is bit-identical whatever the
batch: batched serving and one-at-a-time serving compute the same numbers
(benchmarks/bench_passes.py). PyTorch's own compiler packs CPU linears the same way.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import torch

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def can_pack(weight: torch.Tensor) -> bool:
    """Whether this PyTorch build can run `weight` as a oneDNN packed linear (a CPU weight of a packable dtype)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

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
