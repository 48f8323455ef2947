"""Small hand-written inline SVG charts (no plotting dependency): a histogram and a line chart."""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape

W, H = 520, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 130, 28, 40
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


def _frame(title: str, xlabel: str, ylabel: str, body: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        f'font-family="sans-serif" font-size="11" role="img" aria-label="{escape(title)}">'
        f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>'
        f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="#333"/>'
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#333"/>'
        f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 6}" text-anchor="middle">{escape(xlabel)}</text>'
        f'<text x="12" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" transform="rotate(-90 12 {(TOP + H - BOTTOM) / 2})">{escape(ylabel)}</text>'
        + "".join(body)
        + "</svg>"
    )


def _y_ticks(top: float, to_y: Callable[[float], float], whole: bool = False) -> list[str]:
    """Gridlines, each labelled with its value: for `whole` counts at whole numbers (a step of a
    quarter of `top`, rounded up), else at quarters of `top` (rounded labels had put 0, 1, 2, 2, 3
    on the gridlines of counts up to 3)."""
    if whole:
        step = max(1, math.ceil(top / 4))
        values: list[float] = list(range(0, int(top) + 1, step))
    else:
        values = [top * i / 4 for i in range(5)]
    out = []
    for v in values:
        y = to_y(v)
        label = f"{v:.0f}" if whole else f"{v:.2f}" if top <= 1 else f"{v:.4g}"
        out.append(f'<line x1="{LEFT - 3}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 5}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    return out


def histogram(counts: list[tuple[str, int]], title: str, xlabel: str) -> str:
    """Bars of `(label, count)` in order; labels are thinned to stay legible."""
    top = max([c for _, c in counts] + [1])
    inner_w, inner_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    bar = inner_w / max(len(counts), 1)

    def to_y(v: float) -> float:
        return H - BOTTOM - inner_h * v / top

    body = _y_ticks(top, to_y, whole=True)
    step = max(1, len(counts) // 10)
    for i, (label, count) in enumerate(counts):
        x = LEFT + i * bar
        body.append(
            f'<rect x="{x + 1:.1f}" y="{to_y(count):.1f}" width="{max(bar - 2, 1):.1f}" height="{H - BOTTOM - to_y(count):.1f}" '
            f'fill="{COLORS[0]}"><title>{escape(label)}: {count}</title></rect>'
        )
        if i % step == 0:
            body.append(f'<text x="{x + bar / 2:.1f}" y="{H - BOTTOM + 13}" text-anchor="middle">{escape(label)}</text>')
    return _frame(title, xlabel, "replies", body)


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str) -> str:
    """One line with point markers per named series; y runs from 0 to max(1, largest value)."""
    xs = sorted({x for pts in series.values() for x, _ in pts}) or [0.0, 1.0]
    lo, hi = xs[0], xs[-1] if xs[-1] > xs[0] else xs[0] + 1
    top = max([y for pts in series.values() for _, y in pts] + [1.0])
    inner_w, inner_h = W - LEFT - RIGHT, H - TOP - BOTTOM

    def to_x(v: float) -> float:
        return LEFT + inner_w * (v - lo) / (hi - lo)

    def to_y(v: float) -> float:
        return H - BOTTOM - inner_h * v / top

    body = _y_ticks(top, to_y)
    for x in xs:
        body.append(f'<text x="{to_x(x):.1f}" y="{H - BOTTOM + 13}" text-anchor="middle">{x:g}</text>')
    for k, (name, pts) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        path = " ".join(f"{to_x(x):.1f},{to_y(y):.1f}" for x, y in sorted(pts))
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        body += [
            f'<circle cx="{to_x(x):.1f}" cy="{to_y(y):.1f}" r="3" fill="{color}"><title>{escape(name)} {x:g}: {y:.3f}</title></circle>'
            for x, y in pts
        ]
        ly = TOP + 14 * k + 6
        body.append(f'<line x1="{W - RIGHT + 8}" y1="{ly}" x2="{W - RIGHT + 22}" y2="{ly}" stroke="{color}" stroke-width="2"/>')
        body.append(f'<text x="{W - RIGHT + 26}" y="{ly + 4}">{escape(name)}</text>')
    return _frame(title, xlabel, ylabel, body)
