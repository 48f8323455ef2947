"""The auto-switch rule (DESIGN 3.5) as a pure function, with an incremental form for streaming.

The switch point is the first index i >= w-1 whose window p[i-w+1..i] has a geometric mean >= τ.
Means are compared in log space with a 1e-12 tolerance, so a window that meets τ exactly passes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

_TOLERANCE = 1e-12


def _log(p: float) -> float:
    return math.log(p) if p > 0.0 else -math.inf


class SwitchDetector:
    """Feeds probabilities one at a time and reports the first index whose window passes."""

    def __init__(self, window: int, threshold: float) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.window = window
        self._log_threshold = math.log(threshold)
        self._logs: list[float] = []

    def __len__(self) -> int:
        return len(self._logs)

    def push(self, p: float) -> bool:
        """Add the probability of the next draft token; True if the window ending here passes."""
        self._logs.append(_log(float(p)))
        if len(self._logs) < self.window:
            return False
        mean = math.fsum(self._logs[-self.window :]) / self.window
        return mean >= self._log_threshold - _TOLERANCE

    def truncate(self, n: int) -> None:
        """Forget everything from index n on (after a re-tokenization rolled the scores back)."""
        del self._logs[n:]


def find_switch(probs: Iterable[float], window: int, threshold: float) -> int | None:
    """Index of the last kept draft token (the switch point), or None if no window passes."""
    detector = SwitchDetector(window, threshold)
    for i, p in enumerate(probs):
        if detector.push(p):
            return i
    return None
