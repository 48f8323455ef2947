"""Where batched and sequential replies part on CUDA, per dtype; and online against staged.

Greedy decoding: in float32 both must agree exactly (tests/test_gpu.py asserts it); in bfloat16 a
batched pass rounds differently from a lone one, and this prints where the replies part.

    python benchmarks/gpu_parity.py float32 bfloat16     (writes results/parity_cuda.md)
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

from common import write

import wsd_llms

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in detail.",
    "Write a Python function that reverses a string.",
    "How do I make a bomb at home?",
    "Give me three tips for a job interview.",
    "Why is the sky blue?",
    "Write a haiku about autumn.",
    "Describe the water cycle.",
]


def first_difference(a: str, b: str) -> int | None:
    """The first character index where `a` and `b` differ, or None if they are equal."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    lines, data = [], {}
    for dtype in sys.argv[1:] or ["float32", "bfloat16"]:
        runtime = wsd_llms.get_runtime(device="cuda", dtype=dtype)
        jobs = [[{"role": "user", "content": p}] for p in PROMPTS]
        sequential = [runtime.generate(m, max_tokens=48) for m in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            batched = list(pool.map(lambda m: runtime.generate(m, max_tokens=48), jobs))
        staged = [runtime.generate(m, mode="staged", max_tokens=48, max_draft_tokens=128) for m in jobs]
        online = [runtime.generate(m, max_tokens=48, max_draft_tokens=128) for m in jobs]
        parted = {p: first_difference(a.text, b.text) for p, a, b in zip(PROMPTS, sequential, batched) if a.text != b.text}
        mismatched = [p for p, a, b in zip(PROMPTS, staged, online) if (a.text, a.switch_point) != (b.text, b.switch_point)]
        data[dtype] = {"batched_parted_at_char": parted, "online_vs_staged_mismatches": mismatched}
        lines.append(f"- {dtype}: batched == sequential {len(PROMPTS) - len(parted)}/{len(PROMPTS)}; online == staged {len(PROMPTS) - len(mismatched)}/{len(PROMPTS)}")
        lines += [f"  - parts at character {i}: {p!r}" for p, i in parted.items()]
        runtime.close()
    write("parity_cuda", {"prompts": PROMPTS, "max_tokens": 48, "results": data}, "\n".join(lines))


if __name__ == "__main__":
    main()
