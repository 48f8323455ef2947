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

# The tail of an unfinished draft that is held back, as later text may still re-tokenize it: its
# last word with the whitespace before it (a BPE merge a new character makes or undoes reaches
# back within the word: "x yo" is [x, ▁, y, o] and "x you" [x, ▁you]), and in a run with no
# whitespace (CJK text, a long URL) its last WORD_CHARS characters. Where a tokenizer gives no
# offsets (a slow one), its last HOLDBACK_TOKENS tokens. A change further back is caught and
# rolled back by the online engine.
WORD_CHARS = 32
HOLDBACK_TOKENS = 2
_LAST_WORD = re.compile(r"\s+\S*\Z")

# Characters before the point where two drafts' texts part that `DraftTokens.estimate` re-encodes
# with them: BPE's merges that a new character can undo reach back a few characters, not 64
# (and past the held-back tail: WORD_CHARS).
CONTEXT_CHARS = 64


@dataclass(frozen=True)
class Handoff:
    """The base tokenization of (prompt + draft so far): prompt ids, then stable draft ids, with
    where each draft id ends in the draft's text (None from a tokenizer with no offsets)."""

    prompt_ids: list[int]
    draft_ids: list[int]
    draft_ends: list[int] | None = None

    def first(self, n: int) -> Handoff:
        """This hand-off with only its first `n` draft ids."""
        return Handoff(self.prompt_ids, self.draft_ids[:n], None if self.draft_ends is None else self.draft_ends[:n])


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
    ids, where, _ = _encode(tokenizer, base_prompt, prompt_len, (base_prompt + _whole(text.strip())).rstrip(), spans)
    return _handoff(ids, where, prompt_len, len(ids), len(base_prompt))


def forced_ids(tokenizer: Any, base_prompt: str, prompt_len: int, forced_prefix: str, spans: Sequence[Span] = ()) -> list[int]:
    """The base ids of the reply's forced start, as a draft of it alone hands it on ([] without
    one). It is kept whole: the switch falls on its last token at the earliest."""
    return final_handoff(tokenizer, base_prompt, prompt_len, forced_prefix, spans).draft_ids if forced_prefix else []


def switch_floor(handoff: Handoff, forced: list[int], chars: int) -> int:
    """The first index the switch may fall on, for a forced start of `chars` characters (`forced`
    its ids alone; 0 without one): its last token's in this tokenization, where the draft's text
    after it may re-split it ("x some" alone is [x, ▁some], and [x, ▁, s, o, m, en] before "n"),
    or, while no stable id reaches its end, past every stable id. The byte tokens of one character
    ("<0xF0>" ...) share its end: the last of them is its last token. A tokenizer with no offsets
    counts its ids alone."""
    if not chars:
        return 0
    ends = handoff.draft_ends
    if ends is None:
        return max(0, len(forced) - 1)
    at = next((i for i, end in enumerate(ends) if end >= chars), len(ends))
    while at + 1 < len(ends) and ends[at + 1] == ends[at]:
        at += 1
    return at


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

    def exact(self, text: str, hold: bool = True) -> Handoff | None:
        """The stable part of the draft's tokenization so far with the prompt, its tail held back
        unless not `hold` (None before the draft has any text), noted for later estimates."""
        whole = _whole(text.rstrip())
        if not whole:
            return None
        full = self.base_prompt + whole
        ids, where, self._apart = _encode(self.tokenizer, self.base_prompt, self.prompt_len, full, self.spans)
        self._text, self._count, self._window = whole, len(ids) - self.prompt_len, (-1, 0)
        return _handoff(ids, where, self.prompt_len, _stable(where, full, len(ids)) if hold else len(ids), len(self.base_prompt))

    def estimate(self, text: str, hold: bool = True) -> int | None:
        """The stable draft tokens `exact(text)` would give, estimated; None before any exact one, and
        where a draft spells a special token's text (which `exact` encodes apart from the prompt)."""
        if self._text is None or self._apart:
            return None
        whole = _whole(text.rstrip())
        full = self.base_prompt + whole
        parted = len(self.base_prompt) + common_prefix(self._text, whole)
        start = max(0, parted - CONTEXT_CHARS)
        with_offsets = encode(self.tokenizer, full[start:], offsets=True)
        own = with_offsets[0] if start >= len(self.base_prompt) else encode(self.tokenizer, whole)[0]  # the draft's text alone
        if spells_special(self.tokenizer, own):
            return None
        if self._window[0] != start:
            self._window = (start, len(encode_text(self.tokenizer, (self.base_prompt + self._text)[start:])))
        new = len(with_offsets[0])
        held = new - _stable(with_offsets[1], full[start:], new) if hold else 0
        return max(0, self._count + new - self._window[1] - held)


def _stable(where: list[Span], full: str, count: int) -> int:
    """How many leading ids of `full`'s tokenization (their offsets `where`) later text cannot
    change: those that end where the held-back tail starts or before it (see WORD_CHARS); where there are no
    offsets, all but the last HOLDBACK_TOKENS."""
    if not where:
        return max(0, count - HOLDBACK_TOKENS)
    tail = full[-WORD_CHARS:]
    found = _LAST_WORD.search(tail)
    cut = len(full) - len(tail) + (found.start() if found else 0)
    return next((i for i, (_, end) in enumerate(where) if end > cut), len(where))


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (characters, ids) `a` and `b` share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def _encode(tokenizer: Any, base_prompt: str, prompt_len: int, full: str, spans: Sequence[Span]) -> tuple[list[int], list[Span], bool]:
    """The ids of the prompt followed by the draft, the messages' and the draft's text as text, with
    their offsets (none from a slow tokenizer); and whether the draft spelled a special token's
    text, which encodes it apart from the prompt."""
    ids, where = encode(tokenizer, full, spans, offsets=True)
    if spells_special(tokenizer, ids[prompt_len:]):  # the draft wrote a special token's text
        return (*encode(tokenizer, full, [*spans, (len(base_prompt), len(full))], offsets=True), True)
    return ids, where, False


def _handoff(ids: list[int], where: list[Span], prompt_len: int, stable: int, prompt_chars: int) -> Handoff:
    """The hand-off of the first `stable` of these ids, the draft's ends counted from its start."""
    ends = [end - prompt_chars for _, end in where[prompt_len:stable]] if where else None
    return Handoff(ids[:prompt_len], ids[prompt_len:stable], ends)


def _whole(text: str) -> str:
    """The text without a trailing incomplete character (decoded as U+FFFD) and the space before it."""
    return text.rstrip("\ufffd").rstrip()
