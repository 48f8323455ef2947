"""A long prompt arriving while other streams decode: how long they pause when the prompt is fed
whole in one step, against fed a piece per step (chunked prefill, the runtime's `prefill_chunk`).

    python benchmarks/bench_long_prompt.py [--streams 4] [--facts 120] [--chunks 0 512 256 128] [--device auto]

For each setting (0 = the whole prompt in one step), `streams` chat requests start; once each has
streamed text, one request with a long document (a RAG-style prompt) arrives. Reported, while the
document is prefilled: the longest step (every running stream advances one token per step, so
this is how long they all stand still) and the steps per second (tokens per second of each
stream); then the document request's time to first token, that of a short question sent once
the document's prefill has begun (it must not wait for the whole document), and the run's
aggregate tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from common import device_suffix, write

import wsd_llms
from wsd_llms import TextDelta

STREAMS = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how a car engine works.",
    "Describe, step by step, how to plan a garden.",
    "Tell me everything you know about the history of tea.",
    "Write a long letter to a friend about a journey.",
    "Explain in detail how vaccines train the immune system.",
    "Describe a day in the life of a medieval baker.",
    "Write a long guide to learning a new language.",
]
QUESTION = "What is the capital of Italy?"
CITIES = ["Lyon", "Porto", "Graz", "Turku", "Ghent", "Split", "Brno", "Malmo", "Cork", "Bern"]


def document(facts: int) -> str:
    """A long, varied context with a question at the end, like a retrieval-augmented prompt."""
    lines = [
        f"Record {i}: the warehouse in {CITIES[i % len(CITIES)]} shipped {(i * 37) % 900 + 100} crates of "
        f"{['apples', 'copper', 'paper', 'glass', 'wool', 'salt'][i % 6]} on day {(i * 11) % 28 + 1}."
        for i in range(facts)
    ]
    return "Use the records below to answer.\n\n" + "\n".join(lines) + "\n\nWhich city shipped salt on day 12?"


async def one_setting(runtime: wsd_llms.WSDRuntime, streams: int, doc: str, max_tokens: int) -> dict:
    """Start the streams, send the document once they all stream, and time everything."""
    engine, steps = runtime.load(), []
    step = engine.step

    def timed_step() -> None:  # the engine's own step, timed
        t0 = time.perf_counter()
        step()
        steps.append((t0, time.perf_counter() - t0))

    engine.step = timed_step  # type: ignore[method-assign]
    streaming = [False] * streams
    tokens = [0] * (streams + 2)
    all_streaming = asyncio.Event()

    async def stream(i: int) -> None:
        async for event in runtime.astream([{"role": "user", "content": STREAMS[i % len(STREAMS)]}], max_tokens=max_tokens):
            if isinstance(event, TextDelta):
                streaming[i] = True
                if all(streaming):
                    all_streaming.set()
            else:
                tokens[i] = event.result.usage.reply_tokens

    async def timed_request(content: str, slot: int) -> tuple[float, float, int]:
        """(sent, first text, base prompt tokens) of one request."""
        sent, first = time.perf_counter(), None
        async for event in runtime.astream([{"role": "user", "content": content}], max_tokens=32):
            if isinstance(event, TextDelta) and first is None:
                first = time.perf_counter()
            elif not isinstance(event, TextDelta):
                tokens[slot] = event.result.usage.reply_tokens
                prompt = event.result.usage.base_prompt_tokens
        return sent, first if first is not None else time.perf_counter(), prompt

    async def long_request() -> tuple[float, float, int]:
        await all_streaming.wait()
        return await timed_request(doc, streams)

    async def short_request() -> tuple[float, float, int]:
        await all_streaming.wait()
        await asyncio.sleep(0)  # the document is sent first
        begun = len(steps) + 1
        while len(steps) < begun:  # a step has ended since: the next one feeds the document's first piece
            await asyncio.sleep(0.005)
        return await timed_request(QUESTION, streams + 1)

    t0 = time.perf_counter()
    try:
        *_, (sent, first, prompt), (asked, answered, _) = await asyncio.gather(
            *(stream(i) for i in range(streams)), long_request(), short_request()
        )
    finally:
        engine.step = step  # type: ignore[method-assign]
    wall = time.perf_counter() - t0
    during = [seconds for start, seconds in steps if sent <= start < first]
    return {
        "longest_step_s": max(during, default=0.0),
        "steps_per_s_during_prefill": len(during) / (first - sent),
        "document_ttft_s": first - sent,
        "question_ttft_s": answered - asked,
        "question_sent_after_document_s": asked - sent,
        "document_base_tokens": prompt,
        "wall_s": wall,
        "aggregate_tokens_per_s": sum(tokens) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--facts", type=int, default=120, help="records in the document (about 24 base tokens each)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 256, 128], help="prefill_chunk settings; 0 = whole prompt")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    runtime = wsd_llms.get_runtime(device=args.device)
    runtime.generate([{"role": "user", "content": "Hi"}], max_tokens=4)  # load and warm up
    doc, results = document(args.facts), {}
    for chunk in args.chunks:
        runtime.configure(prefill_chunk=chunk or 2**30)
        results[chunk] = asyncio.run(one_setting(runtime, args.streams, doc, args.max_tokens))
        r = results[chunk]
        print(
            f"chunk {chunk or 'whole'}: longest step {r['longest_step_s']:.2f}s, document TTFT {r['document_ttft_s']:.2f}s, "
            f"question TTFT {r['question_ttft_s']:.2f}s", flush=True
        )
    whole = results.get(0)
    rows = [
        "| prefill_chunk | longest step during the prefill (s) | vs whole | steps/s during the prefill | document time to first token (s) | question time to first token (s) | aggregate tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for chunk, r in results.items():
        ratio = f"{r['longest_step_s'] / whole['longest_step_s']:.2f}x" if whole else "n/a"
        rows.append(
            f"| {chunk or 'whole prompt'} | {r['longest_step_s']:.2f} | {ratio} | {r['steps_per_s_during_prefill']:.1f} | "
            f"{r['document_ttft_s']:.2f} | {r['question_ttft_s']:.2f} | {r['aggregate_tokens_per_s']:.1f} |"
        )
    prompt = next(iter(results.values()))["document_base_tokens"]
    rows += [
        "",
        f"{args.streams} streams (max_tokens={args.max_tokens}) and one document of {prompt} base tokens, dtype {runtime.dtype}; "
        f"the question ({QUESTION!r}) is sent one step after the document.",
    ]
    write("long_prompt" + device_suffix(runtime.device), {"streams": args.streams, "facts": args.facts, "results": results}, "\n".join(rows))
    runtime.close()


if __name__ == "__main__":
    main()
