"""The greedy screen against the full output projection, side by side in one process, on the embedded pair.

A greedy step needs only the id of the largest logit (of 262144 for the base, 49152 for the
draft). The runtime screens them with a bfloat16 copy of the projection and computes only the
candidates again in float32 (wsd_llms/output_head.py); the id is the full projection's. This
serves the serving benchmark's 16 prompts, online WSD and the one model alone, at 1 and 8
concurrent, alternating the full projection and the screen for one model's head (--model), and
reports aggregate tokens/s, seconds in that model's passes (its decoding, for the draft with its
prefill; projections included), how many greedy rows the screen decided, and whether the replies agree.

    python benchmarks/bench_greedy_head.py [--model base] [--rounds 2] [--levels 1 8] [--modes online <model>] [--max-tokens 64]

Results go to results/greedy_head.* (results/greedy_head_draft.* for --model draft, and _t<N> for
another --max-tokens).
"""

from __future__ import annotations

from bench_serving import PROMPTS
from common import alternate, device_suffix, drop_texts, mean_of, same_texts, serve, side_by_side_parser, tokens_suffix, warm_runtime, write


def main() -> None:
    parser = side_by_side_parser(modes=True)
    parser.add_argument("--model", choices=["base", "draft"], default="base", help="whose head the screen is toggled for")
    parser.set_defaults(modes=None)  # online WSD and --model's model alone
    args = parser.parse_args()
    args.modes = args.modes or ["online", args.model]
    runtime = warm_runtime(max_running=max(args.levels))
    head = runtime.engine.runners[args.model].head
    if head._screen is None:
        raise SystemExit(f"this {args.model} model's head has no greedy screen (see output_head.OutputHead)")

    def run(case: str) -> dict:  # "<mode> <concurrent>"
        mode, n = case.split()
        screened, fallback = head.screened_rows, head.fallback_rows
        results, wall, before, after = serve(runtime, PROMPTS, int(n), max_tokens=args.max_tokens, mode=mode)
        return {
            "wall_s": wall,
            "tokens_per_s": sum(r.usage.reply_tokens for r in results) / wall,
            "model_s": after.pass_seconds[args.model] - before.pass_seconds[args.model],
            "screened_rows": head.screened_rows - screened,
            "fallback_rows": head.fallback_rows - fallback,
            "texts": [r.text for r in results],
        }

    cases = [f"{mode} {n}" for mode in args.modes for n in args.levels]
    ways = {way: (lambda on=way == "screen": setattr(head, "use_screen", on)) for way in ("full", "screen")}
    runs = alternate(args.rounds, ways, cases, run, lambda r: f"{r['tokens_per_s']:.1f} tok/s, {args.model} passes {r['model_s']:.2f} s")
    head.use_screen = True

    rows = [
        f"| mode | concurrent | tok/s, full / screen | ratio | {args.model} {'decoding' if args.model == 'base' else 'passes'} (s), full / screen | ratio | greedy rows the screen decided | replies equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for key in cases:
        mode, n = key.split()
        full, screen = runs["full"][key], runs["screen"][key]
        decided = sum(x["screened_rows"] for x in screen)
        share = decided / max(1, decided + sum(x["fallback_rows"] for x in screen))
        same = same_texts(full + screen)
        t, b = [mean_of(full, "tokens_per_s"), mean_of(screen, "tokens_per_s")], [mean_of(full, "model_s"), mean_of(screen, "model_s")]
        summary[key] = {"tokens_per_s": t, f"{args.model}_s": b, "screen_decided": share, "replies_equal": same}
        rows.append(f"| {mode} | {n} | {t[0]:.1f} / {t[1]:.1f} | {t[1] / t[0]:.2f}x | {b[0]:.2f} / {b[1]:.2f} | {b[1] / b[0]:.2f}x | {share:.1%} | {'yes' if same else 'NO'} |")
    rows += [
        "",
        f"The {args.model} model's head, screen on and off; the other's as loaded. Greedy, max_tokens={args.max_tokens}, dtype {runtime.dtype}; "
        f"the serving benchmark's 16 prompts; means of {args.rounds} rounds, alternating.",
    ]
    drop_texts(runs)
    name = "greedy_head" + ("_draft" if args.model == "draft" else "") + tokens_suffix(args.max_tokens) + device_suffix(runtime.device)
    write(name, {"model": args.model, "dtype": str(runtime.dtype), "cases": summary, "runs": runs}, "\n".join(rows))


if __name__ == "__main__":
    main()
