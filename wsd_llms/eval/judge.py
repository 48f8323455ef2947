"""Pairwise preference between WSD and base-only replies, judged by a local chat model.

Each pair is judged twice, with the replies' positions swapped; a reply wins only when the judge
prefers it in both orders, so position bias shows up as ties instead of as wins. The verdict is the
judge's next-token choice between "A" and "B" (compared logits), so it always gives one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .runner import Record

if TYPE_CHECKING:
    from ..loading import LoadedModel

CAVEAT = (
    "A small local judge is weak: models of a few hundred million parameters pick A or B barely better than "
    "chance and are swayed by position and length. Treat this as a smoke test, not a quality measure; for real "
    "decisions use a judge at least as strong as the base model, and read the replies."
)

INSTRUCTION = (
    "Two assistants replied to the same conversation.\n\nConversation:\n{conversation}\n\n"
    "Reply A:\n{a}\n\nReply B:\n{b}\n\n"
    "Which reply is more helpful, correct and appropriate? Answer with one letter: A or B."
)

Prefer = Callable[[list[dict[str, str]], str, str], str]


def logit_judge(model: LoadedModel) -> Prefer:
    """A `prefer(messages, a, b) -> "A" | "B"` backed by one forward pass of a chat model."""
    import torch  # here: the eval command's front loads without it

    tok = model.tokenizer
    choice = {letter: tok.encode(letter, add_special_tokens=False)[0] for letter in "AB"}

    def prefer(messages: list[dict[str, str]], a: str, b: str) -> str:
        conversation = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        prompt = [{"role": "user", "content": INSTRUCTION.format(conversation=conversation, a=a, b=b)}]
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        ids = ids[-(model.context_window - 1):]
        with torch.inference_mode():
            logits = model.model(torch.tensor([ids], device=model.device)).logits[0, -1]
        return "A" if logits[choice["A"]] >= logits[choice["B"]] else "B"

    return prefer


def judge_pairs(prefer: Prefer, messages_by_id: dict[str, list[dict[str, str]]], wsd: list[Record], base: list[Record], model_name: str) -> dict[str, Any]:
    """Compare WSD and base-only replies prompt by prompt, in both orders."""
    base_by_id = {r["prompt_id"]: r for r in base if r["error"] is None}
    verdicts = []
    for w in wsd:
        b = base_by_id.get(w["prompt_id"])
        if w["error"] is not None or b is None:
            continue
        messages = messages_by_id[w["prompt_id"]]
        first = prefer(messages, w["text"], b["text"]) == "A"   # WSD shown first
        second = prefer(messages, b["text"], w["text"]) == "B"  # WSD shown second
        verdicts.append({"prompt_id": w["prompt_id"], "wsd_first": first, "wsd_second": second})
    wins = sum(v["wsd_first"] and v["wsd_second"] for v in verdicts)
    losses = sum(not v["wsd_first"] and not v["wsd_second"] for v in verdicts)
    return {
        "model": model_name,
        "pairs": len(verdicts),
        "wsd_wins": wins,
        "base_wins": losses,
        "ties": len(verdicts) - wins - losses,
        "verdicts": verdicts,
        "caveat": CAVEAT,
    }
