"""How often a RAG reply runs on into a turn the base model makes up, with and without the role
markers' variants as stops (prompts.variant_stops), side by side in one run: LlamaIndex's text QA
and context chat prompts over five short documents, 16 questions each, online WSD, greedy, on the
embedded pair. A quality figure: how many replies hold a made-up turn ("\\n[User 0", "\\n[User 1]:")
how many run to max_tokens, and how many tokens a reply takes (the time the made-up turns cost).

    python benchmarks/bench_rag_turns.py [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import re
from unittest import mock

from common import warm_runtime, write
from llama_index.core.chat_engine.condense_plus_context import DEFAULT_CONTEXT_PROMPT_TEMPLATE
from llama_index.core.prompts.chat_prompts import CHAT_TEXT_QA_PROMPT

from wsd_llms import prompts as wsd_prompts

DOCUMENTS = "\n\n".join(
    [
        "Paris is the capital of France. It is known for the Eiffel Tower.",
        "Berlin is the capital of Germany. It has the Brandenburg Gate.",
        "Madrid is the capital of Spain. It has the Prado museum.",
        "The Nile is the longest river in Africa. It flows north into the Mediterranean Sea.",
        "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in plants.",
    ]
)
QUESTIONS = [
    "What is the capital of France?", "And of Germany?", "What is Madrid known for?", "Which river is the longest in Africa?",
    "Where does the Nile flow?", "What does photosynthesis produce?", "Name a museum in Madrid.", "What landmark is in Berlin?",
    "Which city has the Eiffel Tower?", "What do plants need for photosynthesis?", "Is Berlin in France?", "Summarize the documents.",
    "What is the capital of Spain?", "Which sea does the Nile reach?", "List the three capitals mentioned.", "What is the Brandenburg Gate?",
]  # fmt: skip
MADE_UP_TURN = re.compile(r"(?m)^\s*\[(User|Assistant|System|Tool)\b")


def conversations(prompt: str) -> list[list[dict[str, str]]]:
    """Each question under LlamaIndex's text QA prompt (a query engine's) or its context chat prompt (a chat engine's)."""
    if prompt == "text QA":
        asked = (CHAT_TEXT_QA_PROMPT.format_messages(context_str=DOCUMENTS, query_str=q) for q in QUESTIONS)
        return [[{"role": m.role.value, "content": m.content or ""} for m in messages] for messages in asked]
    system = {"role": "system", "content": DEFAULT_CONTEXT_PROMPT_TEMPLATE.format(context_str=DOCUMENTS)}
    return [[system, {"role": "user", "content": q}] for q in QUESTIONS]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    runtime = warm_runtime()
    rows = []
    for variants in (False, True):
        for prompt in ("text QA", "context chat"):
            with mock.patch.object(wsd_prompts, "variant_stops", wsd_prompts.variant_stops if variants else lambda markers, prompt: ()):
                replies = [runtime.generate(messages, max_tokens=args.max_tokens) for messages in conversations(prompt)]
            rows.append(_row(variants, prompt, replies))
            print({k: v for k, v in rows[-1].items() if k != "examples"}, flush=True)
    table = "\n".join(
        [
            f"{len(QUESTIONS)} questions under each of two LlamaIndex prompts, online WSD, greedy, max_tokens={args.max_tokens}\n",
            "| variants stop | prompt | replies | with a made-up turn | at max_tokens | mean reply tokens |",
            "|---|---|---|---|---|---|",
            *(
                f"| {'yes' if r['variant_stops'] else 'no'} | {r['prompt']} | {r['replies']} | {r['made_up_turns']} | {r['at_max_tokens']} | "
                f"{r['mean_reply_tokens']:.0f} |"
                for r in rows
            ),
        ]
    )
    write("rag_turns", {"max_tokens": args.max_tokens, "rows": rows}, table)


def _row(variants: bool, prompt: str, replies: list) -> dict:
    """One setting's figures, with up to three replies that hold a made-up turn."""
    turns = [r.text for r in replies if MADE_UP_TURN.search(r.text)]
    return {
        "variant_stops": variants,
        "prompt": prompt,
        "replies": len(replies),
        "made_up_turns": len(turns),
        "at_max_tokens": sum(r.finish_reason == "length" for r in replies),
        "mean_reply_tokens": sum(r.usage.reply_tokens for r in replies) / len(replies),
        "examples": turns[:3],
    }


if __name__ == "__main__":
    main()
