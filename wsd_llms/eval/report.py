"""Writes the results three ways: a self-contained HTML page (tables and inline SVG plots), JSON, Markdown."""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path
from typing import Any

from . import svg

Report = dict[str, Any]
"""Keys: meta, problems, definitions, settings (one summary each), judge (or None), records."""

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (summary key, header, format: pct | s | num | int)
    ("switch_rate", "switched", "pct"),
    ("switch_median", "median switch", "num"),
    ("draft_token_share", "draft tokens", "pct"),
    ("base_token_share", "base tokens", "pct"),
    ("latency_p50_s", "latency p50", "s"),
    ("latency_p90_s", "p90", "s"),
    ("tokens_per_s", "tok/s", "num"),
    ("repetition", "repetition", "num"),
    ("degenerate", "degenerate", "pct"),
    ("leak", "role leak", "pct"),
    ("empty", "empty", "pct"),
    ("truncated", "truncated", "pct"),
    ("declined", "declined", "pct"),
    ("errors", "errors", "int"),
)


def fmt(value: Any, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{100 * value:.0f}%"
    if kind == "s":
        return f"{value:.2f}s"
    if kind == "int":
        return str(value)
    return f"{value:.2f}" if isinstance(value, float) and not value.is_integer() else f"{value:g}"


def headline_rows(report: Report) -> list[list[str]]:
    return [[s["setting"]] + [fmt(s[key], kind) for key, _, kind in COLUMNS] for s in report["settings"]]


def headers() -> list[str]:
    return ["setting"] + [h for _, h, _ in COLUMNS]


# ------------------------------------------------------------------ plots


def switch_histogram(summary: dict[str, Any]) -> str:
    """Switch points of one WSD setting in bins of equal width, plus a 'none' bar for no switch."""
    points = summary["switch_points"]
    width = max(1, math.ceil((max(points) + 1) / 20)) if points else 1
    bins = (max(points) // width + 1) if points else 0
    counts = [(f"{i * width}" if width == 1 else f"{i * width}–{i * width + width - 1}", 0) for i in range(bins)]
    for p in points:
        label, c = counts[p // width]
        counts[p // width] = (label, c + 1)
    none = round(summary["no_switch"] * (summary["prompts"] - summary["errors"])) if summary["no_switch"] is not None else 0
    counts.append(("none", none))
    return svg.histogram(counts, f"Switch point, {summary['setting']}", "kept draft tokens (base tokens); 'none' = no switch")


def sweep_plots(report: Report) -> list[str]:
    """Threshold against switch rate (one line per window) and against quality signals (at the window
    with the most thresholds, the main one among equals: a sweep of `--windows 4` beside the main w=6
    had plotted the main setting's one point)."""
    wsd = [s for s in report["settings"] if s["mode"] == "online"]
    windows = sorted({s["window"] for s in wsd})
    rate = {f"w={w}": [(s["threshold"], s["switch_rate"]) for s in wsd if s["window"] == w and s["switch_rate"] is not None] for w in windows}
    main_w = report["meta"]["window"]
    quality_w = max(windows, key=lambda w: (sum(s["window"] == w for s in wsd), w == main_w), default=main_w)
    at_w = [s for s in wsd if s["window"] == quality_w]
    quality_keys = (("draft_token_share", "draft tokens"), ("repetition", "repetition"), ("degenerate", "degenerate"),
                    ("leak", "role leak"), ("truncated", "truncated"), ("empty", "empty"), ("declined", "declined"))
    quality = {label: [(s["threshold"], s[key]) for s in at_w if s[key] is not None] for key, label in quality_keys}
    return [
        svg.line_chart(rate, "Threshold τ vs switch rate", "threshold τ", "share of replies that switched"),
        svg.line_chart({k: v for k, v in quality.items() if v}, f"Threshold τ vs quality signals (w={quality_w})", "threshold τ", "share / mean"),
    ]


def main_summary(report: Report) -> dict[str, Any] | None:
    name = report["meta"]["main_setting"]
    return next((s for s in report["settings"] if s["setting"] == name), None)


# ------------------------------------------------------------------ writers


def to_json(report: Report) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)


def to_markdown(report: Report) -> str:
    meta = report["meta"]
    lines = [
        f"# wsd-llms eval: {meta['draft']} → {meta['base']}",
        "",
        f"{meta['prompts']} prompts from `{meta['prompts_file']}`, max_tokens={meta['max_tokens']}, device {meta['device']}, "
        f"wall time {meta['wall_s']:.1f}s.",
        "",
        "| " + " | ".join(headers()) + " |",
        "|" + "---|" * len(headers()),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in headline_rows(report)]
    if report["judge"]:
        lines += ["", "## Judge", "", judge_sentence(report["judge"])]
    if report["problems"]:
        lines += ["", "## Problems in the input", ""] + [f"- {p}" for p in report["problems"]]
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in report["definitions"].items()]
    return "\n".join(lines) + "\n"


def judge_sentence(judge: dict[str, Any]) -> str:
    return (
        f"Judge `{judge['model']}` on {judge['pairs']} prompts, each pair judged in both orders: WSD preferred {judge['wsd_wins']}, "
        f"base-only preferred {judge['base_wins']}, tie {judge['ties']} (the verdict flipped when the order was swapped). "
        f"{judge['caveat']}"
    )


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _records_table(records: list[dict[str, Any]]) -> str:
    head = ["setting", "prompt", "category", "switch", "finish", "tokens", "rep.", "leak", "declined", "reply"]
    rows = []
    for r in records:
        if r["error"] is not None:
            rows.append([r["setting"], r["prompt_id"], r["category"], "", "error", "", "", "", "", r["error"]])
            continue
        rows.append([
            r["setting"], r["prompt_id"], r["category"], fmt(r["switch_point"], "int"), r["finish_reason"],
            str(r["reply_tokens"]), f"{r['repetition']:.2f}", fmt(r["leak"], "int"), fmt(r["declined"], "int"), r["text"],
        ])
    return _table(head, rows)


CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
    "th{background:#f3f3f3}.plots svg{margin:0 1em 1em 0;border:1px solid #eee}.warn{color:#a40}"
    "td:last-child{white-space:pre-wrap;max-width:520px}"
)


def plots(report: Report) -> dict[str, str]:
    """The report's plots by file stem: the main setting's switch histogram, then the sweep's."""
    main = main_summary(report)
    out = {"switch": switch_histogram(main)} if main is not None else {}
    sweep = sweep_plots(report)
    return {**out, "sweep_switch_rate": sweep[0], "sweep_quality": sweep[1]}


def to_html(report: Report, figures: dict[str, str]) -> str:
    """The self-contained page: tables, the given plots inline, definitions and every reply."""
    meta = report["meta"]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>wsd-llms eval</title><style>{CSS}</style></head><body>",
        f"<h1>wsd-llms eval</h1><p>draft <b>{escape(meta['draft'])}</b> → base <b>{escape(meta['base'])}</b>; "
        f"{meta['prompts']} prompts from <code>{escape(meta['prompts_file'])}</code>; max_tokens={meta['max_tokens']}; "
        f"device {escape(meta['device'])}; wall time {meta['wall_s']:.1f}s.</p>",
    ]
    if report["problems"]:
        items = "".join(f"<li>{escape(p)}</li>" for p in report["problems"])
        parts.append(f"<h2 class='warn'>Problems in the input</h2><ul class='warn'>{items}</ul>")
    parts += [
        "<h2>Per setting</h2>", _table(headers(), headline_rows(report)),
        "<h2>Plots</h2><div class='plots'>", *figures.values(), "</div>",
    ]
    if report["judge"]:
        parts.append(f"<h2>Judge</h2><p>{escape(judge_sentence(report['judge']))}</p>")
    defs = "".join(f"<dt><b>{escape(k)}</b></dt><dd>{escape(v)}</dd>" for k, v in report["definitions"].items())
    parts += [
        f"<h2>Definitions</h2><dl>{defs}</dl>",
        f"<h2>Replies</h2><details><summary>{len(report['records'])} replies</summary>{_records_table(report['records'])}</details>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_all(report: Report, out: Path) -> dict[str, Path]:
    """report.html, report.json, report.md and each plot as <name>.svg under `out` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "report.html", "json": out / "report.json", "md": out / "report.md"}
    figures = plots(report)
    paths["html"].write_text(to_html(report, figures), encoding="utf-8")
    paths["json"].write_text(to_json(report), encoding="utf-8")
    paths["md"].write_text(to_markdown(report), encoding="utf-8")
    for name, plot in figures.items():
        paths[name] = out / f"{name}.svg"
        paths[name].write_text(plot, encoding="utf-8")
    return paths
