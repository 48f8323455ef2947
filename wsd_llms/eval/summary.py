"""Aggregates per-prompt records into one row of numbers per setting (the report's tables and plots)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from .runner import Record, Setting

Summary = dict[str, Any]


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile (q in (0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(setting: Setting, records: list[Record], wall_s: float) -> Summary:
    """One setting's numbers from its records; failed requests are counted, not averaged in."""
    ok = [r for r in records if r["error"] is None]
    reply = sum(r["reply_tokens"] for r in ok)
    wsd = setting.mode == "online"
    points = [r["switch_point"] for r in ok if r["switch_point"] is not None]
    leaks = [r["leak"] for r in ok if r["leak"] is not None]
    declines = [r["declined"] for r in ok if r["declined"] is not None]
    return {
        "setting": setting.name,
        "mode": setting.mode,
        "threshold": setting.threshold,
        "window": setting.window,
        "prompts": len(records),
        "errors": len(records) - len(ok),
        "switch_rate": _share([r["switch_point"] is not None for r in ok]) if wsd else None,
        "no_switch": _share([r["switch_point"] is None for r in ok]) if wsd else None,
        "switch_points": sorted(points) if wsd else [],
        "switch_median": statistics.median(points) if points else None,
        "reply_tokens": reply,
        "draft_token_share": sum(r["draft_written_tokens"] for r in ok) / reply if reply else None,
        "base_token_share": sum(r["base_written_tokens"] for r in ok) / reply if reply else None,
        "latency_p50_s": _quantile([r["total_s"] for r in ok], 0.5),
        "latency_p90_s": _quantile([r["total_s"] for r in ok], 0.9),
        "ttft_p50_s": _quantile([r["ttft_s"] for r in ok if r["ttft_s"] is not None], 0.5),
        "wall_s": wall_s,
        "tokens_per_s": reply / wall_s if wall_s > 0 else None,
        "repetition": statistics.fmean(r["repetition"] for r in ok) if ok else None,
        "degenerate": _share([r["degenerate"] for r in ok]),
        "leak": _share(leaks),
        "empty": _share([r["empty"] for r in ok]),
        "truncated": _share([r["truncated"] for r in ok]),
        "declined": _share(declines),
        "decline_prompts": len(declines),
    }


def summarize_all(settings: list[Setting], records: list[Record], walls: dict[str, float]) -> list[Summary]:
    return [summarize(s, [r for r in records if r["setting"] == s.name], walls.get(s.name, 0.0)) for s in settings]
