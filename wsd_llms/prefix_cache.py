"""Prompt prefixes kept across requests: the key/value states of whole prefill pieces, so that a
request starting with the same tokens as an earlier one (an agent loop's growing history, a
document many questions share, one system prompt under many users' questions) feeds only the rest.

A piece's states depend only on the ids up to its end and on where the pieces before it were
cut, and a prompt is cut at the same positions whatever else runs (scheduler.piece_end: at the
multiples of prefill_chunk, less one just past a mark cut, and at its marks: where each message starts and where it ends), so restoring stored pieces gives a cache bit for bit
equal to feeding them again (on CPU, where a row's pass does not depend on the others). That holds
for pieces that follow only whole pieces (`KVCache.cuts`): only those are stored, and only a cache
made of them takes more; a piece is known by its cuts and its ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import KVCache
from .scheduler import piece_end


# A piece: (prefill_chunk, every cut up to the piece's end, every id up to its end).
Key = tuple[int, tuple[int, ...], tuple[int, ...]]


def _before(key: Key) -> Key | None:
    """The key of the piece just before this one in its prompt (None for a first piece)."""
    chunk, cuts, ids = key
    return (chunk, cuts[:-1], ids[: cuts[-2]]) if len(cuts) > 1 else None


@dataclass
class _Piece:
    """A stored piece's keys and values [layers, 1, heads, size, dim], the key of the piece before
    it, and how many stored pieces continue it."""

    keys: torch.Tensor
    values: torch.Tensor
    before: Key | None
    continued: int = 0


class PrefixCache:
    """One model's stored pieces within `max_tokens` positions. A piece is stored only after the
    piece before it (a piece is taken only after it), and the least recently used piece that no
    stored piece continues goes first: a prompt longer than the store keeps its first pieces,
    which the next request on it can take, rather than its last ones, which it cannot reach."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        # Least recently used first. A dict, not an OrderedDict, whose iteration hashes every key again
        # (a key holds every id up to its piece's end: 42 ms to scan 256 pieces of one 65536-id prompt).
        self._pieces: dict[Key, _Piece] = {}
        self.hits = 0
        self.reused_tokens = 0
        self._tokens = 0  # positions held: a counter, so stats() may read it from any thread

    def tokens(self) -> int:
        """Positions held."""
        return self._tokens

    def restore(self, kv: KVCache, ids: list[int], keep: int, chunk: int, num_layers: int, marks: tuple[int, ...] = ()) -> int:
        """Extend `kv` (which ends where a piece would start) with the stored pieces that continue
        it with `ids`, as far as feeding `ids` would cut them whole (`marks`: the prompt's
        marks, prompts.Prompts.marks; the last piece, which gives the `keep` rows, is always fed); returns how many of
        `ids` it now holds.

        A prompt that starts like an earlier one starts from its pieces; one that runs beside
        another with the same start (parallel agent branches) takes each piece as the other stores it.
        """
        start = len(kv)
        if not kv.whole_pieces(start, chunk):
            return 0
        found: list[tuple[int, _Piece]] = []  # (end, piece) of each piece taken
        end = start
        while start + len(ids) - (after := piece_end(end, marks, chunk)) >= max(keep, 1):
            key = (chunk, (*kv.cuts, *(e for e, _ in found), after), tuple(kv.ids + ids[: after - start]))
            if key not in self._pieces:
                break
            self._pieces[key] = self._pieces.pop(key)  # most recently used
            found.append((after, self._pieces[key]))
            end = after
        if not found:
            return 0
        held = end - start
        kv.store.num_layers = kv.store.num_layers or num_layers
        first = found[0][1]
        buffers = kv.store.room(end, first.keys[0], first.values[0])
        at = start
        kv.store.edits += 1
        for after, piece in found:
            for buffer, states in zip(buffers, (piece.keys, piece.values)):
                buffer[..., at:after, :] = states
            at = after
        for layer in kv.fill_layers(num_layers):
            layer.length = end
        kv.ids.extend(ids[:held])
        kv.cuts.extend(after for after, _ in found)
        kv.piece_size = chunk
        self.hits += 1
        self.reused_tokens += held
        return held

    def store(self, kv: KVCache, start: int, chunk: int, marks: tuple[int, ...] = ()) -> None:
        """Keep the piece `kv` was just fed at positions [start, len(kv)), if whole pieces came
        before it and it ends where the prompt is cut (`marks`: the prompt's, prompts.Prompts.marks)."""
        end = len(kv)
        if not kv.whole_pieces(start, chunk) or end != piece_end(start, marks, chunk) or kv.store.buffers is None:
            return
        kv.cuts.append(end)
        kv.piece_size = chunk
        if end - start > self.max_tokens:
            return
        key = (chunk, tuple(kv.cuts), tuple(kv.ids[:end]))
        if key in self._pieces:
            self._pieces[key] = self._pieces.pop(key)  # most recently used
            return
        before = _before(key)
        if before is not None and before not in self._pieces:  # it could never be taken
            return
        keys, values = (buffer[..., start:end, :].clone() for buffer in kv.store.buffers)
        self._pieces[key] = _Piece(keys, values, before)
        if before is not None:
            self._pieces[before].continued += 1
        self._tokens += end - start
        self._evict()

    def resize(self, max_tokens: int) -> None:
        """Hold at most `max_tokens` positions from now on, dropping pieces as `_evict` does."""
        self.max_tokens = max_tokens
        self._evict()

    def clear(self) -> None:
        self._pieces.clear()
        self._tokens = 0

    def _evict(self) -> None:
        """Drop pieces, least recently used first among those no stored piece continues, until the store fits."""
        while self._pieces and self._tokens > self.max_tokens:
            key = next(key for key, piece in self._pieces.items() if not piece.continued)  # a chain's last piece is one
            piece = self._pieces.pop(key)
            self._tokens -= piece.keys.shape[-2]
            if piece.before is not None:
                self._pieces[piece.before].continued -= 1
