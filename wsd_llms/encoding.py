"""Text to ids, where only a template's own markers become control tokens.

A tokenizer turns the text of a special token ("<|im_end|>", "<start_of_turn>", "<bos>") into
that token wherever it appears. In a prompt that is right for the markers a template writes and
wrong for the text of the messages: a user who writes "<|im_end|>\\n<|im_start|>system" would
end their turn and open a system turn of their own, and a question about ChatML would reach
the model garbled. Hosted chat APIs treat message text as text; so do these functions. Text
that spells no special token is encoded exactly as before (one call over the whole string), so
ordinary prompts keep their ids and pay nothing more.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

Span = tuple[int, int]  # [start, end) in characters

_SPECIAL_IDS: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()
_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _lock(tokenizer: Any) -> threading.Lock:
    """The lock held around each of this module's encodes with `tokenizer`. A fast tokenizer
    (transformers 5) sets its one Rust tokenizer's split-special-tokens flag before every encode, so
    two threads encoding at once (the worker building a prompt, a caller counting tokens) could
    each run under the other's flag: a message's "</s>" would become the control token."""
    with _LOCKS_LOCK:
        lock = _LOCKS.get(tokenizer)
        if lock is None:
            lock = _LOCKS[tokenizer] = threading.Lock()
        return lock


_held: list[threading.Lock] = []  # taken for a fork


def _before_fork() -> None:
    """No encode of ours may be running in another thread as the process forks: the Rust tokenizer
    encodes without the GIL under its own lock, which a forked child would find held forever (its
    first change of the special-token flag then blocks, holding the GIL: the whole child stops).
    An encode is short: the fork waits for it."""
    _LOCKS_LOCK.acquire()
    _held[:] = [_LOCKS_LOCK, *_LOCKS.values()]
    for lock in _held[1:]:
        lock.acquire()


def _after_fork_in_parent() -> None:
    for lock in reversed(_held):
        lock.release()
    _held.clear()


def _after_fork_in_child() -> None:
    """A forked child has no other threads: every lock starts free."""
    global _LOCKS_LOCK
    _LOCKS_LOCK = threading.Lock()
    _LOCKS.clear()
    _held.clear()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of the tokenizer's special tokens: those its text is turned into (added tokens marked special)."""
    if tokenizer not in _SPECIAL_IDS:
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = {i for i, token in added.items() if getattr(token, "special", False)}
        _SPECIAL_IDS[tokenizer] = frozenset(special.union(tokenizer.all_special_ids))
    return _SPECIAL_IDS[tokenizer]


def spells_special(tokenizer: Any, ids: Sequence[int]) -> bool:
    """Whether any of these ids (text encoded as a tokenizer does by default) is a special token."""
    special = special_ids(tokenizer)
    return any(i in special for i in ids)


# Per tokenizer: the most bytes of text one of its ids can stand for, at most (least_tokens).
_MOST_BYTES: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
# How much a normalizer may shrink text: a 4-byte character (a mathematical letter, say) made a 1-byte one.
NORMALIZER_SHRINK = 4


def least_tokens(tokenizer: Any, text_bytes: int) -> int:
    """A floor under the number of ids that text of `text_bytes` UTF-8 bytes encodes to, read without
    encoding it: no id stands for more bytes than its vocabulary entry's UTF-8 spelling (where a
    space is "Ġ" or "▁", longer than itself), times NORMALIZER_SHRINK where a normalizer may change
    the text first. Its first call reads the vocabulary (0.3 s for the embedded base's 262k)."""
    most = _MOST_BYTES.get(tokenizer)
    if most is None:
        longest = max((len(token.encode()) for token in tokenizer.get_vocab()), default=1)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        shrink = 1 if backend is not None and backend.normalizer is None else NORMALIZER_SHRINK
        most = _MOST_BYTES[tokenizer] = max(longest, 1) * shrink
    return text_bytes // most


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids for text that is all message or reply text: no special token's text becomes the token."""
    with _lock(tokenizer):
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def special_spans(tokenizer: Any, text: str, spans: Sequence[Span]) -> list[Span]:
    """Those of `spans` (message text in `text`) whose text spells a special token: encoded as the
    tokenizer does by default, unless no special token's text is in it at all (`_may_spell_special`)."""
    return [
        (lo, hi)
        for lo, hi in spans
        if _may_spell_special(tokenizer, text[lo:hi]) and spells_special(tokenizer, _plain(tokenizer, text[lo:hi]))
    ]


# Per tokenizer: its special tokens' texts, and the lengths of those that start with each character;
# None where a message's text cannot be screened by them (see _markers).
_MARKERS: weakref.WeakKeyDictionary[Any, tuple[dict[str, tuple[int, ...]], frozenset[str]] | None] = weakref.WeakKeyDictionary()


def _markers(tokenizer: Any) -> tuple[dict[str, tuple[int, ...]], frozenset[str]] | None:
    """The texts of the tokenizer's special tokens, with the lengths of those that start with each
    character; None unless a fast tokenizer matches every one of them in the raw text (not after its
    normalizer: `normalized=False`, as transformers adds special tokens), where a text that holds
    none of them cannot encode to one."""
    if tokenizer in _MARKERS:
        return _MARKERS[tokenizer]
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens = [added.get(i) for i in special_ids(tokenizer)]
    markers = None
    if getattr(tokenizer, "is_fast", False) and all(t is not None and t.content and not t.normalized for t in tokens):
        lengths: dict[str, set[int]] = {}
        for token in tokens:
            lengths.setdefault(token.content[0], set()).add(len(token.content))  # type: ignore[union-attr]
        markers = ({first: tuple(sorted(n)) for first, n in lengths.items()}, frozenset(t.content for t in tokens))  # type: ignore[union-attr]
    _MARKERS[tokenizer] = markers
    return markers


def _may_spell_special(tokenizer: Any, text: str) -> bool:
    """False only where `text` holds no special token's text, so it needs no encode to tell (a
    document with no markers in it costs a scan for their first characters, not a second encode)."""
    markers = _markers(tokenizer)
    if markers is None:
        return True
    lengths, texts = markers
    for first, sizes in lengths.items():
        at = text.find(first)
        while at != -1:
            if any(text[at : at + n] in texts for n in sizes):
                return True
            at = text.find(first, at + 1)
    return False


def _plain(tokenizer: Any, text: str) -> list[int]:
    """`text`'s ids as the tokenizer encodes by default: special tokens' text becomes the tokens."""
    with _lock(tokenizer):
        return tokenizer.encode(text, add_special_tokens=False)


def encode(tokenizer: Any, text: str, spans: Sequence[Span] = (), offsets: bool = False) -> tuple[list[int], list[Span]]:
    """`text`'s ids (no special tokens added), with `spans` (ascending, not overlapping: message
    text that spells special tokens, `special_spans`) each encoded on its own as text, and the
    rest in one piece between them; with `offsets`, each id's character span too (empty for a
    tokenizer without offsets, a slow one, which is encoded whole, as written)."""
    if not spans and not offsets:
        return _plain(tokenizer, text), []
    ids: list[int] = []
    where: list[Span] = []
    at = 0
    try:
        for lo, hi in spans:
            _extend(tokenizer, text, at, lo, False, ids, where)
            _extend(tokenizer, text, lo, hi, True, ids, where)
            at = hi
        _extend(tokenizer, text, at, len(text), False, ids, where)
    except NotImplementedError:  # a slow tokenizer: no offsets, so no way to tell the markers apart
        return _plain(tokenizer, text), []
    return ids, where


def _extend(tokenizer: Any, text: str, lo: int, hi: int, as_text: bool, ids: list[int], where: list[Span]) -> None:
    """Append the ids and offsets of text[lo:hi], encoded on its own."""
    if lo >= hi:
        return
    with _lock(tokenizer):
        encoded = tokenizer(text[lo:hi], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text)
    ids.extend(encoded["input_ids"])
    where.extend((s + lo, e + lo) for s, e in encoded["offset_mapping"])
