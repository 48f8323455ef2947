"""Decode passes (one new token per row) replayed from CUDA graphs.

On a GPU a small model's pass is bound by the CPU work of launching its kernels, hundreds per pass,
not by the GPU (benchmarks/results/profile_steps_cuda.txt). A graph captured once per (batch,
capacity) bucket launches them all in one call. For that, every replay must have the same shapes
and addresses: rows are copied into fixed slots of one buffer per model (SlotBuffers), each row's
new key/value states are written at its own position by a scatter, and attention reads every
slot whole under a mask made from the positions (attention.SlotLayout). Only the new states are
copied back into each row's own cache, so everything else (scoring, crops, the prefix cache) sees
the caches it always did.

Without CUDA (`capture=False`) the same passes run eagerly: the tests compare them with the plain
passes on CPU.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .attention import SlotLayout, SlotStates
from .kv_cache import KVCache, append_states

MIN_CAPACITY = 256  # the smallest slot: capacities are powers of two from here, so few graphs are captured
# The most memory one model's slots may take: a step that needs more runs a plain pass. Slots are
# kept once made, for the next step. For the embedded pair in bfloat16 this allows 32768 positions
# (16 rows of 2048, or one of 32768); for an 8B model with 8 key/value heads of 128, 8192.
MAX_SLOT_BYTES = 1 << 30
# Steps before a shape whose capture ran out of memory is tried again (plain passes meanwhile).
RETRY_AFTER = 64


def enabled(device: torch.device) -> bool:
    """Whether decode steps on `device` replay graphs: on CUDA, unless WSD_LLMS_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("WSD_LLMS_CUDA_GRAPHS", "1") != "0"


def bucket(n: int, least: int = 1) -> int:
    """The power of two at or above `n` (and `least`): the batch or capacity a graph is captured for."""
    return max(least, 1 << max(n - 1, 0).bit_length())


class SlotLayer(DynamicLayer):
    """One layer of a slot pass: writes each row's new states at its position, hands attention the whole slots."""

    is_initialized = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, layout: SlotLayout) -> None:  # no super(): the slots hold the states
        self.keys_slots, self.values_slots, self.layout = keys, values, layout

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        at = self.layout.positions.view(-1, 1, 1, 1)
        self.keys_slots.scatter_(2, at.expand_as(key_states), key_states)
        self.values_slots.scatter_(2, at.expand_as(value_states), value_states)
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
        # Per slot: positions from there on hold nothing written since the slots were made (but
        # position 0, where spare slots decode; a row always rewrites it before reading it).
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

    def clean(self, row: int, length: int) -> None:
        """Zero what an earlier row left in slot `row` past `length`: masked out, but a non-finite
        state there (an overflow in another request) would still turn this row's attention to NaN."""
        if self.dirty[row] > length:
            self.keys[:, row, :, length : self.dirty[row]] = 0
            self.values[:, row, :, length : self.dirty[row]] = 0
        self.dirty[row] = length + 1  # the pass writes this row's new states at `length`


class SlotPass:
    """One decode pass over the first `batch` slots of `capacity` positions: fixed input tensors,
    and a graph replayed over them (or, without capture, the forward run each time)."""

    def __init__(self, forward: Callable[..., torch.Tensor], buffers: SlotBuffers, batch: int, capacity: int, capture: bool) -> None:
        device = buffers.keys.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        keys, values = buffers.keys[:, :batch, :, :capacity], buffers.values[:, :batch, :, :capacity]

        def run() -> torch.Tensor:
            layout = SlotLayout(self.positions, capacity)
            cache = DynamicCache()
            cache.layers.extend(SlotLayer(k, v, layout) for k, v in zip(keys, values))
            return forward(self.ids, self.positions.view(-1, 1), cache)

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
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.output = run()

    def __call__(self) -> torch.Tensor:
        """The pass's output for every slot: [batch, 1, H] (valid until the next call)."""
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
    """A model's decode pass could not be made into a slot pass (its attention needs more than SDPA,
    say); its passes stay plain."""


class DecodeGraphs:
    """The slot passes of one model, made as rows first need them: `load` copies rows into slots and
    returns the pass to run; after it, `hand_back` copies each row's new states into its own cache."""

    def __init__(self, forward: Callable[..., torch.Tensor], capture: bool) -> None:
        """`forward(ids [B, 1], position_ids [B, 1], cache)`: the model's pass, its output [B, 1, H]."""
        self.forward, self.capture = forward, capture
        self.buffers: SlotBuffers | None = None  # shaped after the first row cache seen
        self.passes: dict[tuple[int, int], SlotPass] = {}
        self.steps = 0  # decode steps offered (takes)
        self.retry_at: dict[tuple[int, int], int] = {}  # shapes whose capture ran out of memory: when to try again

    def takes(self, kvs: list[KVCache], ids: list[list[int]], keeps: list[int]) -> bool:
        """Whether a pass is a decode step these passes can run: one new id per row, at most its own
        row kept, slots within MAX_SLOT_BYTES, and a cache to take the slots' shapes from."""
        if any(len(row) != 1 for row in ids) or max(keeps) > 1:
            return False
        if self.buffers is None:
            like = next((kv.store.buffers for kv in kvs if kv.store.buffers is not None), None)
            if like is None:
                return False
            self.buffers = SlotBuffers(like)
        self.steps += 1
        shape = self._shape(kvs)
        return self.buffers.allows(*shape) and self.retry_at.get(shape, 0) <= self.steps

    @staticmethod
    def _shape(kvs: list[KVCache]) -> tuple[int, int]:
        """The (rows, capacity) bucket a step over these rows is captured for."""
        return bucket(len(kvs)), bucket(max(len(kv) for kv in kvs) + 1, MIN_CAPACITY)

    def load(self, kvs: list[KVCache], ids: list[int]) -> SlotPass:
        """The pass for these rows, their caches copied into its slots and their ids and positions set."""
        held = [len(kv) for kv in kvs]
        batch, capacity = self._shape(kvs)
        assert self.buffers is not None  # made by takes()
        if not self.buffers.fits(batch, capacity):
            self.passes.clear()  # captured over the old buffers
            self.buffers.remake(batch, capacity)
        key = (batch, capacity)
        if key not in self.passes:
            try:
                self.passes[key] = SlotPass(self.forward, self.buffers, batch, capacity, self.capture)
            except Exception as error:
                if out_of_memory(error):  # for now: this step runs plain, and this shape again after RETRY_AFTER steps
                    self.retry_at[key] = self.steps + RETRY_AFTER
                    raise
                raise CannotCapture(f"a decode pass of {batch} rows over {capacity} positions could not be captured: {error!r}") from error
        slot_pass = self.passes[key]
        for row, (kv, n) in enumerate(zip(kvs, held)):
            self.buffers.clean(row, n)
            if n:
                own = kv.store.buffers
                assert own is not None
                self.buffers.keys[:, row, :, :n] = own[0][:, 0, :, :n]
                self.buffers.values[:, row, :, :n] = own[1][:, 0, :, :n]
        pad = batch - len(kvs)  # spare slots decode id 0 at position 0: harmless, and never read
        slot_pass.ids.copy_(torch.tensor([[i] for i in ids] + [[0]] * pad))
        slot_pass.positions.copy_(torch.tensor(held + [0] * pad))
        return slot_pass

    def hand_back(self, kvs: list[KVCache], ids: list[int], num_layers: int) -> None:
        """Copy each row's new states from its slot into its own cache (kv_cache.append_states: if
        that fails, no row has changed and each can be retried alone)."""
        assert self.buffers is not None
        keys, values = self.buffers.keys, self.buffers.values
        states = [(keys[:, row, :, len(kv) : len(kv) + 1], values[:, row, :, len(kv) : len(kv) + 1]) for row, kv in enumerate(kvs)]
        append_states(kvs, [[i] for i in ids], states, num_layers)
