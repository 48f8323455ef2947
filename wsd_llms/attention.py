"""Attention for the runner's passes: which SDPA kernels CUDA may use, and the per-row attention of
ragged decode steps on CPU (registered with transformers as RAGGED_SDPA)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask


# Attention kernels for passes on CUDA: all but cuDNN's. On an H200 (torch 2.11) SDPA chose cuDNN for
# bfloat16, whose calls cost 1-1.7 ms of CPU each against microseconds of GPU work: 58% of a
# single stream's time and half of 16 streams' in the profile. The others take microseconds.
CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The attention kernels a pass on `device` may use (sdpa_kernel sets them process-wide while it lasts)."""
    return sdpa_kernel(CUDA_ATTENTION) if device.type == "cuda" else contextlib.nullcontext()


class RaggedStates:
    """The keys (or values) a layer hands attention in a ragged decode pass: each row's own cache
    [1, heads, length, dim], of its own length."""

    def __init__(self, rows: list[torch.Tensor]) -> None:
        self.rows = rows


def ragged_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | RaggedStates,
    value: torch.Tensor | RaggedStates,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except in a ragged decode pass (ModelRunner.extend_batch):
    there each row's one new query attends over its own cache exactly as in a decode step of that
    row alone (the same call, with the sliding-window mask it would get), so nothing is copied
    into a batch or padded, and the row gets the bits it would get alone."""
    if not isinstance(key, RaggedStates) or not isinstance(value, RaggedStates):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    outputs = []
    for row, (keys, values) in enumerate(zip(key.rows, value.rows)):
        length = keys.shape[-2]
        mask = None  # a lone decode step needs none, unless the window leaves out early positions
        if window and length > window:
            mask = (torch.arange(length, device=keys.device) >= length - window).view(1, 1, 1, length)
        out, _ = sdpa_attention_forward(module, query[row : row + 1], keys, values, mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs)
        outputs.append(out)
    return torch.cat(outputs), None


# Registered beside transformers' own: models the runner uses on CPU with SDPA attention switch to
# it (every other pass is plain SDPA, with SDPA's masks).
RAGGED_SDPA = "wsd_ragged_sdpa"
AttentionInterface.register(RAGGED_SDPA, ragged_sdpa)
AttentionMaskInterface.register(RAGGED_SDPA, sdpa_mask)
