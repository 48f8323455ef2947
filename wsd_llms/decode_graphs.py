"""Decode steps and short scoring passes (up to MAX_WIDTH new tokens per row) replayed from CUDA graphs.

On a GPU a small model's pass is bound by the CPU work of launching its kernels, hundreds per pass,
not by the GPU (benchmarks/results/profile_steps_cuda.txt). A graph captured once per (batch,
width, capacity) bucket launches them all in one call. For that, every replay must have the same
shapes and addresses: rows are copied into fixed slots of one buffer per model (SlotBuffers), each
row's new key/value states are written at their own positions by a scatter, and attention reads
every slot whole under a mask made from the positions (attention.SlotLayout). A row with fewer new
ids than the pass's width feeds id 0 in the rest, after its own: those queries write zeros (not
their states, which need not even be finite) past the row's length, where its own queries cannot
see and which is never handed back. Only the new states are copied back into each row's own cache,
so everything else (crops, the prefix cache, longer passes) sees the caches it always did. A row
keeps its slot from one pass to the next: while nothing else has written to its own cache
(kv_cache.KVStore.edits), its slot still holds it, and only rows new to their slots are copied in.
A model's graphs share one memory pool: a pass's output is copied out before the next replay.

Without CUDA (`capture=False`) the same passes run eagerly: the tests compare them with the plain
passes on CPU.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .attention import SlotLayout, SlotStates
from .kv_cache import KVCache, append_states

MIN_CAPACITY = 256  # the smallest slot: capacities are powers of two from here, so few graphs are captured
# How many new ids a row of a slot pass feeds, at most: decode steps (1) and scoring passes (online
# scores 8 to 32 draft tokens at a time, MAX_SCORE_INTERVAL); a row with fewer is padded to the next.
# Few widths, so few graphs: each capture costs about a tenth of a second. Longer passes (prompt pieces) run plain.
WIDTHS = (1, 8, 32)
MAX_WIDTH = WIDTHS[-1]
# The most memory one model's slots may take: a step that needs more runs a plain pass. Slots are
# kept once made, for the next step. For the embedded pair in bfloat16 this allows 32768 positions
# (16 rows of 2048, or one of 32768); for an 8B model with 8 key/value heads of 128, 8192.
MAX_SLOT_BYTES = 1 << 30
# Steps before a pass shape that ran out of memory (capturing, running or handing back) is tried
# again (plain passes meanwhile): memory that was short one step is likely short the next.
RETRY_AFTER = 64


def enabled(device: torch.device) -> bool:
    """Whether passes on `device` replay graphs: on CUDA, unless WSD_LLMS_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("WSD_LLMS_CUDA_GRAPHS", "1") != "0"


def bucket(n: int, least: int = 1) -> int:
    """The power of two at or above `n` (and `least`): the batch or capacity a graph is captured for."""
    return max(least, 1 << max(n - 1, 0).bit_length())


class SlotLayer(DynamicLayer):
    """One layer of a slot pass: writes each row's new states at their positions (zeros for its
    padding), hands attention the whole slots."""

    is_initialized = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, layout: SlotLayout) -> None:  # no super(): the slots hold the states
        self.keys_slots, self.values_slots, self.layout = keys, values, layout

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        rows, width = self.layout.positions.shape
        at = self.layout.positions.view(rows, 1, width, 1)
        padding = self.layout.padding
        self.keys_slots.scatter_(2, at.expand_as(key_states), key_states.masked_fill(padding, 0))
        self.values_slots.scatter_(2, at.expand_as(value_states), value_states.masked_fill(padding, 0))
        return SlotStates(self.keys_slots, self.layout), SlotStates(self.values_slots, self.layout)

    def get_seq_length(self) -> int:
        return self.keys_slots.shape[-2]


class SlotBuffers:
    """Every layer's keys, and values, of every slot: [layers, slots, heads, capacity, dim] each,
    shaped like the rows' own caches. Remade (larger, or as small as a step needs when larger would
    pass MAX_SLOT_BYTES) by reallocation, which makes every pass captured over the old buffers stale."""

    def __init__(self, like: tuple[torch.Tensor, torch.Tensor]) -> None:
        """`like`: a row's own (keys, values) buffers [layers, 1, heads, n, dim], whose shapes and dtype to follow."""
        self.shapes = [(b.shape[0], b.shape[2], b.shape[4]) for b in like]
        self.position_bytes = sum(layers * heads * dim for layers, heads, dim in self.shapes) * like[0].element_size()
        self.keys = self.values = like[0].new_empty(0)
        self.slots = self.capacity = 0
        # Per slot: positions from there on hold zeros (as made, or as padding writes them).
        self.dirty: list[int] = []

    def allows(self, slots: int, capacity: int) -> bool:
        """Whether slots of this shape stay within MAX_SLOT_BYTES."""
        return slots * capacity * self.position_bytes <= MAX_SLOT_BYTES

    def fits(self, slots: int, capacity: int) -> bool:
        """Whether the slots as they are hold `slots` rows of `capacity` positions."""
        return slots <= self.slots and capacity <= self.capacity

    def remake(self, slots: int, capacity: int) -> None:
        """Reallocate to hold `slots` rows of `capacity` positions: as large as both the old and the
        new shape where that is allowed, else just the new. The old buffers are freed first; if the
        new ones cannot be had (out of memory), the slots are left empty, to be made again."""
        if self.allows(max(slots, self.slots), max(capacity, self.capacity)):
            slots, capacity = max(slots, self.slots), max(capacity, self.capacity)
        empty = self.keys.new_empty(0)
        self.keys = self.values = empty
        self.slots = self.capacity = 0
        keys, values = (empty.new_zeros(layers, slots, heads, capacity, dim) for layers, heads, dim in self.shapes)
        self.keys, self.values, self.slots, self.capacity = keys, values, slots, capacity
        self.dirty = [0] * slots

    def clean(self, slot: int, length: int, width: int) -> None:
        """Zero what an earlier row left in `slot` past `length`, for a row of that length: masked out,
        but a non-finite state there (an overflow in another request) would still turn the row's
        attention to NaN."""
        if self.dirty[slot] > length:
            self.keys[:, slot, :, length : self.dirty[slot]] = 0
            self.values[:, slot, :, length : self.dirty[slot]] = 0
        self.dirty[slot] = length + width  # the pass writes the row's new states from `length`


class SlotPass:
    """One pass of `width` new ids per row over the first `batch` slots of `capacity` positions:
    fixed input tensors, and a graph replayed over them (or, without capture, the forward run each
    time). `pool`: the memory pool the graph shares with the model's other graphs."""

    def __init__(self, forward: Callable[..., torch.Tensor], buffers: SlotBuffers, shape: tuple[int, int, int], capture: bool, pool: Any = None) -> None:
        batch, width, capacity = shape
        device = buffers.keys.device
        # Per slot: the ids fed, their positions, and whether each is the row's own (1) or padding (0),
        # set by one copy per pass.
        self.inputs = inputs = torch.zeros(3, batch, width, dtype=torch.long, device=device)
        keys, values = buffers.keys[:, :batch, :, :capacity], buffers.values[:, :batch, :, :capacity]

        def run() -> torch.Tensor:  # holds no reference to self: a pass is freed (graph, views of old slots) once dropped
            ids, positions, fed = inputs
            layout = SlotLayout(positions, fed > 0, capacity)
            cache = DynamicCache()
            cache.layers.extend(SlotLayer(k, v, layout) for k, v in zip(keys, values))
            return forward(ids, positions, cache)

        self.graph: torch.cuda.CUDAGraph | None = None
        self.device, self.run = device, run
        if not capture:
            run()  # what capture would find wrong, found now
            return
        with torch.cuda.device(device):  # capture and replay use the current device's streams: the model's
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: lazy initialisation (cuBLAS workspaces) must not happen in capture
                    run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (another runtime's worker) may go on launching work meanwhile
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.output = run()

    def __call__(self) -> torch.Tensor:
        """The pass's output for every slot: [batch, width, H] (valid until the next call)."""
        if self.graph is None:
            return self.run()
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.output


def out_of_memory(error: BaseException | None) -> bool:
    """Whether running out of memory caused `error` (a failed capture may raise its own error on top)."""
    while error is not None:
        if isinstance(error, torch.cuda.OutOfMemoryError):  # torch.OutOfMemoryError from torch 2.5
            return True
        error = error.__cause__ or error.__context__
    return False


class CannotCapture(Exception):
    """A model's pass could not be made into a slot pass (its attention needs more than SDPA, say);
    its passes stay plain."""


class DecodeGraphs:
    """The slot passes of one model, made as rows first need them: `load` puts rows in slots (copying
    in those new to theirs) and returns the pass to run; after it, `hand_back` copies each row's new
    states into its own cache."""

    def __init__(self, forward: Callable[..., torch.Tensor], capture: bool, max_width: int = MAX_WIDTH, max_positions: int | None = None) -> None:
        """`forward(ids [B, W], position_ids [B, W], cache)`: the model's pass, its output [B, W, H]
        (logits, for a model that keeps its own head: give it `max_width` 1, or each graph keeps
        [B, MAX_WIDTH, vocab] of them). `max_positions`: the model's context window, which no
        position fed may pass, padding included (a table of learned positions has no row for it;
        dynamic rotary scaling would rescale the whole pass)."""
        self.forward, self.capture, self.max_width, self.max_positions = forward, capture, max_width, max_positions
        self.pool = torch.cuda.graph_pool_handle() if capture else None  # one memory pool for all of them
        self.buffers: SlotBuffers | None = None  # shaped after the first row cache seen
        self.passes: dict[tuple[int, int, int], SlotPass] = {}
        # Per slot: the cache whose states it holds, and that cache's edit count when it did.
        self.resident: list[tuple[weakref.ref[KVCache], int] | None] = []
        self.steps = 0  # passes offered (takes)
        self.retry_at: dict[tuple[int, int, int], int] = {}  # shapes that ran out of memory: when to try again (back_off)

    def takes(self, kvs: list[KVCache], ids: list[list[int]], keeps: list[int]) -> bool:
        """Whether a pass is one these passes can run: at most `max_width` new ids per row, at most
        those kept, padding within `max_positions`, slots within MAX_SLOT_BYTES, and a cache to take
        the slots' shapes from."""
        if max(len(row) for row in ids) > self.max_width or any(keep > len(row) for row, keep in zip(ids, keeps)):
            return False
        if self.buffers is None:
            like = next((kv.store.buffers for kv in kvs if kv.store.buffers is not None), None)
            if like is None:
                return False
            self.buffers = SlotBuffers(like)
        self.steps += 1
        batch, width, capacity = shape = self._shape(kvs, ids)
        if self.max_positions is not None and any(len(kv) + width > self.max_positions for kv, row in zip(kvs, ids) if len(row) < width):
            return False
        return self.buffers.allows(batch, capacity) and self.retry_at.get(shape, 0) <= self.steps

    def back_off(self, kvs: list[KVCache], ids: list[list[int]]) -> None:
        """Memory ran out in a pass over these rows (capturing it, running it, or handing back): this
        step runs plain, and so do passes of its shape for the next RETRY_AFTER steps, rather than
        each trying the slots first and failing again."""
        self.retry_at[self._shape(kvs, ids)] = self.steps + RETRY_AFTER

    @staticmethod
    def _shape(kvs: list[KVCache], ids: list[list[int]]) -> tuple[int, int, int]:
        """The (rows, width, capacity) bucket a pass over these rows is captured for."""
        width = next(w for w in WIDTHS if w >= max(len(row) for row in ids))
        return bucket(len(kvs)), width, bucket(max(len(kv) for kv in kvs) + width, MIN_CAPACITY)

    def load(self, kvs: list[KVCache], ids: list[list[int]]) -> tuple[SlotPass, list[int]]:
        """The pass for these rows, with each row's cache in a slot and its ids and positions set;
        and each row's slot. A row whose slot still holds its cache as it is (nothing has written
        to the cache since this slot's pass handed it back) keeps it without a copy."""
        shape = batch, width, capacity = self._shape(kvs, ids)
        assert self.buffers is not None  # made by takes()
        if not self.buffers.fits(batch, capacity):
            self.passes.clear()  # captured over the old buffers
            self.pool = torch.cuda.graph_pool_handle() if self.capture else None  # a fresh pool for the new ones
            self.buffers.remake(batch, capacity)
        if shape not in self.passes:  # new slots, or a pass to make, which runs it over them as they are
            self.resident = [None] * self.buffers.slots
            try:
                self.passes[shape] = SlotPass(self.forward, self.buffers, shape, self.capture, self.pool)
            except Exception as error:
                if out_of_memory(error):  # the runner backs off this shape (`back_off`)
                    raise
                raise CannotCapture(f"a pass of {batch} rows of {width} ids over {capacity} positions could not be captured: {error!r}") from error
        slot_pass, (slots, held) = self.passes[shape], self._place(kvs, batch)
        fed_ids, positions, own = [[0] * width] * batch, [list(range(width))] * batch, [[0] * width] * batch
        for kv, new, slot, holds in zip(kvs, ids, slots, held):
            n = len(kv)
            if holds:
                self.buffers.dirty[slot] = max(self.buffers.dirty[slot], n + width)
            else:
                self.resident[slot] = None
                self.buffers.clean(slot, n, width)
                if n:
                    buffers = kv.store.buffers
                    assert buffers is not None
                    self.buffers.keys[:, slot, :, :n] = buffers[0][:, 0, :, :n]
                    self.buffers.values[:, slot, :, :n] = buffers[1][:, 0, :, :n]
            fed_ids[slot] = new + [0] * (width - len(new))  # then id 0: padding
            positions[slot] = list(range(n, n + width))
            own[slot] = [1] * len(new) + [0] * (width - len(new))
        # Spare slots feed id 0, as padding (writing zeros): past the states of a row the slot holds,
        # which keeps it there, or else from position 0.
        top = capacity if self.max_positions is None else min(capacity, self.max_positions)
        for slot in set(range(batch)) - set(slots):
            occupant = self._occupant(slot)
            if occupant is not None and len(occupant) + width <= top:
                positions[slot] = list(range(len(occupant), len(occupant) + width))
            else:
                self.resident[slot] = None
        slot_pass.inputs.copy_(torch.tensor([fed_ids, positions, own]))
        return slot_pass, slots

    def _occupant(self, slot: int) -> KVCache | None:
        """The cache whose states slot `slot` holds, if it still lives."""
        entry = self.resident[slot]
        return None if entry is None else entry[0]()

    def _holds(self, slot: int, kv: KVCache) -> bool:
        """Whether slot `slot` holds `kv`'s states as they are now."""
        entry = self.resident[slot]
        return entry is not None and entry[0]() is kv and entry[1] == kv.store.edits

    def _place(self, kvs: list[KVCache], batch: int) -> tuple[list[int], list[bool]]:
        """A slot among the first `batch` for each row, and whether it holds the row's cache as it is:
        the one that does, where one does; else one no other row of the pass takes: empty first, then
        one whose row's cache has changed since, and last one that holds another row's (which loses it)."""
        holding = {id(kv): s for s in range(batch) if (kv := self._occupant(s)) is not None and self._holds(s, kv)}
        slots = [holding.get(id(kv)) for kv in kvs]  # the rows are alive: no other object has their id
        taken = {s for s in slots if s is not None}
        holding_others = set(holding.values()) - taken  # slots that hold rows this pass leaves out
        free = sorted(set(range(batch)) - taken, key=lambda s: (s in holding_others, self._occupant(s) is not None))
        return [s if s is not None else free.pop(0) for s in slots], [s is not None for s in slots]

    def hand_back(self, kvs: list[KVCache], ids: list[list[int]], slots: list[int], num_layers: int) -> None:
        """Copy each row's new states from its slot into its own cache (kv_cache.append_states: if
        that fails, no row has changed and each can be retried alone); each slot then holds its row's
        cache as it is."""
        assert self.buffers is not None
        keys, values = self.buffers.keys, self.buffers.values
        states = [(keys[:, s, :, len(kv) : len(kv) + len(new)], values[:, s, :, len(kv) : len(kv) + len(new)]) for kv, new, s in zip(kvs, ids, slots)]
        append_states(kvs, ids, states, num_layers)
        for kv, slot in zip(kvs, slots):
            self.resident[slot] = (weakref.ref(kv), kv.store.edits)
