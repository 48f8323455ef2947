"""What `repetition_penalty` does to replies on the embedded pair (greedy): how much of each reply
its most repeated word 3-gram covers (the eval's repetition signal), how many replies are
degenerate (half or more of them one repeated 3-gram) and how many run to max_tokens, over the
bundled eval prompts, online WSD and the base model alone, at each penalty. A quality figure, not
a speed one: the replies run 8 at a time and their timings are not recorded.

    python benchmarks/bench_repetition.py [--penalties 1.0 1.2] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

from common import warm_runtime, write

from wsd_llms.eval.prompts import load_prompts
from wsd_llms.eval.signals import is_degenerate, repetition_share


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--penalties", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.3])
    parser.add_argument("--modes", nargs="+", default=["online", "base"])
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    prompts, _ = load_prompts()
    runtime = warm_runtime()
    rows, texts = [], {}
    for mode in args.modes:
        for penalty in args.penalties:
            replies = _serve(runtime, [p.messages for p in prompts], mode=mode, max_tokens=args.max_tokens, repetition_penalty=penalty)
            texts[(mode, penalty)] = [r.text for r in replies]
            shares = [repetition_share(r.text) for r in replies]
            row = {
                "mode": mode,
                "repetition_penalty": penalty,
                "replies": len(replies),
                "mean_repetition": sum(shares) / len(shares),
                "degenerate": sum(is_degenerate(r.text) for r in replies),
                "at_max_tokens": sum(r.finish_reason == "length" for r in replies),
                "mean_reply_tokens": sum(r.usage.reply_tokens for r in replies) / len(replies),
                "changed_from_first": sum(a != b for a, b in zip(texts[(mode, args.penalties[0])], texts[(mode, penalty)])),
            }
            rows.append(row)
            print(row, flush=True)
    examples = {
        f"{mode} {penalty}": texts[(mode, penalty)][_most_repetitive(texts[(mode, args.penalties[0])])][:300]
        for mode in args.modes
        for penalty in args.penalties
    }
    table = "\n".join(
        [
            f"{len(prompts)} eval prompts, greedy, max_tokens={args.max_tokens}\n",
            "| mode | repetition_penalty | mean repetition | degenerate | at max_tokens | mean reply tokens | replies changed |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {r['mode']} | {r['repetition_penalty']} | {r['mean_repetition']:.3f} | {r['degenerate']} | {r['at_max_tokens']} | "
                f"{r['mean_reply_tokens']:.0f} | {r['changed_from_first']} |"
                for r in rows
            ),
        ]
    )
    write("repetition", {"max_tokens": args.max_tokens, "rows": rows, "examples": examples}, table)


def _serve(runtime, conversations: list[list[dict]], **params) -> list:
    """Each conversation's reply, 8 at a time (common.serve sends one user message each; these are whole conversations)."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda messages: runtime.generate(messages, **params), conversations))


def _most_repetitive(texts: list[str]) -> int:
    """The index of the reply its most repeated 3-gram covers most of (an example to show)."""
    return max(range(len(texts)), key=lambda i: repetition_share(texts[i]))


if __name__ == "__main__":
    main()
