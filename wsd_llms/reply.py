"""Turns a reply's base-token ids into final text: stop strings, hold-back, and who wrote what.

Both modes feed the same ids through this class, so their replies are cut and decoded identically.
Text is released only once it is final: a tail that could still grow into a stop string, or an
incomplete UTF-8 character, is held back until it is ruled out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Delta:
    """A piece of final reply text and the model that wrote it ("draft" or "base")."""

    text: str
    source: str


def expand_role_stops(markers: tuple[str, ...]) -> tuple[str, ...]:
    """Each role marker with two, one or no newlines before it, so the cut drops those newlines; one
    that starts with a newline (prompts.variant_stops) counts at a line's start only."""
    return tuple(s for m in markers for s in ((f"\n{m}", m) if m.startswith("\n") else (f"\n\n{m}", f"\n{m}", m)))


def decode(tokenizer: Any, ids: list[int]) -> str:
    """Decode without special tokens and without space clean-up, so decoding is prefix-stable."""
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might still be the start of one of `stops` (cut short before its end).

    Runs at every token of every reply on the worker, so it visits only the tail's places where a
    stop's first character is, leftmost (longest) first, and compares a short probe before the whole
    tail: trying each length in turn cost a request with many long stops a quarter second per token,
    which every other stream waited for."""
    hold = 0
    for stop in stops:
        first, probe = stop[0], stop[:8]
        i = text.find(first, max(len(text) - len(stop) + 1, 0))
        while i != -1 and len(text) - i > hold:
            if text.startswith(probe[: len(text) - i], i) and stop.startswith(text[i:]):
                hold = len(text) - i
                break
            i = text.find(first, i + 1)
    return hold


# A reply's end that repeats a unit of up to LOOP_UNIT_MAX characters over its last LOOP_CHARS (or three
# units, if longer) is a loop: "0000...", "Paris, Paris, ...", a sentence said again and again.
LOOP_UNIT_MAX, LOOP_CHARS = 80, 40


def repeated_end(text: str) -> str | None:
    """The unit a reply's end repeats over and over (the shortest, as it first appears), or None: a
    reply cut at its budget there would only have repeated it longer."""
    for unit in range(1, LOOP_UNIT_MAX + 1):
        span = max(LOOP_CHARS, 3 * unit)
        if len(text) >= span and all(text[-i] == text[-i - unit] for i in range(1, span - unit + 1)):
            start, block = len(text) - span, 64 * unit  # back to where the loop begins: by blocks, then by characters
            while start >= block and text[start - block : start] == text[start - block + unit : start + unit]:
                start -= block
            while start > 0 and text[start - 1] == text[start - 1 + unit]:
                start -= 1
            words = (i for i in range(start, start + unit) if i > 0 and not text[i - 1].isalnum() and text[i].isalnum())
            first = next(words, start)  # as it reads: from a word's start ("Paris, ", not " Paris,")
            return text[first : first + unit]
    return None


# A JSON string from its opening quote to its closing one (a model may write a raw newline in it).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\[\s\S])*+"')


def string_end(text: str, start: int, end: int | None = None) -> int:
    """Where the JSON string opening at text[start] (a quote) ends, just past its closing quote,
    or -1 where it is still open at `end`."""
    found = _JSON_STRING.match(text, start, len(text) if end is None else end)
    return -1 if found is None else found.end()


def close_outside_strings(text: str, close: str, start: int, end: int | None = None) -> int:
    """Where `close` first appears in text[start:end] outside a JSON string (a call's arguments may
    hold the mark in a string), or -1."""
    end = len(text) if end is None else end
    i = start
    while i < end:
        if text[i] == '"':
            i = string_end(text, i, end)
            if i == -1:
                return -1
        elif text.startswith(close, i):
            return i
        else:
            i += 1
    return -1


def _first_stop(
    text: str, stops: tuple[str, ...], start: int, quoted: tuple[str, str] | None = None, caller: tuple[str, ...] = (), forced: int = 0
) -> tuple[int, str] | None:
    """Where the first stop string starts at or after `start`, and which it is, or None. No stop
    counts inside a `quoted` span: from an opening mark to its closing mark outside a JSON string,
    or to the end while it is open (so a stop's fate depends only on the text before it); nor does
    a role marker (a stop not among `caller`'s) that ends within the reply's first `forced`
    characters, the caller's own forced start. Where several start at one place, one of
    `caller`'s is the one named before a role marker, and a longer before a shorter ("\n" before
    "\n[User]" if "\n" is the caller's)."""

    hits = []
    for stop in stops:
        i = text.find(stop, start)
        while i >= 0 and (_inside(text, i, quoted) or i + len(stop) <= forced and stop not in caller):
            i = text.find(stop, i + 1)
        if i >= 0:
            hits.append((i, stop not in caller, -len(stop), stop))
    if not hits:
        return None
    first = min(hits)
    return first[0], first[3]


def _inside(text: str, i: int, quoted: tuple[str, str] | None) -> bool:
    """Whether position i of text is inside a `quoted` span, its closing mark included (the spans
    from the start, in turn: an opening mark in a JSON string opens none). A position in a closing
    mark is inside both before the mark is whole and after, so its answer never changes as text comes."""
    if quoted is None:
        return False
    pos = 0
    while (opened := text.find(quoted[0], pos, i)) != -1:
        closed = close_outside_strings(text, quoted[1], opened + len(quoted[0]), i)
        if closed == -1 or closed + len(quoted[1]) > i:
            return True
        pos = closed + len(quoted[1])
    return False


class IncrementalText:
    """The text of a growing list of ids, extended by whole characters only (vLLM's incremental
    detokenization): each new piece is decoded after the piece before it, for context, and taken
    once it no longer ends in an incomplete character. Text once taken never changes, which
    decoding all ids again does not promise: Gemma's byte fallback turns a whole run of byte
    tokens into U+FFFD while its last character is incomplete. Ids whose character never
    completes add no text."""

    def __init__(self, tokenizer: Any, ids: list[int] | None = None) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read] decode to the end of `text`: the context of the next piece
        self._read = 0  # ids before this are in `text`
        for token in ids or ():
            self.push(token)

    def push(self, token: int) -> str:
        """Append one id; returns the text it completed ("" while a character is incomplete)."""
        self.ids.append(token)
        before = decode(self._tok, self.ids[self._prefix : self._read])
        after = decode(self._tok, self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        piece = after[len(before) :]
        self.text += piece
        return piece


class ReplyText:
    """Accumulates reply ids (draft part first, then base) and yields final text as it appears."""

    def __init__(
        self,
        tokenizer: Any,
        stops: tuple[str, ...],
        quoted: tuple[str, str] | None = None,
        role_stops: tuple[str, ...] = (),
        forced: int = 0,
    ) -> None:
        """`stops`: the caller's stop strings. `role_stops`: the prompt template's role markers,
        which end the reply too but are no text of it (not within the reply's first `forced`
        characters, a forced start's, which the caller wrote: the draft's mode has none but the call
        tag of a request that offers no tools, engine._uncallable); a reply that ends (max_tokens, or
        a caller's stop) in the start of one drops that start (_role_start). Neither counts between `quoted`'s opening and closing marks (a tool call's tags: its
        arguments may hold a role marker, and its markup, which the caller never sees, holds a
        newline after the tag), so a stop such as "\n" does not cut every call short."""
        self._tok = tokenizer
        self.stops = tuple(dict.fromkeys(stops + role_stops))
        self.quoted, self._role_stops, self._caller, self._forced = quoted, tuple(role_stops), tuple(stops), forced
        self._decoded = IncrementalText(tokenizer)
        self.text = ""
        self.stopped = False
        self.stop_found: str | None = None  # the stop string the reply ended at
        self._streamed = ""  # the text released so far; the text may fall behind it for a while (set_draft)
        self._draft_chars = 0
        self._draft_streamed = 0  # where the last text streamed as the draft's ends
        self._max_stop = max((len(s) for s in self.stops), default=0)

    @property
    def ids(self) -> list[int]:
        """The reply's ids so far (in the tokenizer it decodes with)."""
        return self._decoded.ids

    @property
    def _emitted(self) -> int:
        """How many characters were released."""
        return len(self._streamed)

    @property
    def draft_chars(self) -> int:
        """Length of the reply's leading text that the draft model wrote (text streamed as the
        draft's stays the draft's, though a behind reply's base ids write it again)."""
        return min(max(self._draft_chars, self._draft_streamed), len(self.text))

    def add(self, ids: list[int], source: str) -> list[Delta]:
        """Append ids written by `source`; returns newly final text.

        On a stop string the reply ends: `stopped` is set, the text is cut before the stop (and
        before a role marker's start it ends in, _role_start), and ids after the one that completed
        the stop are not taken, however the ids were grouped.
        """
        if self.stopped:
            raise RuntimeError("reply already ended at a stop string")
        behind = len(self.text) < self._emitted
        start = max(0, self._emitted - self._max_stop)
        for token in ids:
            if not self._decoded.push(token):
                continue
            self.text = self._decoded.text
            if behind:
                if not self._agrees(self.text):
                    raise RuntimeError(f"the reply's text {self.text!r} contradicts text already streamed {self._streamed!r}")
                behind = len(self.text) < self._emitted
            if source == "draft":
                self._draft_chars = len(self.text)
            found = _first_stop(self.text, self.stops, start, self.quoted, self._caller, self._forced) if self.stops else None
            if found is not None:
                cut, self.stop_found = found
                if cut < self._emitted:
                    raise RuntimeError(f"the reply ends at a stop string inside text already streamed {self._streamed!r}")
                end = cut + len(self.stop_found)
                if self.stop_found in self._caller:  # "\n\n[" for a stop "[": the start of a role marker goes too
                    cut = min(cut, self._role_start(self.text[:end]))
                else:  # a role marker: a stop of the caller's in it is the one named; the forced start's part of it is the caller's text
                    inside = [(i, -len(s), s) for s in self._caller if (i := self.text.find(s, cut, end)) != -1]
                    self.stop_found = min(inside)[2] if inside else self.stop_found  # the first, the longer at one place, as _first_stop names
                    cut = max(cut, min(self._forced, end))
                self.text, self.stopped = self.text[:cut], True
                return self._release(cut)
        return self._release(len(self.text) - held_back(self.text, self.stops))

    def set_draft(self, ids: list[int]) -> list[Delta]:
        """Make the reply exactly these draft ids (a re-tokenization may have changed earlier ids).

        The new text may end inside text already streamed: the first words stream from a
        tokenization with nothing held back, and a later draft token can re-split a word that
        streamed whole into more tokens, so a tokenization cut after the same number of ids ends
        inside it. The reply is then behind until more ids come, and releases nothing new. Text
        that contradicts what was streamed raises.
        """
        common = 0
        while common < min(len(ids), len(self.ids)) and ids[common] == self.ids[common]:
            common += 1
        if common < len(self.ids):
            if not self._agrees(IncrementalText(self._tok, ids).text):
                raise RuntimeError("a re-tokenization of the draft changed text that was already streamed")
            self._decoded = IncrementalText(self._tok, ids[:common])
            self.text = self._decoded.text
            self._draft_chars = len(self.text)
        return self.add(ids[common:], "draft") if len(ids) > common else []

    def finish(self, cut: bool = False) -> list[Delta]:
        """No more ids will come: release whatever was held back (an incomplete last character is
        dropped). A reply `cut` at its budget that ends in the start of a role marker drops it
        (_role_start), as one a caller's stop ends does."""
        if len(self.text) < self._emitted:
            raise RuntimeError(f"the reply ended as {self.text!r}, inside text already streamed {self._streamed!r}")
        if cut and not self.stopped:
            self.text = self.text[: self._role_start(self.text)]
        return self._release(len(self.text))

    def _role_start(self, text: str) -> int:
        """Where `text` ends in the start of a role marker on a new line, outside a tool call
        ("...\n\n[Assis"; not "x = [" nor a newline alone), else its length: text the template would
        have written, held back as a possible stop and never streamed. The forced start's own part
        of it stays."""
        end = max(len(text) - held_back(text, self._role_stops), self._emitted) if self._role_stops else len(text)
        if text[end:].startswith("\n") and text[end:].strip() and not _inside(text, end, self.quoted):
            return max(end, min(self._forced, len(text)))
        return len(text)

    def _agrees(self, text: str) -> bool:
        """Whether `text` and the text streamed so far are equal as far as both go."""
        n = min(len(text), self._emitted)
        return text[:n] == self._streamed[:n]

    def _release(self, upto: int) -> list[Delta]:
        deltas = []
        if upto > self._emitted:
            split = min(max(self._draft_chars, self._emitted), upto)
            if split > self._emitted:
                deltas.append(Delta(self.text[self._emitted : split], "draft"))
                self._draft_streamed = split
            if upto > split:
                deltas.append(Delta(self.text[split:upto], "base"))
            self._streamed += self.text[self._emitted : upto]
        return deltas
