"""Scoring with bounds against exact scoring, side by side in one process, on the embedded pair.

The switch rule needs a draft token's exact probability only where a window could pass
(wsd_llms/output_head.py); elsewhere an upper bound from the first 8192 words of the base
vocabulary decides the same. This serves the serving benchmark's 16 prompts at 1 and 8
concurrent, alternating exact scoring and bounds, and reports seconds in scoring, aggregate
tokens/s, how many scored tokens needed their exact probability, and whether the replies agree.

    python benchmarks/bench_scoring.py [--rounds 2] [--levels 1 8] [--max-tokens 64] [--dtype auto]
"""

from __future__ import annotations

from bench_serving import PROMPTS
from common import alternate, device_suffix, drop_texts, mean_of, same_texts, serve, side_by_side_parser, warm_runtime, write

from wsd_llms.switch import SwitchDetector


class ExactCounter:
    """Counts the scored positions whose exact probability the switch rule asked for."""

    def __init__(self) -> None:
        self.needed = self.bounded = 0
        self._original = SwitchDetector.needs_exact

    def __enter__(self) -> ExactCounter:
        counter = self

        def counting(detector: SwitchDetector, bounds: list[float]) -> list[bool]:
            need = counter._original(detector, bounds)
            counter.needed += sum(need)
            counter.bounded += len(need)
            return need

        SwitchDetector.needs_exact = counting  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        SwitchDetector.needs_exact = self._original  # type: ignore[method-assign]


def main() -> None:
    parser = side_by_side_parser()
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU), bfloat16, ...")
    args = parser.parse_args()
    runtime = warm_runtime(dtype=args.dtype, max_running=max(args.levels))
    head = runtime.engine.runners["base"].head

    def run(n: int) -> dict:
        with ExactCounter() as counter:
            results, wall, before, after = serve(runtime, PROMPTS, n, max_tokens=args.max_tokens)
        return {
            "wall_s": wall,
            "tokens_per_s": sum(r.usage.reply_tokens for r in results) / wall,
            "score_s": after.pass_seconds["score"] - before.pass_seconds["score"],
            "exact_fraction": counter.needed / counter.bounded if counter.bounded else None,
            "texts": [r.text for r in results],
        }

    ways = {way: (lambda on=way == "bounds": setattr(head, "use_bound", on)) for way in ("exact", "bounds")}
    runs = alternate(args.rounds, ways, args.levels, run, lambda r: f"{r['tokens_per_s']:.1f} tok/s, scoring {r['score_s']:.2f} s")
    head.use_bound = True

    rows = [
        "| concurrent | scoring (s), exact / bounds | ratio | tok/s, exact / bounds | ratio | scored tokens needing their exact probability | replies equal |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for n in args.levels:
        exact, bounds = runs["exact"][n], runs["bounds"][n]
        same = same_texts(exact + bounds)
        fraction = mean_of(bounds, "exact_fraction")
        summary[n] = {
            "score_s": [mean_of(exact, "score_s"), mean_of(bounds, "score_s")],
            "tokens_per_s": [mean_of(exact, "tokens_per_s"), mean_of(bounds, "tokens_per_s")],
            "exact_fraction": fraction,
            "replies_equal": same,
        }
        s, t = summary[n]["score_s"], summary[n]["tokens_per_s"]
        rows.append(
            f"| {n} | {s[0]:.2f} / {s[1]:.2f} | {s[1] / s[0]:.2f}x | {t[0]:.1f} / {t[1]:.1f} | {t[1] / t[0]:.2f}x | {fraction:.0%} | {'yes' if same else 'NO'} |"
        )
    rows += ["", f"Online WSD, greedy, max_tokens={args.max_tokens}, dtype {runtime.dtype}; means of {args.rounds} rounds, alternating."]
    drop_texts(runs)
    name = "scoring" + (f"_{args.dtype}" if args.dtype != "auto" else "") + device_suffix(runtime.device)
    write(name, {"dtype": str(runtime.dtype), "levels": summary, "runs": runs}, "\n".join(rows))


if __name__ == "__main__":
    main()
