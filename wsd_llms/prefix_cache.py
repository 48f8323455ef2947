"""Prompt prefixes kept across requests: the key/value states of whole prefill pieces, so that a
request starting with the same tokens as an earlier one (an agent loop's growing history, a
document many questions share) feeds only the rest.

A piece's states depend only on the ids up to its end, and a prompt is cut into pieces at the same
positions whatever else runs (scheduler.prefill_pieces), so restoring stored pieces gives a cache
bit for bit equal to feeding them again (on CPU, where a row's pass does not depend on the others).
That holds for pieces that follow only whole pieces (`KVCache.pieces`): only those are stored, and
only a cache made of them takes more.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .kv_cache import KVCache


class PrefixCache:
    """One model's stored pieces, least recently used first, within `max_tokens` positions."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        # (piece size, every id up to the piece's end) -> the piece's keys and values [layers, 1, heads, size, dim]
        self._pieces: OrderedDict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.reused_tokens = 0
        self._tokens = 0  # positions held: a counter, so stats() may read it from any thread

    def tokens(self) -> int:
        """Positions held."""
        return self._tokens

    def restore(self, kv: KVCache, ids: list[int], keep: int, chunk: int, num_layers: int) -> int:
        """Extend `kv` (which ends where a piece would start) with the stored pieces that continue
        it with `ids`, as far as feeding `ids` in pieces of `chunk` would cut them whole (the last
        piece, which gives the `keep` rows, is always fed); returns how many of `ids` it now holds.

        A prompt that starts like an earlier one starts from its pieces; one that runs beside
        another with the same start (parallel agent branches) takes each piece as the other stores it.
        """
        start = len(kv)
        if not kv.whole_pieces(start, chunk):
            return 0
        found: list[tuple[torch.Tensor, torch.Tensor]] = []
        end = chunk
        while len(ids) - end >= max(keep, 1) and (key := (chunk, tuple(kv.ids + ids[:end]))) in self._pieces:
            self._pieces.move_to_end(key)
            found.append(self._pieces[key])
            end += chunk
        if not found:
            return 0
        held = chunk * len(found)
        kv.store.num_layers = kv.store.num_layers or num_layers
        first_keys, first_values = found[0]
        buffers = kv.store.room(start + held, first_keys[0], first_values[0])
        for i, piece in enumerate(found):
            for buffer, states in zip(buffers, piece):
                buffer[..., start + i * chunk : start + (i + 1) * chunk, :] = states
        for layer in kv.fill_layers(num_layers):
            layer.length = start + held
        kv.ids.extend(ids[:held])
        kv.pieces, kv.piece_size = start + held, chunk
        self.hits += 1
        self.reused_tokens += held
        return held

    def store(self, kv: KVCache, start: int, chunk: int) -> None:
        """Keep the piece `kv` was just fed at positions [start, start + chunk), if whole pieces came before it."""
        if not kv.whole_pieces(start, chunk) or kv.store.buffers is None:
            return
        kv.pieces, kv.piece_size = start + chunk, chunk
        if chunk > self.max_tokens:
            return
        key = (chunk, tuple(kv.ids[: start + chunk]))
        if key in self._pieces:
            self._pieces.move_to_end(key)
            return
        keys, values = (buffer[..., start : start + chunk, :].clone() for buffer in kv.store.buffers)
        self._pieces[key] = (keys, values)
        self._tokens += chunk
        self._evict()

    def resize(self, max_tokens: int) -> None:
        """Hold at most `max_tokens` positions from now on, dropping the least recently used pieces."""
        self.max_tokens = max_tokens
        self._evict()

    def clear(self) -> None:
        self._pieces.clear()
        self._tokens = 0

    def _evict(self) -> None:
        while self._pieces and self._tokens > self.max_tokens:
            (size, _), _ = self._pieces.popitem(last=False)
            self._tokens -= size
