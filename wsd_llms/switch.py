"""The auto-switch rule (DESIGN 3.5) as a pure function, with an incremental form for streaming.

The switch point is the first index i >= w-1 whose window p[i-w+1..i] has a geometric mean >= τ.
Means are compared in log space with a 1e-12 tolerance, so a window that meets τ exactly passes.
A draft that starts with a forced start (the conversation's last, assistant, message) never
switches inside it: i is at least its last token's index (`min_switch`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

_TOLERANCE = 1e-12


def _log(p: float) -> float:
    return math.log(p) if p > 0.0 else -math.inf


class SwitchDetector:
    """Feeds probabilities one at a time and reports the first index whose window passes."""

    def __init__(self, window: int, threshold: float, min_switch: int = 0) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.window = window
        self.first = max(window - 1, min_switch)  # the first index a passing window may end at
        self._log_threshold = math.log(threshold)
        self._logs: list[float] = []

    def raise_floor(self, min_switch: int) -> None:
        """No window may end before `min_switch` (a forced start's end, as its tokenization became known)."""
        self.first = max(self.first, min_switch)

    def __len__(self) -> int:
        return len(self._logs)

    def push(self, p: float) -> bool:
        """Add the probability of the next draft token; True if the window ending here passes."""
        self._logs.append(_log(float(p)))
        if len(self._logs) - 1 < self.first:
            return False
        return self._passes(self._logs[-self.window :])

    def _passes(self, logs: list[float]) -> bool:
        """Whether a window of these log-probabilities (missing ones count as log 1) passes."""
        return math.fsum(logs) / self.window >= self._log_threshold - _TOLERANCE

    def needs_exact(self, bounds: list[float]) -> list[bool]:
        """Which of the next positions' exact probabilities can decide a switch, given upper bounds on
        their log-probabilities: those inside a window that could still pass, counting what comes
        after them as certain (p = 1). Pushing a bound instead of the exact value elsewhere changes
        no decision, now or later: every window holding such a position fails either way."""
        history = self._logs[-(self.window - 1) :] if self.window > 1 else []
        logs = history + list(bounds)
        first, need = len(history), [False] * len(bounds)
        earliest = max(first, self.first - len(self._logs) + first)  # no window ends earlier in the draft
        for end in range(earliest, len(logs) + self.window - 1):  # windows ending at a new position or later
            start = end - self.window + 1
            if self._passes(logs[max(start, 0) : end + 1]):
                for j in range(max(start, first), min(end + 1, len(logs))):
                    need[j - first] = True
        return need

    def truncate(self, n: int) -> None:
        """Forget everything from index n on (after a re-tokenization rolled the scores back)."""
        del self._logs[n:]


def find_switch(probs: Iterable[float], window: int, threshold: float, min_switch: int = 0) -> int | None:
    """Index of the last kept draft token (the switch point), or None if no window passes."""
    detector = SwitchDetector(window, threshold, min_switch)
    for i, p in enumerate(probs):
        if detector.push(p):
            return i
    return None
