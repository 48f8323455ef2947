"""Attention for the runner's passes: which SDPA kernels CUDA may use, the per-row attention of
ragged passes on CPU, and the masked attention over fixed slots of graphed passes on CUDA
(both registered with transformers as WSD_SDPA)."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import torch
import torch.nn.functional as F
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


class RaggedRows:
    """Where each row of a ragged pass sits: its new tokens are `counts[row]` positions from
    `starts[row]` of the flattened sequence. A `stepwise` row's queries attend one at a time, each
    as a decode step of its own would (a decode step with guessed ids after it: its rows and its
    cache get the bits that feeding its ids one per pass gives). Row masks are made once per pass
    and window."""

    def __init__(self, counts: list[int], stepwise: list[bool] | None = None) -> None:
        self.counts = counts
        self.stepwise = stepwise or [False] * len(counts)
        self.starts = [0, *itertools.accumulate(counts)][:-1]
        self.masks: dict[tuple[int, int | None], tuple[torch.Tensor | None, bool]] = {}

    def mask(self, row: int, length: int, window: int | None, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(attention mask, is_causal) for `row`'s new tokens over its `length` cached positions.

        A decode step, or a first prefill, within the window needs no mask; otherwise the mask lets
        each new token see the positions up to its own, and no further back than the window.
        """
        key = (row, window)
        if key not in self.masks:
            count, within = self.counts[row], not window or length <= window
            if within and (count == 1 or count == length):
                self.masks[key] = (None, count > 1)
            else:
                query = torch.arange(length - count, length, device=device).view(-1, 1)
                position = torch.arange(length, device=device).view(1, -1)
                allowed = position <= query
                if window:
                    allowed &= position > query - window
                self.masks[key] = (allowed.view(1, 1, count, length), False)
        return self.masks[key]


class RaggedStates:
    """The keys (or values) a layer hands attention in a ragged pass: each row's own cache
    [1, heads, length, dim], of its own length, and where the row's queries sit."""

    def __init__(self, rows: list[torch.Tensor], layout: RaggedRows) -> None:
        self.rows = rows
        self.layout = layout


class SlotLayout:
    """Where each row of a slot pass (decode_graphs) writes and reads: row b's new tokens sit at
    `positions[b]` of its slot, and each sees that slot's positions up to its own; `fed[b]` says
    which of them are the row's own (the rest pad it to the pass's width). Masks are made once per
    pass and window, from these tensors alone, so a captured graph recomputes them on replay."""

    def __init__(self, positions: torch.Tensor, fed: torch.Tensor, capacity: int) -> None:
        self.positions, self.capacity = positions, capacity
        self.padding = ~fed.view(positions.shape[0], 1, positions.shape[1], 1)  # [batch, 1, width, 1], as states are laid out
        self.masks: dict[tuple[int | None, int], torch.Tensor] = {}

    def mask(self, window: int | None, groups: int = 1) -> torch.Tensor:
        """[batch, 1, groups * width, capacity]: which slot positions each row's queries see, repeated
        for the `groups` query heads that share a key/value head (their queries go in one after another)."""
        if (window, groups) not in self.masks:
            rows, width = self.positions.shape
            keys = torch.arange(self.capacity, device=self.positions.device).view(1, 1, -1)
            query = self.positions.view(rows, width, 1)
            allowed = keys <= query
            if window:
                allowed &= keys > query - window
            self.masks[window, groups] = allowed.view(rows, 1, width, self.capacity).repeat(1, 1, groups, 1)
        return self.masks[window, groups]


class SlotStates:
    """The keys (or values) a layer hands attention in a slot pass: every row's whole slot
    [batch, heads, capacity, dim], and the layout that says which positions each row sees."""

    def __init__(self, states: torch.Tensor, layout: SlotLayout) -> None:
        self.states = states
        self.layout = layout


def wsd_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | RaggedStates | SlotStates,
    value: torch.Tensor | RaggedStates | SlotStates,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except in a ragged pass (ModelRunner on CPU): there the rows'
    new tokens come flattened into one sequence, and each row's queries attend over that row's own
    cache, with one SDPA call per row that does not depend on the other rows; nothing is copied
    into a batch or padded. In a sliding-window layer a row attends over the last positions its
    queries can see (a decode step over a 3000-position cache reads 512, not 3000).

    In a slot pass (decode_graphs), each row's queries attend over its fixed-size slot under a mask
    made from their positions: shapes that do not change from one pass to the next."""
    if isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    if kwargs.get("softcap") is not None:  # Gemma 2's attention logit soft-capping: SDPA has none
        raise ValueError("attention logit soft-capping is not supported by SDPA attention")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if isinstance(key, SlotStates) and isinstance(value, SlotStates):
        rows, heads, width, dim = query.shape
        kv_heads = key.states.shape[1]
        groups = heads // kv_heads
        # The query heads that share a key/value head go in as that head's queries, one after another,
        # so grouped-query attention needs no enable_gqa, which CUDA's memory-efficient kernel cannot
        # take with a mask (it would fall back to the math kernel and copy the keys to every head).
        by_kv_head = query.reshape(rows, kv_heads, groups * width, dim)
        out = F.scaled_dot_product_attention(by_kv_head, key.states, value.states, attn_mask=key.layout.mask(window, groups), scale=scaling)
        return out.reshape(rows, heads, width, dim).transpose(1, 2).contiguous(), None
    assert isinstance(key, RaggedStates) and isinstance(value, RaggedStates)
    grouped = query.shape[1] != key.rows[0].shape[1]  # grouped-query attention: fewer key/value heads
    layout, outputs = key.layout, []
    for row, (queries, keys, values) in enumerate(zip(query.split(layout.counts, dim=2), key.rows, value.rows)):
        if layout.stepwise[row]:
            outputs.append(_stepwise(queries, keys, values, window, scaling, grouped))
            continue
        if window:  # only the positions the row's first query can still see: a sliding layer attends over its window, not the whole cache
            start = keys.shape[-2] - layout.counts[row] - window + 1
            if start > 0:
                keys, values = keys[:, :, start:], values[:, :, start:]
        mask, causal = layout.mask(row, keys.shape[-2], window, keys.device)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=grouped)
        outputs.append(out)  # [1, heads, count, dim]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _stepwise(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int | None, scaling: float | None, grouped: bool) -> torch.Tensor:
    """A row's queries [1, heads, n, dim], the last n positions of its cache, each attending as a
    decode step there does: over the positions up to its own (the last `window` of them in a
    sliding layer), in a call of its own with no mask."""
    count, length = queries.shape[2], keys.shape[-2]
    outputs = []
    for j in range(count):
        end = length - count + 1 + j
        start = max(end - window, 0) if window else 0
        k, v = keys[:, :, start:end], values[:, :, start:end]
        outputs.append(F.scaled_dot_product_attention(queries[:, :, j : j + 1], k, v, scale=scaling, enable_gqa=grouped))
    return torch.cat(outputs, dim=2)


# Registered beside transformers' own: models the runner uses with SDPA attention switch to it on CPU,
# and on CUDA where decode and scoring passes replay graphs (any other pass is plain SDPA, with SDPA's masks).
WSD_SDPA = "wsd_sdpa"
AttentionInterface.register(WSD_SDPA, wsd_sdpa)
AttentionMaskInterface.register(WSD_SDPA, sdpa_mask)
