"""Decides which sequences run in the next step: admission from a FIFO queue, then round robin."""

from __future__ import annotations

from collections import deque

from .sequence import Phase, Sequence


class Scheduler:
    """Waiting requests join in arrival order; every running sequence advances once per step."""

    def __init__(self) -> None:
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.phase = Phase.WAITING
        self.waiting.append(seq)

    def schedule(self) -> list[Sequence]:
        """Admit every waiting sequence and return the ones to advance this step."""
        while self.waiting:
            self.running.append(self.waiting.popleft())
        return list(self.running)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)
