"""Forward passes of one causal LM over per-sequence KV caches: plain tensors, no decoding logic.

This is the seam between the WSD algorithm and the thing that runs models (DESIGN 5): another
backend (a distributed serving engine) implements the same passes, extend and extend_batch, over
the same per-sequence caches (kv_cache.KVCache, which a sequence makes and crops itself), tells
the engine what it reads (rows, ragged, num_layers, position_bytes, loaded), and gives lazy rows
(output_head.HeadRows) a head that projects them.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any

import torch
from transformers import DynamicCache

from . import decode_graphs
from .attention import WSD_SDPA, RaggedRows, attention_backends
from .decode_graphs import CannotCapture, DecodeGraphs
from .errors import ModelLoadError, user_stacklevel
from .kv_cache import KVCache, KVStore, LayerFactory, RaggedLayer, append_states
from .loading import LoadedModel
from .output_head import HeadRows, OutputHead
from .packed_linear import pack_linears

log = logging.getLogger(__name__)

Output = torch.Tensor | HeadRows


class ModelRunner:
    """Runs a loaded model: extend a cache with ids and return float32 logits (or, lazy, the rows
    whose logits are computed when asked for: output_head.HeadRows).

    On CPU every pass is ragged (`_extend_ragged`): a row gets the same bits alone or in any batch.
    Elsewhere a batch is padded (`extend_batch`), and on CUDA a decode step or short scoring pass
    replays a CUDA graph (`_extend_slots`). The output projection runs outside the model's forward
    (`self.head`), only for the rows a pass is asked for eagerly.
    """

    def __init__(self, loaded: LoadedModel, bound: bool = True) -> None:
        """`bound`: whether the head keeps what scoring's probability bounds need (a base model)."""
        self.loaded = loaded
        self.model: Any = loaded.model
        if not getattr(self.model.config.get_text_config(), "num_attention_heads", None):  # Mamba's, RWKV's: a state, not a key-value cache
            raise ModelLoadError(
                f"{type(self.model).__name__} has no attention heads to cache keys and values for; the runtime runs "
                "decoder-only transformers (Llama, Qwen, Gemma, SmolLM, Mistral, ...)"
            )
        self.device = loaded.device
        self._probe_ids = torch.tensor([[1, 2, 3, 4]], device=self.device)  # the load-time checks' input
        self.rows: int = self.model.get_input_embeddings().num_embeddings  # ids it can embed: below this
        self.head = OutputHead(self.model, bound)  # before packing: it copies a slice of the dense projection
        pack_linears(self.model, probe=self._own_logits)
        self.num_layers: int = self.model.config.get_text_config().num_hidden_layers
        if not self._head_matches():
            self.head = OutputHead.identity()
        self.head.check_slice()
        # transformers renamed `past_key_values` to `cache` in its 5.x forward signatures.
        called = self.model.base_model if self.head.projects else self.model
        self._cache_kw = "cache" if "cache" in inspect.signature(called.forward).parameters else "past_key_values"
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)  # a 4D mask transformers passes on unread
        self._rope_bounds = _longrope_bounds(self.model.config.get_text_config())
        self.graphs: DecodeGraphs | None = None
        self.ragged = False  # plain passes while the probe takes its reference
        self.ragged = self._ragged_matches()
        self.graphs = self._decode_graphs()

    @property
    def position_bytes(self) -> int:
        """Bytes of keys and values one cached position takes, every layer's (from the config)."""
        text = self.model.config.get_text_config()
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return 2 * self.num_layers * kv_heads * head_dim * self.loaded.dtype.itemsize

    def _own_logits(self) -> torch.Tensor:
        """The model's own logits for the probe ids, its forward unchanged."""
        return self.model(input_ids=self._probe_ids, use_cache=False).logits

    def _head_matches(self) -> bool:
        """Whether `self.head` over the model's final hidden states gives the model's own logits; a
        model whose forward does more (scales or masks its logits) keeps its own head."""
        decoder = self.model.base_model
        if not self.head.projects or decoder is self.model:
            return False
        with torch.inference_mode(), attention_backends(self.device):
            own = self._own_logits()[0].float()
            ours = self.head.logits(decoder(input_ids=self._probe_ids, use_cache=False).last_hidden_state[0])
        return own.shape == ours.shape and torch.allclose(own, ours, rtol=1e-4, atol=1e-4)

    def _ragged_matches(self) -> bool:
        """Whether to run ragged passes (attention.wsd_sdpa): on CPU, where a probe shows one giving
        what plain passes give. GPUs keep padded batches, whose one attention call per layer suits
        them better than one per row; so do models whose attention reshapes cached states."""
        if self.device.type != "cpu" or self.model.config._attn_implementation not in ("sdpa", WSD_SDPA):
            return False
        self.model.set_attn_implementation(WSD_SDPA)
        # (cached, new, keep, stepwise)
        rows = [([1, 2, 3], [4], 0, False), ([1, 2, 3, 4, 5, 6], [7, 8, 9], 2, False), ([], [1, 2, 3, 4], 0, False), ([1, 2, 3], [4, 5, 6], 3, True)]
        plain, ragged = [self.new_cache() for _ in rows], [self.new_cache() for _ in rows]
        try:
            expected = []
            for kv, other, (cached, new, keep, _) in zip(plain, ragged, rows):
                if cached:
                    self.extend(kv, cached)
                    self.extend(other, cached)
                expected.append(self.extend(kv, new, keep))
            got = self._extend_ragged(ragged, [row[1] for row in rows], [row[2] for row in rows], [False] * len(rows), [row[3] for row in rows])
        except Exception:  # noqa: BLE001 - any failure means this model cannot take ragged passes
            got = []
        if len(got) == len(rows) and all(
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-3)
            for a, b in zip(expected, got)
        ):
            return True
        self.model.set_attn_implementation("sdpa")
        return False

    def _decode_graphs(self) -> DecodeGraphs | None:
        """Decode steps and short scoring passes from CUDA graphs (decode_graphs): on CUDA, for a
        model on SDPA attention whose passes over slots give plain passes' logits, unless
        WSD_LLMS_CUDA_GRAPHS=0."""
        if not decode_graphs.enabled(self.device) or self.model.config._attn_implementation not in ("sdpa", WSD_SDPA):
            return None
        self.model.set_attn_implementation(WSD_SDPA)  # plain SDPA for every other pass
        if not self._slots_match():
            warnings.warn(f"{self.loaded.name}: passes run without CUDA graphs: a pass over slots does not give a plain pass's logits", RuntimeWarning, stacklevel=user_stacklevel())
            return None
        return self._new_graphs(capture=True)

    def _new_graphs(self, capture: bool) -> DecodeGraphs:
        """Slot passes for this model: a model that keeps its own head (whose forward returns logits
        for every position fed) takes them for decode steps only. A longrope model's padding stays
        below its bound, which a padded row's positions would otherwise cross (and take the whole
        pass's frequencies with them)."""
        limit = min([self.loaded.context_window, *self._rope_bounds])
        return DecodeGraphs(self._slot_forward, capture, decode_graphs.MAX_WIDTH if self.head.projects else 1, limit)

    @torch.inference_mode()
    def _slots_match(self) -> bool:
        """Whether passes over slots, run eagerly, give what plain passes give (a decode step, then a
        scoring pass whose row is padded to the pass's width), within 5% of the logits' range (a
        bfloat16 model rounds differently in each): slot attention reads only positions and sliding
        windows, so a model whose attention needs more (a bias, sinks) fails."""
        plain, slotted = self.new_cache(), self.new_cache()
        probe = self._new_graphs(capture=False)
        try:
            self.extend(plain, [1, 2, 3])
            self.extend(slotted, [1, 2, 3])
            passes = [([4], 0)] + ([([5, 6, 7], 3)] if probe.max_width > 1 else [])  # (new ids, keep)
            for new, keep in passes:
                expected = self.extend(plain, new, keep)
                if not probe.takes([slotted], [new], [keep]):
                    return False
                got = self._run_slots(probe, [slotted], [new], [keep], [False])[0]
                assert isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor)
                spread = float(expected.max() - expected.min())
                if got.shape != expected.shape or float((got - expected).abs().max()) > 0.05 * spread + 1e-3:
                    return False
        except Exception:  # noqa: BLE001 - any failure means this model's passes cannot run over slots
            return False
        return True

    def _slot_forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """A slot pass's forward (decode_graphs.SlotPass): the final hidden states [batch, width, H]."""
        return self._forward(ids.shape[1], input_ids=ids, position_ids=positions, attention_mask=self._no_mask, use_cache=True, **{self._cache_kw: cache})

    def new_cache(self) -> KVCache:
        return KVCache()

    def _forward(self, rows: int | torch.Tensor, **inputs: Any) -> torch.Tensor:
        """One pass: the final hidden states [batch, n, H] at the last `rows` positions of each row,
        or at the positions `rows` lists; the model's own logits there if it keeps its own head."""
        with attention_backends(self.device):
            if not self.head.projects:
                return self.model(**inputs, logits_to_keep=rows).logits
            hidden = self.model.base_model(**inputs).last_hidden_state
        # A copy of the kept positions only: lazy rows may be held across steps, the rest need not be.
        return hidden[:, -rows:].contiguous() if isinstance(rows, int) else hidden[:, rows]

    def _outputs(self, rows: list[torch.Tensor], keeps: list[int], lazy: list[bool]) -> list[Output]:
        """What each row of a pass returns, from its kept rows [k, H]: logits [V] (keep=0) or [k, V],
        or, lazy, the rows themselves. The head runs once, over every eager row."""
        eager = [h for h, is_lazy in zip(rows, lazy) if not is_lazy]
        logits = self.head.logits(torch.cat(eager)) if eager else None
        results: list[Output] = []
        first = 0
        for h, keep, is_lazy in zip(rows, keeps, lazy):
            if is_lazy:
                results.append(HeadRows(h, self.head))
                continue
            assert logits is not None
            results.append(logits[first : first + len(h)] if keep else logits[first + len(h) - 1])
            first += len(h)
        return results

    @torch.inference_mode()
    def extend(self, kv: KVCache, ids: list[int], keep: int = 0, lazy: bool = False, stepwise: bool = False) -> Output:
        """Feed `ids` after what `kv` holds; float32 logits [V] for the last position, or [keep, V]
        (lazy: the same rows as HeadRows). If the pass fails, the cache is as it was. `stepwise`: a
        decode step with guessed ids after the first, which a ragged pass gives the bits of one id a
        pass (attention.RaggedRows)."""
        if not ids:
            raise ValueError("extend() needs at least one id")
        if self.ragged:
            return self._extend_ragged([kv], [ids], [keep], [lazy], [stepwise])[0]
        slots = self._extend_slots([kv], [ids], [keep], [lazy])
        if slots is not None:
            return slots[0]
        input_ids = torch.tensor([ids], device=self.device)
        held = len(kv)
        kv.store.num_layers = kv.store.num_layers or self.num_layers
        try:
            hidden = self._forward(max(keep, 1), input_ids=input_ids, use_cache=True, **{self._cache_kw: kv.cache})
            output = self._outputs([hidden[0]], [keep], [lazy])[0]
        except BaseException:
            for layer in kv.fill_layers(self.num_layers):
                layer.length = min(layer.length, held)
            raise
        kv.ids.extend(ids)
        return output

    @torch.inference_mode()
    def extend_batch(
        self, kvs: list[KVCache], ids: list[list[int]], keeps: list[int], lazy: list[bool] | None = None, stepwise: list[bool] | None = None
    ) -> list[Output]:
        """Feed each cache its own ids in one forward pass; per row, what `extend` would return. If
        the pass fails (in a layer, or in the output projection), every cache is as it was, so each
        row can be retried alone.

        On CPU the pass is ragged (`_extend_ragged`). Otherwise it is padded: rows are
        right-aligned and left-padded, so every row's tokens stay contiguous and relative
        distances (sliding windows, RoPE) are exact. A row with fewer new ids than the widest
        re-feeds its last cached tokens in the slots it would otherwise pad: the same compute, and
        no hole between its cache and its new tokens. Only the new tokens' key/value states are
        appended back to each row's own cache.
        """
        lazy = lazy or [False] * len(kvs)
        stepwise = stepwise or [False] * len(kvs)
        if len(kvs) == 1:
            return [self.extend(kvs[0], ids[0], keeps[0], lazy[0], stepwise[0])]
        if any(not row for row in ids):
            raise ValueError("extend_batch() needs at least one id per row")
        sides = [tuple(len(kv) + len(row) > bound for bound in self._rope_bounds) for kv, row in zip(kvs, ids)]
        if len(set(sides)) > 1:
            return self._extend_by_side(kvs, ids, keeps, lazy, stepwise, sides)
        if self.ragged:
            return self._extend_ragged(kvs, ids, keeps, lazy, stepwise)
        slots = self._extend_slots(kvs, ids, keeps, lazy)
        if slots is not None:
            return slots
        width = max(len(row) for row in ids)
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
        hidden = self._forward(
            keep,
            input_ids=inputs.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            **{self._cache_kw: batch},
        )
        outputs = self._outputs([hidden[row, keep - max(k, 1) :] for row, k in enumerate(keeps)], keeps, lazy)
        assert store.buffers is not None
        batch_keys, batch_values = store.buffers
        end = span + width  # each row's new tokens are the last of its batch row
        append_states(kvs, ids, [(batch_keys[:, row, :, end - len(new) : end], batch_values[:, row, :, end - len(new) : end]) for row, new in enumerate(ids)], self.num_layers)
        return outputs

    def _extend_by_side(
        self, kvs: list[KVCache], ids: list[list[int]], keeps: list[int], lazy: list[bool], stepwise: list[bool], sides: list[tuple[bool, ...]]
    ) -> list[Output]:
        """extend_batch for rows on both sides of a longrope model's bound, one pass per side: its
        RoPE frequencies follow the longest position in a pass, so a short row batched with a long
        one took the long frequencies, and its reply depended on what ran beside it. A failing
        pass leaves every cache as it was, as extend_batch's does."""
        lengths = [len(kv) for kv in kvs]
        outputs: list[Output | None] = [None] * len(kvs)
        try:
            for side in dict.fromkeys(sides):
                rows = [i for i, s in enumerate(sides) if s == side]
                done = self.extend_batch([kvs[i] for i in rows], [ids[i] for i in rows], [keeps[i] for i in rows], [lazy[i] for i in rows], [stepwise[i] for i in rows])
                for i, output in zip(rows, done):
                    outputs[i] = output
        except BaseException:
            for kv, length in zip(kvs, lengths):
                kv.crop(length)
            raise
        return outputs  # type: ignore[return-value]

    def _extend_slots(self, kvs: list[KVCache], ids: list[list[int]], keeps: list[int], lazy: list[bool]) -> list[Output] | None:
        """A decode step or short scoring pass from a replayed graph (decode_graphs); None where the
        pass is not one, where memory ran out (making its slots or graph, or in the pass: this step
        runs plain), or where the model's cannot be captured (then its passes stay plain from here
        on). If the pass fails, every cache is as it was."""
        if self.graphs is None or not self.graphs.takes(kvs, ids, keeps):
            return None
        try:
            return self._run_slots(self.graphs, kvs, ids, keeps, lazy)
        except CannotCapture as error:
            log.warning("%s: passes run without CUDA graphs: %s", self.loaded.name, error)  # on the worker thread: logged (see Engine._retried)
            self.graphs = None
            return None
        except Exception as error:
            if decode_graphs.out_of_memory(error):  # no cache has changed yet: this step runs plain
                self.graphs.back_off(kvs, ids)
                return None
            raise

    def _run_slots(self, graphs: DecodeGraphs, kvs: list[KVCache], ids: list[list[int]], keeps: list[int], lazy: list[bool]) -> list[Output]:
        """One pass over `graphs`' slots: the rows' outputs, and their new states handed back."""
        slot_pass, slots = graphs.load(kvs, ids)
        output = slot_pass()  # [batch, width, H], overwritten by the next replay: the kept rows are copied out
        kept = [max(keep, 1) for keep in keeps]
        width = output.shape[1]
        index = [slot * width + j for slot, new, k in zip(slots, ids, kept) for j in range(len(new) - k, len(new))]
        hidden = output.flatten(0, 1).index_select(0, torch.tensor(index, device=output.device))
        outputs = self._outputs(list(hidden.split(kept)), keeps, lazy)
        graphs.hand_back(kvs, ids, slots, self.num_layers)
        return outputs

    @torch.inference_mode()
    def _extend_ragged(self, kvs: list[KVCache], ids: list[list[int]], keeps: list[int], lazy: list[bool], stepwise: list[bool]) -> list[Output]:
        """Every row's new ids in one pass, flattened into one sequence: the linear layers take all
        the tokens at once, each row attends over its own cache where it lies (attention.wsd_sdpa),
        and the output projection runs only for the rows asked for. Nothing is copied or padded, and
        a row gets the bits it gets in a pass of its own. If the pass fails, every row is as it was."""
        held, counts = [len(kv) for kv in kvs], [len(row) for row in ids]
        layout = RaggedRows(counts, stepwise)
        rows = [kv.fill_layers(self.num_layers) for kv in kvs]
        cache = DynamicCache()
        cache.layers.extend(RaggedLayer([layers[i] for layers in rows], layout) for i in range(self.num_layers))
        kept = [min(max(keep, 1), count) for keep, count in zip(keeps, counts)]
        index = [i for start, count, k in zip(layout.starts, counts, kept) for i in range(start + count - k, start + count)]
        try:
            hidden = self._forward(
                torch.tensor(index, device=self.device),
                input_ids=torch.tensor([[i for row in ids for i in row]], device=self.device),
                position_ids=torch.tensor([[p for h, n in zip(held, counts) for p in range(h, h + n)]], device=self.device),
                attention_mask=self._no_mask,  # unused: no mask to build
                use_cache=True,
                **{self._cache_kw: cache},
            )[0]
            outputs = self._outputs(list(hidden.split(kept)), keeps, lazy)
        except BaseException:
            for layers, n in zip(rows, held):  # states past a row's length are never read
                for layer in layers:
                    layer.length = n
            raise
        for kv, new in zip(kvs, ids):
            kv.ids.extend(new)
        return outputs

def _longrope_bounds(config: Any) -> tuple[int, ...]:
    """Where a longrope model's RoPE frequencies change (Phi-3's 128k models, Phi-3.5, Phi-4-mini):
    transformers picks the short or long ones for a whole pass by its longest position, against
    each `original_max_position_embeddings` (one per layer type where there are several)."""
    params = getattr(config, "rope_parameters", None) or {}
    groups = list(params.values()) if params and all(isinstance(v, dict) for v in params.values()) else [params]
    return tuple(sorted({p["original_max_position_embeddings"] for p in groups if p.get("rope_type") == "longrope" and "original_max_position_embeddings" in p}))
