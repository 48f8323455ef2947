"""Per-sequence KV caches: every layer's keys and values in one growing buffer each, handed to
transformers as cache layers, and the layers of a ragged pass over several such caches."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .attention import RaggedRows, RaggedStates


class KVStore:
    """Every layer's keys, and every layer's values, of one cache in one buffer each:
    [layers, batch, heads, capacity, head_dim] (keys and values may differ in head_dim).

    With one buffer per kind, a batch is assembled and its new states are handed back with two
    copies per sequence rather than two per layer and sequence (on a GPU, each copy is a kernel
    launch). Appends go into spare capacity, which doubles when full (transformers' DynamicLayer
    instead concatenates the whole cache for every token it appends), but never past `limit`
    positions, the most its sequence can hold, unless asked to. A batch's own store, which lives
    for one pass, is made to measure (`spare=False`).
    """

    def __init__(self, num_layers: int = 0, spare: bool = True, limit: int | None = None) -> None:
        self.num_layers = num_layers
        self.spare = spare
        self.limit = limit
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        # Counts writes, so that a copy of the states (a graph's slot, decode_graphs) can tell whether
        # its first positions still hold the cache as it is (a crop only shortens it).
        self.edits = 0

    def room(self, end: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (keys, values) buffers, made or grown to hold `end` positions of states like these [batch, heads, n, dim]."""
        buffers = self.buffers
        if buffers is not None:
            for buffer, like in zip(buffers, (keys, values)):
                if (buffer.shape[1], buffer.shape[2], buffer.shape[4]) != (like.shape[0], like.shape[1], like.shape[3]):
                    raise ValueError(
                        f"key/value states of shape {tuple(like.shape)} do not fit a cache of {buffer.shape[2]} heads "
                        f"of size {buffer.shape[4]}: models whose layers differ in key/value shape are not supported"
                    )
            if end <= buffers[0].shape[-2]:
                return buffers
        if not self.num_layers:
            raise RuntimeError("a KVStore needs its number of layers before it holds states")
        capacity = max(2 * end, 64) if self.spare else end
        if self.limit is not None:
            capacity = max(end, min(capacity, self.limit))
        grown = []
        for i, like in enumerate((keys, values)):
            buffer = like.new_empty(self.num_layers, like.shape[0], like.shape[1], capacity, like.shape[3])
            if buffers is not None:
                buffer[..., : buffers[i].shape[-2], :] = buffers[i]
            grown.append(buffer)
        self.buffers = (grown[0], grown[1])
        return self.buffers


class GrowingLayer(DynamicLayer):
    """One layer of a transformers cache whose states are the first `length` positions of its KVStore slots."""

    def __init__(self, store: KVStore, index: int, length: int = 0) -> None:  # no super(): keys are views
        self.store, self.index, self.length = store, index, length
        self._slot: tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor] | None = None
        self._checked = False  # whether this layer's states were checked against the store's shape

    def _views(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's whole key and value slots [batch, heads, capacity, dim], cached until the store grows."""
        buffers = self.store.buffers
        if buffers is None:
            return None
        if self._slot is None or self._slot[0] is not buffers:
            self._slot = (buffers, buffers[0][self.index], buffers[1][self.index])
        return self._slot[1], self._slot[2]

    @property
    def is_initialized(self) -> bool:  # type: ignore[override]
        return self.store.buffers is not None

    @property
    def device(self) -> torch.device | None:  # type: ignore[override]
        return None if self.store.buffers is None else self.store.buffers[0].device

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        views = self._views()
        return None if views is None else views[0][:, :, : self.length]

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        views = self._views()
        return None if views is None else views[1][:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + key_states.shape[-2]
        views = self._views()
        if views is None or not self._checked or end > views[0].shape[-2]:  # else no room to make, nothing to check
            self.store.room(end, key_states, value_states)
            self._checked = True
            views = self._views()
        keys, values = views  # type: ignore[misc]
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        self.length = end
        self.store.edits += 1
        return keys[:, :, :end], values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` positions (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop() takes a negative count of positions to remove, got {tokens_to_remove}")
        self.length = max(self.length + tokens_to_remove, 0)  # the states before are unchanged: no edit


class RaggedLayer(DynamicLayer):
    """One layer of a ragged pass: each row's new states go straight into that row's own cache."""

    is_initialized = True

    def __init__(self, layers: list[GrowingLayer], layout: RaggedRows) -> None:  # no super(): the rows' layers hold the states
        self.layers, self.layout = layers, layout

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        keys, values = [], []
        counts = self.layout.counts
        for layer, new_keys, new_values in zip(self.layers, key_states.split(counts, dim=2), value_states.split(counts, dim=2)):
            k, v = layer.update(new_keys, new_values)
            keys.append(k)
            values.append(v)
        return RaggedStates(keys, self.layout), RaggedStates(values, self.layout)

    def get_seq_length(self) -> int:
        return max(layer.length for layer in self.layers)


class LayerFactory:
    """Makes a cache's layers as transformers asks for them, numbered in order, all on one store."""

    def __init__(self, store: KVStore, length: int = 0) -> None:
        self.store, self.length, self.made = store, length, 0

    def __call__(self) -> GrowingLayer:
        self.made += 1
        return GrowingLayer(self.store, self.made - 1, self.length)


class KVCache:
    """One sequence's cache and the token ids it holds; its spare room stops at `limit` positions."""

    def __init__(self, limit: int | None = None) -> None:
        self.store = KVStore(limit=limit)
        self.cache = DynamicCache()
        self.layer_factory = LayerFactory(self.store)
        self.cache.layer_class_to_replicate = self.layer_factory  # type: ignore[assignment]
        self.ids: list[int] = []
        self.cuts: list[int] = []  # where the whole prefill pieces fed or restored from the start end (prefix_cache)
        self.piece_size = 0  # the prefill_chunk those pieces were cut with

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def pieces(self) -> int:
        """Leading positions held as whole prefill pieces."""
        return self.cuts[-1] if self.cuts else 0

    def whole_pieces(self, start: int, chunk: int) -> bool:
        """Whether the first `start` positions are whole pieces cut with `chunk` (a piece may follow them)."""
        return start == self.pieces and (start == 0 or self.piece_size == chunk)

    def crop(self, length: int) -> None:
        """Keep only the first `length` positions, and forget the pieces that end past them."""
        drop = len(self.ids) - length
        if drop > 0:
            self.cache.crop(-drop)
            del self.ids[length:]
            while self.cuts and self.cuts[-1] > length:
                self.cuts.pop()

    def fill_layers(self, count: int) -> list[GrowingLayer]:
        """All `count` layers, making those transformers has not asked for yet (the store learns the count)."""
        self.store.num_layers = self.store.num_layers or count
        layers = self.cache.layers
        while len(layers) < count:
            layers.append(self.layer_factory())
        return layers  # type: ignore[return-value]


def append_states(kvs: list[KVCache], ids: list[list[int]], states: list[tuple[torch.Tensor, torch.Tensor]], num_layers: int) -> None:
    """Append to each cache its new ids and their keys and values ([layers, heads, n, dim] each, read
    from a batched pass's buffers): two copies per row. Room is made in every row first: if that
    fails (out of memory), no row has changed and each can be retried alone."""
    for kv, new, (keys, values) in zip(kvs, ids, states):
        kv.store.num_layers = kv.store.num_layers or num_layers
        kv.store.room(len(kv) + len(new), keys[0].unsqueeze(0), values[0].unsqueeze(0))
    for kv, new, (keys, values) in zip(kvs, ids, states):
        held, end = len(kv), len(kv) + len(new)
        own = kv.store.buffers
        assert own is not None
        own[0][:, 0, :, held:end] = keys
        own[1][:, 0, :, held:end] = values
        kv.store.edits += 1
        for layer in kv.fill_layers(num_layers):
            layer.length = end
        kv.ids.extend(new)
