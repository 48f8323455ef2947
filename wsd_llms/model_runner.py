"""Forward passes of one causal LM over per-sequence KV caches: plain tensors, no decoding logic.

This is the seam between the WSD algorithm and the thing that runs models (DESIGN 5): another
backend (a distributed serving engine) implements the same four methods.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

from .loading import LoadedModel


class KVCache:
    """One sequence's cache and the token ids it holds."""

    def __init__(self) -> None:
        self.cache = DynamicCache()
        self.ids: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)


class ModelRunner:
    """Runs a loaded model: extend a cache with ids and return float32 logits."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model: Any = loaded.model
        self.device = loaded.device
        # transformers renamed `past_key_values` to `cache` in its 5.x forward signatures.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

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
    def extend_batch(self, kvs: list[KVCache], tokens: list[int]) -> torch.Tensor:
        """Feed one token to each of several non-empty caches in one forward pass; logits [B, V].

        The caches are left-padded into one batch (padding masked out, positions per row), and
        each row's new key/value states are appended back to its own cache.
        """
        if len(kvs) == 1:
            return self.extend(kvs[0], tokens)[None]
        lengths = [len(kv) for kv in kvs]
        width = max(lengths)
        batch = DynamicCache()
        for layer_idx, first in enumerate(kvs[0].cache.layers):
            shape = (len(kvs), first.keys.shape[1], width, first.keys.shape[3])
            keys, values = first.keys.new_zeros(shape), first.values.new_zeros(shape)
            for row, (kv, n) in enumerate(zip(kvs, lengths)):
                layer = kv.cache.layers[layer_idx]
                keys[row, :, width - n :] = layer.keys[0]
                values[row, :, width - n :] = layer.values[0]
            batch.update(keys, values, layer_idx)
        mask = torch.ones(len(kvs), width + 1, dtype=torch.long, device=self.device)
        for row, n in enumerate(lengths):
            mask[row, : width - n] = 0
        out = self.model(
            input_ids=torch.tensor(tokens, device=self.device)[:, None],
            attention_mask=mask,
            position_ids=torch.tensor(lengths, device=self.device)[:, None],
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: batch},
        )
        for layer_idx, layer in enumerate(batch.layers):
            for row, kv in enumerate(kvs):
                kv.cache.update(layer.keys[row : row + 1, :, -1:], layer.values[row : row + 1, :, -1:], layer_idx)
        for kv, token in zip(kvs, tokens):
            kv.ids.append(token)
        return out.logits[:, -1].float()

    @staticmethod
    def crop(kv: KVCache, length: int) -> None:
        """Keep only the first `length` positions of the cache."""
        drop = len(kv.ids) - length
        if drop > 0:
            kv.cache.crop(-drop)
            del kv.ids[length:]
