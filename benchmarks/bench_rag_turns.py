"""How often a RAG reply runs on into a turn the base model makes up, with and without the role
markers' variants as stops (prompts.variant_stops), side by side in one run: LlamaIndex's text QA
and context chat prompts over five short documents, 16 questions each, and its condense prompt (a
chat engine's rewrite of a follow-up as a standalone question, sent as one user message, as
`LLM.predict` sends it) over 16 two-turn conversations, online WSD, greedy, on the embedded pair. A
quality figure: how many replies hold a made-up turn ("\\n[User 0", "\\n[User: 10:00", and forms no
stop covers: "\\n[Human]", "\\nUser: "), how many run to max_tokens, and how many tokens a reply
takes (the time the made-up turns cost).

    python benchmarks/bench_rag_turns.py [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import re
from unittest import mock

from common import warm_runtime, write
from llama_index.core.base.llms.generic_utils import messages_to_history_str
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.chat_engine.condense_plus_context import DEFAULT_CONTEXT_PROMPT_TEMPLATE
from llama_index.core.chat_engine.condense_question import DEFAULT_PROMPT as CONDENSE_PROMPT
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
# (question, answer, follow-up): a conversation over the documents whose follow-up the condense prompt rewrites.
FOLLOW_UPS = [
    ("What is the capital of France?", "Paris.", "What is it known for?"), ("Tell me about the Nile.", "It is the longest river in Africa.", "Where does it flow?"),
    ("What is the capital of Germany?", "Berlin.", "What landmark does it have?"), ("What is photosynthesis?", "How plants make sugar.", "What do they need for it?"),
    ("Which city has the Prado?", "Madrid.", "Which country is it in?"), ("Where is the Eiffel Tower?", "In Paris.", "And the Brandenburg Gate?"),
    ("What does photosynthesis make?", "Sugar and oxygen.", "Where does it happen?"), ("Name a capital.", "Madrid.", "What museum is there?"),
    ("Which river is longest in Africa?", "The Nile.", "Which sea does it reach?"), ("Is Berlin in France?", "No, in Germany.", "What is France's capital?"),
    ("What is in Madrid?", "The Prado museum.", "What else is in the documents?"), ("List a river.", "The Nile.", "How long is it?"),
    ("What is the Eiffel Tower?", "A landmark in Paris.", "Which country is that?"), ("What do plants need?", "Light, water and CO2.", "What do they give off?"),
    ("Summarize the documents.", "Capitals, a river and plants.", "Tell me more about the capitals."), ("What is Spain's capital?", "Madrid.", "And Germany's?"),
]  # fmt: skip
MADE_UP_TURN = re.compile(r"(?m)^\s*(\[(User|Assistant|System|Tool|Human)\b|(User|Assistant|Human|AI): )")
PROMPTS = ("text QA", "context chat", "condense")


def conversations(prompt: str) -> list[list[dict[str, str]]]:
    """Each question under LlamaIndex's text QA prompt (a query engine's) or its context chat prompt (a chat
    engine's); or each follow-up under its condense prompt, one user message as `LLM.predict` sends it."""
    if prompt == "condense":
        return [
            [{"role": "user", "content": CONDENSE_PROMPT.format(chat_history=_history(q, a), question=follow_up)}]
            for q, a, follow_up in FOLLOW_UPS
        ]
    if prompt == "text QA":
        asked = (CHAT_TEXT_QA_PROMPT.format_messages(context_str=DOCUMENTS, query_str=q) for q in QUESTIONS)
        return [[{"role": m.role.value, "content": m.content or ""} for m in messages] for messages in asked]
    system = {"role": "system", "content": DEFAULT_CONTEXT_PROMPT_TEMPLATE.format(context_str=DOCUMENTS)}
    return [[system, {"role": "user", "content": q}] for q in QUESTIONS]


def _history(question: str, answer: str) -> str:
    """A two-turn conversation as the condense chat engine writes it into its prompt."""
    return messages_to_history_str([ChatMessage(role="user", content=question), ChatMessage(role="assistant", content=answer)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    runtime = warm_runtime()
    rows = []
    for variants in (False, True):
        for prompt in PROMPTS:
            with mock.patch.object(wsd_prompts, "variant_stops", wsd_prompts.variant_stops if variants else lambda markers, prompt: ()):
                replies = [runtime.generate(messages, max_tokens=args.max_tokens) for messages in conversations(prompt)]
            rows.append(_row(variants, prompt, replies))
            print({k: v for k, v in rows[-1].items() if k != "examples"}, flush=True)
    table = "\n".join(
        [
            f"{len(QUESTIONS)} questions under each of LlamaIndex's text QA and context chat prompts, {len(FOLLOW_UPS)} follow-ups under its"
            f" condense prompt; online WSD, greedy, max_tokens={args.max_tokens}\n",
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
