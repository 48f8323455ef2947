"""The hand-off in text between the two tokenizers (DESIGN 3.2 and 3.4, and the hold-back of DESIGN 4).

The draft text is decoded with special tokens skipped and stripped; the base model sees it as
`(base_prompt + draft_text).rstrip()` tokenized with no special tokens added, whose first
`len(encode(base_prompt))` ids are the prompt and the rest the draft in base tokens. Message
text that spells special tokens (`spans`, Prompts.base_spans) and a draft that does are
encoded as text (encoding.encode).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .encoding import Span, encode, encode_text, spells_special
from .reply import decode

# Base tokens at the tail of an unfinished draft that are held back: later text may still
# re-tokenize them. A change further back is caught and rolled back by the online engine.
HOLDBACK_TOKENS = 2

# Characters before the point where two drafts' texts part that `DraftTokens.estimate` re-encodes
# with them: BPE's merges that a new character can undo reach back a few characters, not 64.
CONTEXT_CHARS = 64


@dataclass(frozen=True)
class Handoff:
    """The base tokenization of (prompt + draft so far): prompt ids, then stable draft ids."""

    prompt_ids: list[int]
    draft_ids: list[int]

    def held_back(self, tokens: int) -> Handoff:
        """This hand-off less its last `tokens` draft tokens (which later text may re-tokenize)."""
        return Handoff(self.prompt_ids, self.draft_ids[: max(0, len(self.draft_ids) - tokens)])


def draft_text(tokenizer: Any, forced_prefix: str, generated: list[int], final: bool = True) -> str:
    """The draft so far, left-stripped (the right strip happens once the draft has ended).

    An unfinished draft's text stops before a run of byte tokens at its end: a byte-fallback decoder
    (Llama's, Gemma's: "<0xC3>") decodes a run of them together, and turns the whole run into U+FFFD
    while it ends in an incomplete or invalid character, which would take back characters the run
    had shown (and that may have streamed). A run's text is final once another token ends it; a
    finished draft's run keeps its whole characters (max_draft_tokens may cut the last one)."""
    byte_ids, end = _byte_ids(tokenizer), len(generated)
    if not final:
        while end and generated[end - 1] in byte_ids:
            end -= 1
        return (forced_prefix + decode(tokenizer, generated[:end])).lstrip()
    text = decode(tokenizer, generated)
    while text.endswith("\ufffd") and end and generated[end - 1] in byte_ids:  # an incomplete character: without its bytes
        end -= 1
        text = decode(tokenizer, generated[:end])
    return (forced_prefix + text).lstrip()


_BYTES: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of a byte-fallback vocabulary's byte tokens ("<0x41>"): none in other vocabularies."""
    found = _BYTES.get(tokenizer)
    if found is None:
        found = _BYTES[tokenizer] = frozenset(i for token, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(token))
    return found


def final_handoff(tokenizer: Any, base_prompt: str, prompt_len: int, text: str, spans: Sequence[Span] = ()) -> Handoff:
    """The paper's check-stage tokenization of a finished draft. A character the draft left
    incomplete (max_draft_tokens cut it) is dropped rather than handed on as U+FFFD, which the
    base model would go on to imitate."""
    ids, _ = _encode(tokenizer, base_prompt, prompt_len, (base_prompt + _whole(text.strip())).rstrip(), spans)
    return Handoff(ids[:prompt_len], ids[prompt_len:])


def forced_ids(tokenizer: Any, base_prompt: str, prompt_len: int, forced_prefix: str, spans: Sequence[Span] = ()) -> list[int]:
    """The base ids of the reply's forced start, as a draft of it alone hands it on ([] without
    one). It is kept whole: the switch falls on its last token at the earliest."""
    return final_handoff(tokenizer, base_prompt, prompt_len, forced_prefix, spans).draft_ids if forced_prefix else []


def partial_handoff(
    tokenizer: Any, base_prompt: str, prompt_len: int, text: str, holdback: int = HOLDBACK_TOKENS, spans: Sequence[Span] = ()
) -> Handoff | None:
    """The stable part of an unfinished draft's tokenization, or None while nothing is stable."""
    return DraftTokens(tokenizer, base_prompt, prompt_len, spans).exact(text, holdback)


class DraftTokens:
    """How many base tokens an unfinished draft's hand-off would hold, estimated between exact ones.

    A partial hand-off tokenizes the whole prompt with the draft, in time that grows with the
    prompt (the embedded base's tokenizer: 0.16 ms for a 54-token prompt, 2.1 ms for 3300 tokens,
    8.3 ms for 11600), and the online engine needs one only when a scoring pass may fall due. In
    between, the count is the last exact one plus the change in tokens of the text from
    CONTEXT_CHARS characters before where the drafts part: a few short encodes. Since the engine
    takes an exact hand-off before it acts on an estimate (and an estimate that comes short only
    delays a pass, which changes no output), the estimate decides no reply.
    """

    def __init__(self, tokenizer: Any, base_prompt: str, prompt_len: int, spans: Sequence[Span] = ()) -> None:
        self.tokenizer, self.base_prompt, self.prompt_len, self.spans = tokenizer, base_prompt, prompt_len, spans
        self._text: str | None = None  # the text of the last exact hand-off, as tokenized
        self._apart = False  # whether its draft spelled a special token's text
        self._count = 0  # its draft tokens, none held back
        self._window: tuple[int, int] = (-1, 0)  # (start, tokens) of the last exact text's window

    def exact(self, text: str, holdback: int = HOLDBACK_TOKENS) -> Handoff | None:
        """The stable part of the draft's tokenization so far with the prompt, the last `holdback`
        tokens held back (None while nothing is stable), noted for later estimates."""
        whole = _whole(text.rstrip())
        if not whole:
            return None
        ids, self._apart = _encode(self.tokenizer, self.base_prompt, self.prompt_len, self.base_prompt + whole, self.spans)
        self._text, self._count, self._window = whole, len(ids) - self.prompt_len, (-1, 0)
        return Handoff(ids[: self.prompt_len], ids[self.prompt_len :]).held_back(holdback)

    def estimate(self, text: str, holdback: int = HOLDBACK_TOKENS) -> int | None:
        """The stable draft tokens `exact(text)` would give, estimated; None before any exact one, and
        where a draft spells a special token's text (which `exact` encodes apart from the prompt)."""
        if self._text is None or self._apart:
            return None
        whole = _whole(text.rstrip())
        parted = len(self.base_prompt) + common_prefix(self._text, whole)
        start = max(0, parted - CONTEXT_CHARS)
        if spells_special(self.tokenizer, encode(self.tokenizer, whole[max(0, start - len(self.base_prompt)) :])[0]):
            return None
        if self._window[0] != start:
            self._window = (start, len(encode_text(self.tokenizer, (self.base_prompt + self._text)[start:])))
        new = len(encode_text(self.tokenizer, (self.base_prompt + whole)[start:]))
        return max(0, self._count + new - self._window[1] - holdback)


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (characters, ids) `a` and `b` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def _encode(tokenizer: Any, base_prompt: str, prompt_len: int, full: str, spans: Sequence[Span]) -> tuple[list[int], bool]:
    """The ids of the prompt followed by the draft, the messages' and the draft's text as text; and
    whether the draft spelled a special token's text, which encodes it apart from the prompt."""
    ids = encode(tokenizer, full, spans)[0]
    if spells_special(tokenizer, ids[prompt_len:]):  # the draft wrote a special token's text
        return encode(tokenizer, full, [*spans, (len(base_prompt), len(full))])[0], True
    return ids, False


def _whole(text: str) -> str:
    """The text without a trailing incomplete character (decoded as U+FFFD) and the space before it."""
    return text.rstrip("\ufffd").rstrip()
