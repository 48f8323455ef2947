"""Decides which sequences run in the next step: bounded admission from a FIFO queue, then every
running sequence advances once per step (so no request starves and long replies do not hold
back short ones)."""

from __future__ import annotations

from collections import deque

from .errors import RequestTooLargeError
from .sequence import Forward, Phase, Sequence

# The fixed cost of one forward pass (reading the weights, launching the layers), in units of
# one token's compute, measured for the embedded models (benchmarks/bench_passes.py): 17-20 on a
# 2-core CPU; 7500-12000 on an H200 in bfloat16, where a pass costs about 20 ms of kernel
# launches whether it feeds 1 token or 512.
PASS_OVERHEAD = {"cpu": 18.0, "cuda": 7500.0}


def token_budget(seq: Sequence) -> int:
    """Most cache positions this request can ever hold (both models), reserved at admission."""
    p = seq.params
    draft = len(seq.prompts.draft_ids) + p.max_draft_tokens
    base = len(seq.prompts.base_ids) + p.max_tokens + 1
    if p.mode == "staged":  # the check stage holds the whole draft in base tokens
        base += 2 * p.max_draft_tokens
    return {"base": base, "draft": draft}.get(p.mode, draft + base)


class Scheduler:
    """FIFO admission bounded by concurrent sequences and reserved cache tokens."""

    def __init__(self, max_running: int = 16, max_cached_tokens: int = 65536) -> None:
        self.max_running = max_running
        self.max_cached_tokens = max_cached_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved = 0

    def add(self, seq: Sequence) -> None:
        """Queue a request; one that could never fit fails now."""
        need = token_budget(seq)
        if need > self.max_cached_tokens:
            raise RequestTooLargeError(
                f"this request may need {need} cached tokens (prompts + max_tokens + max_draft_tokens), more "
                f"than the runtime's max_cached_tokens={self.max_cached_tokens}; lower max_tokens or "
                "max_draft_tokens, or raise max_cached_tokens"
            )
        seq.phase = Phase.WAITING
        self.waiting.append(seq)

    def schedule(self) -> list[Sequence]:
        """Admit from the head of the queue while the limits allow; return the running sequences."""
        while self.waiting and len(self.running) < self.max_running:
            need = token_budget(self.waiting[0])
            if self.running and self.reserved + need > self.max_cached_tokens:
                break
            seq = self.waiting.popleft()
            self.reserved += need
            self.running.append(seq)
        return list(self.running)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.reserved -= token_budget(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)


def plan_passes(forwards: list[Forward], head_cost: float, overhead: float) -> list[list[int]]:
    """Group one model's pending forwards into batched passes; returns index lists into `forwards`.

    A batched pass is padded to its longest row and computes its largest `keep` of output rows
    for every row, so its cost is `overhead + rows * (width + head_cost * kept)`, where
    head_cost is the output projection's cost per row relative to a token through the layers.
    In order of width, a forward joins the current group when that is cheaper than its own pass:
    decode steps always share one pass, prefills and scoring passes of similar size share one.
    """

    def cost(width: int, kept: int, rows: int) -> float:
        return overhead + rows * (width + head_cost * kept)

    order = sorted(range(len(forwards)), key=lambda i: (len(forwards[i].ids), forwards[i].keep))
    groups: list[list[int]] = []
    width = kept = 0
    for i in order:
        w, k = len(forwards[i].ids), max(forwards[i].keep, 1)
        if groups:
            rows = len(groups[-1])
            joined = cost(max(width, w), max(kept, k), rows + 1)
            if joined <= cost(width, kept, rows) + cost(w, k, 1):
                groups[-1].append(i)
                width, kept = max(width, w), max(kept, k)
                continue
        groups.append([i])
        width, kept = w, k
    return groups
