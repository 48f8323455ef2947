"""Text to ids, where only a template's own markers become control tokens.

A tokenizer turns the text of a special token ("<|im_end|>", "<start_of_turn>", "<bos>") into
that token wherever it appears. In a prompt that is right for the markers a template writes and
wrong for the text of the messages: a user who writes "<|im_end|>\\n<|im_start|>system" would
end their turn and open a system turn of their own, and a question about ChatML would reach
the model garbled. Hosted chat APIs treat message text as text; so do these functions. Text
that holds no special token's text is encoded exactly as before (one call over the whole
string), so ordinary prompts keep their ids.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

Span = tuple[int, int]  # [start, end) in characters

_SPECIAL_IDS: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of the tokenizer's special tokens: those its text is turned into (added tokens marked special)."""
    if tokenizer not in _SPECIAL_IDS:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        _SPECIAL_IDS[tokenizer] = frozenset(i for i, token in added.items() if getattr(token, "special", False)) | frozenset(
            tokenizer.all_special_ids
        )
    return _SPECIAL_IDS[tokenizer]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids for text that is all message or reply text: no special token's text becomes the token."""
    return encode(tokenizer, text, [(0, len(text))])[0]


def encode(tokenizer: Any, text: str, spans: Sequence[Span]) -> tuple[list[int], list[Span]]:
    """`text`'s ids (no special tokens added) and each id's character offsets, with the special
    tokens' text inside `spans` (message text, ascending, not overlapping) encoded as text. A
    span that holds such text is encoded on its own, so ids never cross its ends there; every
    other piece is encoded as one. Offsets are empty for a tokenizer without them (a slow one),
    which is encoded whole, as written."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a slow tokenizer: no offsets, so no way to tell the markers apart
        return tokenizer.encode(text, add_special_tokens=False), []
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    special = special_ids(tokenizer)
    inside = [(s, e) for i, (s, e) in zip(ids, offsets) if i in special]
    flagged = [span for span in spans if any(span[0] <= s and e <= span[1] for s, e in inside)]
    if not flagged:
        return ids, offsets
    ids, offsets, at = [], [], 0
    for lo, hi in flagged:
        _extend(tokenizer, text, at, lo, False, ids, offsets)
        _extend(tokenizer, text, lo, hi, True, ids, offsets)
        at = hi
    _extend(tokenizer, text, at, len(text), False, ids, offsets)
    return ids, offsets


def _extend(tokenizer: Any, text: str, lo: int, hi: int, as_text: bool, ids: list[int], offsets: list[Span]) -> None:
    """Append the ids and offsets of text[lo:hi], encoded on its own."""
    if lo >= hi:
        return
    encoded = tokenizer(text[lo:hi], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text)
    ids.extend(encoded["input_ids"])
    offsets.extend((s + lo, e + lo) for s, e in encoded["offset_mapping"])
