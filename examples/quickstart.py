"""Quickstart: stream one WSD reply from the runtime, marking what each model wrote.

    python examples/quickstart.py "Why is the sky blue?"
"""

import sys

import wsd_llms

question = sys.argv[1] if len(sys.argv) > 1 else "Give me three tips for a job interview."
runtime = wsd_llms.get_runtime()  # embedded default pair; loads on the first request

previous = "draft"
for event in runtime.stream([{"role": "user", "content": question}], max_tokens=120):
    if event.type == "text":
        if event.source != previous:
            print(" ▸ ", end="")  # the base model takes over here
        print(event.text, end="", flush=True)
        previous = event.source
    else:
        r = event.result
        print(f"\n\nswitch point: {r.switch_point}  draft tokens kept: {r.usage.kept_draft_tokens}  "
              f"base tokens: {r.usage.base_tokens}  first token: {'-' if r.timings.ttft is None else f'{r.timings.ttft:.2f}s'}  total: {r.timings.total:.2f}s")
