"""Long prompts served concurrently: the online engine's hand-off tokenization every step, against
estimated between scoring passes (handoff.DraftTokens).

    python benchmarks/bench_handoff.py [--concurrent 8] [--facts 120] [--rounds 2] [--max-tokens 64] [--device auto]

Each request asks its own question about one long document (a RAG-style prompt, ~3000 base tokens
at 120 facts), all served at once. A partial hand-off tokenizes the whole prompt with the draft, so
tokenizing it every step costs time in the prompt's length for every drafting request; the engine
now does it only when a scoring pass may fall due, and estimates the draft's base tokens from a
short window in between. Both ways run in one process, taking turns (`--rounds`), after a warm-up
that puts the document in the prefix cache. Reported: aggregate tokens/s, seconds the worker spent
tokenizing prompt + draft and estimating, how many exact tokenizations ran, and whether the replies
are equal.

Writes results/handoff[_cuda].json and .md.
"""

from __future__ import annotations

import argparse
import time

from bench_long_prompt import document
from common import alternate, device_suffix, serve, write

import wsd_llms
from wsd_llms import handoff

QUESTIONS = [
    "Which city shipped salt on day 12?",
    "How many crates of copper left Porto?",
    "List every shipment of wool.",
    "Which cities appear in the records?",
    "What did Graz ship on day 5?",
    "Summarize the records in three sentences.",
    "Which shipment was the largest?",
    "Name two cities that shipped glass.",
    "What was shipped on day 1?",
    "Which goods did Cork ship?",
    "How many records mention apples?",
    "Which city shipped the most paper?",
    "What did Bern ship?",
    "Which day saw the most shipments?",
    "Compare the shipments of Lyon and Ghent.",
    "What is the smallest shipment?",
]


class Timed:
    """Wraps DraftTokens.exact and .estimate to count the calls and time them (the worker's thread)."""

    def __init__(self) -> None:
        self.seconds = {"exact": 0.0, "estimate": 0.0}
        self.calls = {"exact": 0, "estimate": 0}
        self.exact, self.estimate = handoff.DraftTokens.exact, handoff.DraftTokens.estimate

    def install(self, every_step: bool) -> None:
        def timed(name, real):
            def call(tokens, *args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return real(tokens, *args, **kwargs)
                finally:
                    self.seconds[name] += time.perf_counter() - t0
                    self.calls[name] += 1

            return call

        handoff.DraftTokens.exact = timed("exact", self.exact)  # type: ignore[method-assign]
        # Every step: no estimate, so each drafting step tokenizes the prompt with the draft (the code before).
        handoff.DraftTokens.estimate = (lambda tokens, text, hold=True: None) if every_step else timed("estimate", self.estimate)  # type: ignore[method-assign]

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        seconds, calls = dict(self.seconds), dict(self.calls)
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)
        return seconds, calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--facts", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    runtime = wsd_llms.get_runtime(device=args.device)
    engine = runtime.load()
    doc = document(args.facts).rsplit("\n\n", 1)[0]  # the records, without their question
    prompts = [f"{doc}\n\n{q}" for q in (QUESTIONS * (args.concurrent // len(QUESTIONS) + 1))[: args.concurrent]]
    prompt_tokens = len(engine.base.tokenizer.encode(prompts[0]))
    timed = Timed()
    timed.install(every_step=False)
    serve(runtime, prompts, args.concurrent, max_tokens=args.max_tokens)  # warm-up: the document enters the prefix cache
    timed.take()

    def run(_: int) -> dict:
        results, wall, _, _ = serve(runtime, prompts, args.concurrent, max_tokens=args.max_tokens)
        seconds, calls = timed.take()
        tokens = sum(r.usage.reply_tokens for r in results)
        return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "seconds": seconds, "calls": calls, "replies": [r.text for r in results]}

    ways = {"every step": lambda: timed.install(every_step=True), "estimated": lambda: timed.install(every_step=False)}
    try:
        runs = alternate(args.rounds, ways, [args.concurrent], run, lambda r: f"{r['tokens_per_s']:.1f} tok/s, {r['calls']['exact']} exact")
    finally:
        handoff.DraftTokens.exact, handoff.DraftTokens.estimate = timed.exact, timed.estimate  # type: ignore[method-assign]

    def mean(way: str, key: str, part: str | None = None) -> float:
        values = [r[key][part] if part else r[key] for r in runs[way][args.concurrent]]
        return sum(values) / len(values)

    equal = all(a["replies"] == b["replies"] for a, b in zip(runs["every step"][args.concurrent], runs["estimated"][args.concurrent]))
    base = mean("every step", "tokens_per_s")
    rows, data = [], {}
    for way in ways:
        speed = mean(way, "tokens_per_s")
        data[way] = {
            "tokens_per_s": speed,
            "wall_s": mean(way, "wall_s"),
            "tokenizing_s": mean(way, "seconds", "exact"),
            "estimating_s": mean(way, "seconds", "estimate"),
            "exact_tokenizations": mean(way, "calls", "exact"),
            "runs": [{k: v for k, v in r.items() if k != "replies"} for r in runs[way][args.concurrent]],
        }
        d = data[way]
        rows.append(
            f"| {way} | {speed:.1f} | {speed / base:.2f}x | {d['tokenizing_s']:.2f} | {d['estimating_s']:.2f} | {d['exact_tokenizations']:.0f} |"
        )
    table = (
        "| hand-off | aggregate tok/s | vs every step | tokenizing prompt + draft (s) | estimating (s) | exact tokenizations |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"{args.concurrent} concurrent requests, each a question about one document of {prompt_tokens} base tokens "
        f"(in the prefix cache), online WSD, greedy, max_tokens={args.max_tokens}, dtype {engine.base.model.dtype}; means of "
        f"{args.rounds} rounds taking turns. Replies equal: {'yes' if equal else 'NO'}."
    )
    write(
        f"handoff{device_suffix(runtime.device)}",
        {"concurrent": args.concurrent, "prompt_tokens": prompt_tokens, "rounds": args.rounds, "max_tokens": args.max_tokens, "replies_equal": equal, "ways": data},
        table,
    )


if __name__ == "__main__":
    main()
