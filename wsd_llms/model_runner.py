"""Forward passes of one causal LM over per-sequence KV caches: plain tensors, no decoding logic.

This is the seam between the WSD algorithm and the thing that runs models (DESIGN 5): another
backend (a distributed serving engine) implements the same methods: new_cache, extend,
extend_batch, crop, and head_cost (for the scheduler's cost model).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .loading import LoadedModel


class GrowingLayer(DynamicLayer):
    """A cache layer that appends into spare capacity, doubling it when full.

    transformers' DynamicLayer concatenates the whole cache for every token it appends, which
    makes a decode step's cache work grow with the sequence length for every layer and sequence.
    """

    _storage: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._storage = None
        held = self.get_seq_length()
        end = held + key_states.shape[-2]
        if self._storage is None or end > self._storage[0].shape[-2]:
            capacity = max(2 * end, 64)
            grown = []
            for old, new in ((self.keys, key_states), (self.values, value_states)):
                buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
                if held:
                    buffer[..., :held, :] = old
                grown.append(buffer)
            self._storage = (grown[0], grown[1])
        keys, values = self._storage
        keys[..., held:end, :] = key_states
        values[..., held:end, :] = value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        return self.keys, self.values


def growing_layer(keys: torch.Tensor, values: torch.Tensor, length: int) -> GrowingLayer:
    """A layer holding the first `length` positions of ready-made buffers; it grows into the rest."""
    layer = GrowingLayer()
    layer.lazy_initialization(keys, values)
    layer._storage = (keys, values)
    layer.keys, layer.values = keys[..., :length, :], values[..., :length, :]
    return layer


class KVCache:
    """One sequence's cache and the token ids it holds."""

    def __init__(self) -> None:
        self.cache = DynamicCache()
        self.cache.layer_class_to_replicate = GrowingLayer
        self.ids: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)


class RowsFirstLinear(torch.nn.Module):
    """A wide output projection computed as `weight @ x.T` on CPU.

    For a few rows times a vocabulary-sized matrix, MKL's kernel behind `F.linear` runs 2-5x
    slower than the transposed product, and a lone row is faster padded to two
    (benchmarks/bench_passes.py). The output projection is most of a small model's decode step.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if n == 1:
            rows = torch.cat([rows, rows])
        out = (self.linear.weight @ rows.T).T[:n]
        if self.linear.bias is not None:
            out = out + self.linear.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def use_rows_first_head(model: Any) -> None:
    """Swap a CPU model's output projection for `RowsFirstLinear` (same weights, shared if tied)."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.weight.device.type == "cpu":
        model.set_output_embeddings(RowsFirstLinear(head))


class ModelRunner:
    """Runs a loaded model: extend a cache with ids and return float32 logits."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model: Any = loaded.model
        self.device = loaded.device
        use_rows_first_head(self.model)
        # transformers renamed `past_key_values` to `cache` in its 5.x forward signatures.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def head_cost(self) -> float:
        """The output projection's cost for one row, relative to one token through the layers."""
        head = self.model.get_output_embeddings()
        head_weight = getattr(head.linear if isinstance(head, RowsFirstLinear) else head, "weight", None)
        embed_weight = getattr(self.model.get_input_embeddings(), "weight", None)
        if not isinstance(head_weight, torch.Tensor) or not isinstance(embed_weight, torch.Tensor):
            return 1.0  # an unusual model: count the head like one more token
        total = sum(p.numel() for p in self.model.parameters())  # a tied weight is counted once
        body = total - embed_weight.numel() - (0 if head_weight is embed_weight else head_weight.numel())
        return head_weight.numel() / max(body, 1)

    def new_cache(self) -> KVCache:
        return KVCache()

    @torch.inference_mode()
    def extend(self, kv: KVCache, ids: list[int], keep: int = 0) -> torch.Tensor:
        """Feed `ids` after what `kv` holds; float32 logits [V] for the last position, or [keep, V]."""
        if not ids:
            raise ValueError("extend() needs at least one id")
        input_ids = torch.tensor([ids], device=self.device)
        out = self.model(
            input_ids=input_ids,
            **{self._cache_kw: kv.cache},
            use_cache=True,
            logits_to_keep=max(keep, 1),
        )
        kv.ids.extend(ids)
        logits = out.logits[0].float()
        return logits if keep else logits[-1]

    @torch.inference_mode()
    def extend_batch(self, kvs: list[KVCache], ids: list[list[int]], keeps: list[int]) -> list[torch.Tensor]:
        """Feed each cache its own ids in one forward pass; per row, what `extend` would return.

        Rows are right-aligned and left-padded, so every row's tokens stay contiguous and relative
        distances (sliding windows, RoPE) are exact. A row with fewer new ids than the widest
        re-feeds its last cached tokens in the slots it would otherwise pad: the same compute, and
        no hole between its cache and its new tokens. Only the new tokens' key/value states are
        appended back to each row's own cache.
        """
        if len(kvs) == 1:
            return [self.extend(kvs[0], ids[0], keeps[0])]
        if any(not row for row in ids):
            raise ValueError("extend_batch() needs at least one id per row")
        width = max(len(row) for row in ids)
        # Stored positions each row attends to: its cache less the tokens it re-feeds to fill the width.
        cached = [max(len(kv) + len(row) - width, 0) for kv, row in zip(kvs, ids)]
        span = max(cached)
        batch = DynamicCache()
        batch.layer_class_to_replicate = GrowingLayer
        if span:  # room for this pass's states too, so the model appends in place
            template = kvs[cached.index(span)].cache.layers
            for layer_idx in range(len(template)):
                first = template[layer_idx].keys
                shape = (len(kvs), first.shape[1], span + width, first.shape[3])
                keys, values = first.new_zeros(shape), first.new_zeros(shape)
                for row, (kv, n) in enumerate(zip(kvs, cached)):
                    if n:
                        layer = kv.cache.layers[layer_idx]
                        keys[row, :, span - n : span] = layer.keys[0, :, :n]
                        values[row, :, span - n : span] = layer.values[0, :, :n]
                batch.layers.append(growing_layer(keys, values, span))
        inputs = torch.zeros(len(kvs), width, dtype=torch.long)
        positions = torch.zeros(len(kvs), width, dtype=torch.long)
        mask = torch.zeros(len(kvs), span + width, dtype=torch.long)
        for row, (kv, new, n) in enumerate(zip(kvs, ids, cached)):
            fed = kv.ids[n:] + new
            inputs[row, width - len(fed) :] = torch.tensor(fed)
            positions[row, width - len(fed) :] = torch.arange(n, n + len(fed))
            mask[row, span - n :] = 1
            mask[row, span : span + width - len(fed)] = 0
        keep = max(max(keeps), 1)
        out = self.model(
            input_ids=inputs.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            logits_to_keep=keep,
            **{self._cache_kw: batch},
        )
        for layer_idx, layer in enumerate(batch.layers):
            for row, (kv, new) in enumerate(zip(kvs, ids)):  # GrowingLayer copies them into its buffer
                kv.cache.update(layer.keys[row : row + 1, :, -len(new) :], layer.values[row : row + 1, :, -len(new) :], layer_idx)
        logits = out.logits.float()
        results = []
        for row, (kv, new, k) in enumerate(zip(kvs, ids, keeps)):
            kv.ids.extend(new)
            results.append(logits[row, keep - k :] if k else logits[row, -1])
        return results

    @staticmethod
    def crop(kv: KVCache, length: int) -> None:
        """Keep only the first `length` positions of the cache."""
        drop = len(kv.ids) - length
        if drop > 0:
            kv.cache.crop(-drop)
            del kv.ids[length:]
