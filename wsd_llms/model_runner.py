"""Forward passes of one causal LM over per-sequence KV caches: plain tensors, no decoding logic.

This is the seam between the WSD algorithm and the thing that runs models (DESIGN 5): another
backend (a distributed serving engine) implements the same methods: new_cache, extend,
extend_batch, crop, and head_cost (for the scheduler's cost model).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .loading import LoadedModel
from .packed_linear import PackedLinear, pack_linears


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


class KVStore:
    """Every layer's keys, and every layer's values, of one cache in one buffer each:
    [layers, batch, heads, capacity, head_dim] (keys and values may differ in head_dim).

    With one buffer per kind, a batch is assembled and its new states are handed back with two
    copies per sequence rather than two per layer and sequence (on a GPU, each copy is a kernel
    launch). Appends go into spare capacity, which doubles when full; transformers' DynamicLayer
    instead concatenates the whole cache for every token it appends, but never past `limit`
    positions, the most its sequence can hold, unless asked to. A batch's own store, which lives
    for one pass, is made to measure (`spare=False`).
    """

    def __init__(self, num_layers: int = 0, spare: bool = True, limit: int | None = None) -> None:
        self.num_layers = num_layers
        self.spare = spare
        self.limit = limit
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

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
        self.store.room(end, key_states, value_states)
        keys, values = self._views()  # type: ignore[misc]
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        self.length = end
        return keys[:, :, :end], values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` positions (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop() takes a negative count of positions to remove, got {tokens_to_remove}")
        self.length = max(self.length + tokens_to_remove, 0)


class RaggedLayer(DynamicLayer):
    """One layer of a ragged decode pass: each row's new states go straight into that row's own cache."""

    is_initialized = True

    def __init__(self, layers: list[GrowingLayer]) -> None:  # no super(): the rows' layers hold the states
        self.layers = layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        keys, values = [], []
        for row, layer in enumerate(self.layers):
            k, v = layer.update(key_states[row : row + 1], value_states[row : row + 1])
            keys.append(k)
            values.append(v)
        return RaggedStates(keys), RaggedStates(values)

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
        self.cache.layer_class_to_replicate = LayerFactory(self.store)  # type: ignore[assignment]
        self.ids: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def fill_layers(self, count: int) -> list[GrowingLayer]:
        """All `count` layers, making those transformers has not asked for yet."""
        layers = self.cache.layers
        while len(layers) < count:
            layers.append(self.cache.layer_class_to_replicate())
        return layers  # type: ignore[return-value]


class ModelRunner:
    """Runs a loaded model: extend a cache with ids and return float32 logits."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model: Any = loaded.model
        self.device = loaded.device
        pack_linears(self.model)
        # transformers renamed `past_key_values` to `cache` in its 5.x forward signatures.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.num_layers: int = self.model.config.get_text_config().num_hidden_layers
        self.ragged = self._enable_ragged_decode()

    def _enable_ragged_decode(self) -> bool:
        """On CPU, batch decode steps with per-row attention (ragged_sdpa) where a probe shows a ragged
        step giving what lone steps give; GPUs keep one padded batch, whose single attention call suits
        them better than a launch per row, as do models whose attention reshapes cached states."""
        if self.device.type != "cpu" or self.model.config._attn_implementation not in ("sdpa", RAGGED_SDPA):
            return False
        self.model.set_attn_implementation(RAGGED_SDPA)
        kvs = [self.new_cache() for _ in range(2)]
        lone = []
        try:
            for kv, n in zip(kvs, (3, 6)):
                self.extend(kv, list(range(1, n + 1)))
                lone.append(self.extend(kv, [1]))
                self.crop(kv, n)
            ragged = self._decode_ragged(kvs, [[1], [1]], [0, 0])
        except Exception:  # noqa: BLE001 - any failure means this model cannot take ragged steps
            ragged = []
        if len(ragged) == 2 and all(torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(lone, ragged)):
            return True
        self.model.set_attn_implementation("sdpa")
        return False

    def head_cost(self) -> float:
        """The output projection's cost for one row, relative to one token through the layers."""
        head = self.model.get_output_embeddings()
        embed = getattr(self.model.get_input_embeddings(), "weight", None)
        if not isinstance(head, (torch.nn.Linear, PackedLinear)) or not isinstance(embed, torch.Tensor):
            return 1.0  # an unusual model: count the head like one more token
        packed = sum(m.in_features * m.out_features for m in self.model.modules() if isinstance(m, PackedLinear))
        total = sum(p.numel() for p in self.model.parameters()) + packed  # a tied weight is counted once
        head_size = head.in_features * head.out_features
        tied = getattr(head, "weight", None) is embed  # a packed head has its own copy, counted in `packed`
        body = total - embed.numel() - (0 if tied else head_size)
        return head_size / max(body, 1)

    def new_cache(self) -> KVCache:
        return KVCache()

    @torch.inference_mode()
    def extend(self, kv: KVCache, ids: list[int], keep: int = 0) -> torch.Tensor:
        """Feed `ids` after what `kv` holds; float32 logits [V] for the last position, or [keep, V]."""
        if not ids:
            raise ValueError("extend() needs at least one id")
        input_ids = torch.tensor([ids], device=self.device)
        kv.store.num_layers = kv.store.num_layers or self.num_layers
        with attention_backends(self.device):
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
        if self.ragged and width == 1 and max(keeps) <= 1:
            return self._decode_ragged(kvs, ids, keeps)
        # Stored positions each row attends to: its cache less the tokens it re-feeds to fill the width.
        cached = [max(len(kv) + len(row) - width, 0) for kv, row in zip(kvs, ids)]
        span = max(cached)
        store = KVStore(self.num_layers, spare=False)
        if span:  # room for this pass's states too, so the model appends in place
            like = kvs[cached.index(span)].store.buffers
            assert like is not None
            keys, values = (b.new_empty(b.shape[0], len(kvs), b.shape[2], span + width, b.shape[4]) for b in like)
            store.buffers = (keys, values)
            for row, n in enumerate(cached):  # two copies per row (keys, values), all layers at once
                own = kvs[row].store.buffers
                for part, buffer in enumerate(store.buffers):
                    if n < span:
                        buffer[:, row, :, : span - n] = 0  # masked out, but must not hold NaN
                    if n:
                        buffer[:, row, :, span - n : span] = own[part][:, 0, :, :n]  # type: ignore[index]
        batch = DynamicCache()
        batch.layer_class_to_replicate = factory = LayerFactory(store, span)  # type: ignore[assignment]
        if span:  # transformers reads the past length off the first layer
            batch.layers.extend(factory() for _ in range(self.num_layers))
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
        with attention_backends(self.device):
            out = self.model(
                input_ids=inputs.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                use_cache=True,
                logits_to_keep=keep,
                **{self._cache_kw: batch},
            )
        assert store.buffers is not None
        batch_keys, batch_values = store.buffers
        # Hand each row its new states, two copies per row. Make room in every row first: if that
        # fails (out of memory), no row has changed and each can be retried alone.
        for row, (kv, new) in enumerate(zip(kvs, ids)):
            kv.store.num_layers = kv.store.num_layers or self.num_layers
            kv.store.room(len(kv) + len(new), batch_keys[0, row : row + 1], batch_values[0, row : row + 1])
        for row, (kv, new) in enumerate(zip(kvs, ids)):
            held, end = len(kv), len(kv) + len(new)
            for own, buffer in zip(kv.store.buffers, store.buffers):  # type: ignore[arg-type]
                own[:, 0, :, held:end] = buffer[:, row, :, span + width - len(new) : span + width]
            for layer in kv.fill_layers(self.num_layers):
                layer.length = end
        logits = out.logits.float()
        results = []
        for row, (kv, new, k) in enumerate(zip(kvs, ids, keeps)):
            kv.ids.extend(new)
            results.append(logits[row, keep - k :] if k else logits[row, -1])
        return results

    @torch.inference_mode()
    def _decode_ragged(self, kvs: list[KVCache], ids: list[list[int]], keeps: list[int]) -> list[torch.Tensor]:
        """One new id per row, each attending over its own cache in place: no batch copy, no padding,
        and a long cache costs only its own row. If the pass fails, every row is as it was."""
        held = [len(kv) for kv in kvs]
        for kv in kvs:
            kv.store.num_layers = kv.store.num_layers or self.num_layers
        rows = [kv.fill_layers(self.num_layers) for kv in kvs]
        cache = DynamicCache()
        cache.layers.extend(RaggedLayer([layers[i] for layers in rows]) for i in range(self.num_layers))
        try:
            out = self.model(
                input_ids=torch.tensor(ids, device=self.device),
                position_ids=torch.tensor([[n] for n in held], device=self.device),
                attention_mask=torch.ones(len(kvs), 1, 1, 1, dtype=torch.bool, device=self.device),  # unused: no mask to build
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: cache},
            )
        except BaseException:
            for layers, n in zip(rows, held):  # states past a row's length are never read
                for layer in layers:
                    layer.length = n
            raise
        logits = out.logits.float()
        results = []
        for row, (kv, new, k) in enumerate(zip(kvs, ids, keeps)):
            kv.ids.extend(new)
            results.append(logits[row, -1:] if k else logits[row, -1])
        return results

    @staticmethod
    def crop(kv: KVCache, length: int) -> None:
        """Keep only the first `length` positions of the cache."""
        drop = len(kv.ids) - length
        if drop > 0:
            kv.cache.crop(-drop)
            del kv.ids[length:]
