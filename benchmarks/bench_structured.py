"""The cost of grammar-constrained decoding per token, on the embedded pair (greedy).

For each method (the draft alone, the base alone, online WSD) the same prompts run without and
with a JSON-schema constraint; each reply is timed per token (decode seconds over reply tokens),
so replies of different lengths compare. Also reported: the guide's own cost per token (mask +
accept) for each model's tokenizer, measured apart from the forward passes.

    python benchmarks/bench_structured.py [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import median, write

import wsd_llms
from wsd_llms.params import parse_params
from wsd_llms.structured import Guide, constraint_spec

PROMPTS = [
    "Describe the city of Paris.",
    "Give me a recipe for pancakes.",
    "List three facts about the Moon.",
    "Describe your ideal weekend.",
]
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "items": {"type": "array", "items": {"type": "string"}},
        "rating": {"type": "integer"},
    },
    "required": ["title", "items", "rating"],
}
METHODS = {"draft": "draft", "base": "base", "online": "online"}


def per_token(result: wsd_llms.WSDResult) -> float:
    tokens = result.usage.draft_tokens if result.mode == "draft" else result.usage.reply_tokens
    return (result.timings.total) / max(tokens, 1)


def guide_cost(model, spec: str, steps: int) -> float:
    """Seconds per token of mask + accept alone, following the greedy choice on random logits."""
    guide = Guide(model, spec)
    vocab = guide.bitmask.shape[-1] * 32
    logits = torch.randn(vocab)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        token = int(torch.argmax(guide.mask(logits)))
        if token in model.eos_ids:
            break
        guide.accept(token)
        n += 1
    return (time.perf_counter() - t0) / max(n, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    rt = wsd_llms.get_runtime()
    engine = rt.load()
    rt.generate([{"role": "user", "content": "Hi"}], max_tokens=4)  # warm-up
    rows, data = [], {"max_tokens": args.max_tokens, "methods": {}}
    for method in METHODS:
        free, constrained = [], []
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            free.append(per_token(rt.generate(messages, mode=method, max_tokens=args.max_tokens)))
            constrained.append(
                per_token(rt.generate(messages, mode=method, max_tokens=args.max_tokens, response_format=SCHEMA))
            )
        f, c = median(free), median(constrained)
        data["methods"][method] = {"free_s_per_token": f, "constrained_s_per_token": c, "overhead": c / f - 1}
        rows.append(f"| {method} | {f * 1000:.1f} | {c * 1000:.1f} | {100 * (c / f - 1):+.1f}% |")
    spec = constraint_spec(parse_params(response_format=SCHEMA))
    assert spec is not None
    guide = {name: guide_cost(model, spec, args.max_tokens) for name, model in (("draft", engine.draft), ("base", engine.base))}
    data["guide_s_per_token"] = guide
    table = "\n".join(
        [
            f"Constrained (JSON schema) vs unconstrained decoding, max_tokens={args.max_tokens}, median over {len(PROMPTS)} prompts",
            "",
            "| method | free ms/token | constrained ms/token | overhead |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Guide alone (mask + accept): draft tokenizer {guide['draft'] * 1e3:.3f} ms/token, "
            f"base tokenizer {guide['base'] * 1e3:.3f} ms/token",
        ]
    )
    write("structured", data, table)


if __name__ == "__main__":
    main()
