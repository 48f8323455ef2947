"""Prompt lookup on and off, side by side in one process, on the embedded pair.

Each decode pass of a model writing a reply or a draft (the draft model while it drafts, the base
model after the switch, either model alone) feeds the latest token and up to `lookup_tokens` ids
guessed from what followed the same tokens earlier in the prompt or reply (wsd_llms/lookup.py);
the rows the model agrees with save a pass each. This serves the serving benchmark's 16 prompts
at each level and mode, alternating lookup off and on, and reports aggregate tokens/s, each
model's passes, ids guessed and accepted, and whether the replies agree.

    python benchmarks/bench_lookup.py [--rounds 2] [--levels 1 8] [--modes online base] [--max-tokens 64] [--lookup-tokens 4]

Results go to results/lookup.* (results/lookup_t<N>.* for another --max-tokens). On CUDA every case
runs once each way before the rounds, untimed, so that graph captures fall outside them.
"""

from __future__ import annotations

from bench_serving import PROMPTS
from common import alternate, device_suffix, drop_texts, mean_of, same_texts, serve, side_by_side_parser, tokens_suffix, warm_runtime, write


def main() -> None:
    parser = side_by_side_parser(modes=True)
    parser.add_argument("--lookup-tokens", type=int, default=4)
    args = parser.parse_args()
    runtime = warm_runtime(max_running=max(args.levels))

    def run(case: str) -> dict:  # "<mode> <concurrent>"
        mode, n = case.split()
        results, wall, before, after = serve(runtime, PROMPTS, int(n), max_tokens=args.max_tokens, mode=mode)
        return {
            "wall_s": wall,
            "tokens_per_s": sum(r.usage.reply_tokens for r in results) / wall,
            **{f"passes_{model}": after.passes[model] - before.passes[model] for model in after.passes},
            **{f"guesses_{k}": after.prompt_lookup[k] - before.prompt_lookup[k] for k in after.prompt_lookup},
            "texts": [r.text for r in results],
        }

    cases = [f"{mode} {n}" for mode in args.modes for n in args.levels]
    ways = {"off": lambda: runtime.configure(lookup_tokens=0), "on": lambda: runtime.configure(lookup_tokens=args.lookup_tokens)}
    say = lambda r: f"{r['tokens_per_s']:.1f} tok/s, {r['passes_draft']} + {r['passes_base']} passes"  # noqa: E731
    runs = alternate(args.rounds, ways, cases, run, say, warm_up=runtime.device.type == "cuda")

    rows = [
        "| mode | concurrent | tok/s, off / on | ratio | draft passes, off / on | base passes, off / on | ids guessed / accepted | replies equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for key in cases:
        mode, n = key.split()
        off, on = runs["off"][key], runs["on"][key]
        same = same_texts(off + on)
        t = [mean_of(off, "tokens_per_s"), mean_of(on, "tokens_per_s")]
        p = {model: [mean_of(off, f"passes_{model}"), mean_of(on, f"passes_{model}")] for model in ("draft", "base")}
        fed, accepted = mean_of(on, "guesses_fed"), mean_of(on, "guesses_accepted")
        summary[key] = {"tokens_per_s": t, "passes": p, "guesses_fed": fed, "guesses_accepted": accepted, "replies_equal": same}
        draft, base = (f"{p[m][0]:.0f} / {p[m][1]:.0f}" if p[m][0] else "-" for m in ("draft", "base"))
        rows.append(f"| {mode} | {n} | {t[0]:.1f} / {t[1]:.1f} | {t[1] / t[0]:.2f}x | {draft} | {base} | {fed:.0f} / {accepted:.0f} | {'yes' if same else 'NO'} |")
    rows += [
        "",
        f"Greedy, max_tokens={args.max_tokens}, lookup_tokens={args.lookup_tokens} when on, dtype {runtime.dtype}; "
        f"the serving benchmark's 16 prompts; means of {args.rounds} rounds, alternating.",
    ]
    drop_texts(runs)
    name = "lookup" + tokens_suffix(args.max_tokens) + device_suffix(runtime.device)
    write(name, {"dtype": str(runtime.dtype), "lookup_tokens": args.lookup_tokens, "cases": summary, "runs": runs}, "\n".join(rows))


if __name__ == "__main__":
    main()
