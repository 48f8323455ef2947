"""The hand-off in text between the two tokenizers (DESIGN 3.2 and 3.4, and the hold-back of DESIGN 4).

The draft text is decoded with special tokens skipped and stripped; the base model sees it as
`(base_prompt + draft_text).rstrip()` tokenized with no special tokens added, whose first
`len(encode(base_prompt))` ids are the prompt and the rest the draft in base tokens. Message
text that spells special tokens (`spans`, Prompts.base_spans) and a draft that does are
encoded as text (encoding.encode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .encoding import Span, encode, spells_special
from .reply import decode

# Base tokens at the tail of an unfinished draft that are held back: later text may still
# re-tokenize them. A change further back is caught and rolled back by the online engine.
HOLDBACK_TOKENS = 2


@dataclass(frozen=True)
class Handoff:
    """The base tokenization of (prompt + draft so far): prompt ids, then stable draft ids."""

    prompt_ids: list[int]
    draft_ids: list[int]


def draft_text(tokenizer: Any, forced_prefix: str, generated: list[int]) -> str:
    """The draft so far, left-stripped (the right strip happens once the draft has ended)."""
    return (forced_prefix + decode(tokenizer, generated)).lstrip()


def final_handoff(tokenizer: Any, base_prompt: str, prompt_len: int, text: str, spans: Sequence[Span] = ()) -> Handoff:
    """The paper's check-stage tokenization of a finished draft. A character the draft left
    incomplete (max_draft_tokens cut it) is dropped rather than handed on as U+FFFD, which the
    base model would go on to imitate."""
    ids = _encode(tokenizer, base_prompt, prompt_len, (base_prompt + _whole(text.strip())).rstrip(), spans)
    return Handoff(ids[:prompt_len], ids[prompt_len:])


def min_switch(tokenizer: Any, base_prompt: str, prompt_len: int, forced_prefix: str, spans: Sequence[Span] = ()) -> int:
    """The first draft index the switch may fall on: the forced start's last base token (it is
    forced, so it is kept whole). 0 without one."""
    if not forced_prefix:
        return 0
    return max(0, len(final_handoff(tokenizer, base_prompt, prompt_len, forced_prefix, spans).draft_ids) - 1)


def partial_handoff(
    tokenizer: Any, base_prompt: str, prompt_len: int, text: str, holdback: int = HOLDBACK_TOKENS, spans: Sequence[Span] = ()
) -> Handoff | None:
    """The stable part of an unfinished draft's tokenization, or None while nothing is stable."""
    text = _whole(text.rstrip())
    if not text:
        return None
    ids = _encode(tokenizer, base_prompt, prompt_len, base_prompt + text, spans)
    return Handoff(ids[:prompt_len], ids[prompt_len : max(prompt_len, len(ids) - holdback)])


def _encode(tokenizer: Any, base_prompt: str, prompt_len: int, full: str, spans: Sequence[Span]) -> list[int]:
    """The ids of the prompt followed by the draft, the messages' and the draft's text as text."""
    ids = encode(tokenizer, full, spans)[0]
    if spells_special(tokenizer, ids[prompt_len:]):  # the draft wrote a special token's text
        ids = encode(tokenizer, full, [*spans, (len(base_prompt), len(full))])[0]
    return ids


def _whole(text: str) -> str:
    """The text without a trailing incomplete character (decoded as U+FFFD) and the space before it."""
    return text.rstrip("\ufffd").rstrip()
