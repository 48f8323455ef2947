"""The draft model's decode passes while it writes a draft, with guessed ids (lookup) checked in
the same pass, so that a run of tokens the draft writes the way its prompt or its own draft did
before costs one pass instead of one each."""

from __future__ import annotations

from typing import Any

import torch

from .continuation import chooser, guessed_pass
from .encoding import encode_text
from .kv_cache import KVCache
from .lookup import NgramIndex
from .output_head import HeadRows
from .sequence import Forward, Sequence, Steps
from .structured import Guide


class DraftPasses:
    """The draft's tokens, one at a time: each chosen from the row a pass gave after the one before,
    where a pass feeds the latest token and up to `seq.lookup_tokens` guesses; while the draft picks
    the guesses, their rows stand in for passes.

    Rows are lazy (output_head.HeadRows): a row is projected only when its token is chosen, so a
    guess the draft does not take costs its place in the pass and no projection. Each row is the
    one a pass of one id would give (to the bit on CPU, where guessed rows attend one query at a
    time: attention.RaggedRows), so the draft, and its draws of `generator`, are the same with
    guesses or without."""

    def __init__(self, seq: Sequence, kv: KVCache, room: int, generator: torch.Generator, guide: Guide, tokenizer: Any) -> None:
        """The draft writes at most `room` tokens into `kv`, under `guide`, with the draft's `tokenizer`."""
        self.seq, self.kv, self.room, self.generator, self.guide = seq, kv, room, generator, guide
        self.lookup: NgramIndex | None = None  # the prompt and the draft so far, once the prompt is in
        self.row: HeadRows | None = None  # predicts the next token
        self.guesses: list[int] = []  # fed after the latest token, not yet picked by the draft
        self.rows: HeadRows | None = None  # rows[i]: after guesses[i]
        # The reply so far in draft ids, as the repetition penalty (its only reader) reads it: the
        # forced start (which the prompt ends with), as the draft model alone starts its reply, then
        # the tokens drafted. Without a penalty the start is not encoded: nothing reads it.
        penalized = seq.params.repetition_penalty != 1.0
        self.drafted = encode_text(tokenizer, seq.prompts.forced_prefix) if penalized else []

    def start(self, prompt_ids: list[int]) -> Steps[None]:
        """Feed the prompt."""
        self.row = yield Forward("draft", self.kv, prompt_ids, lazy=True)
        if self.seq.lookup_tokens:
            self.lookup = NgramIndex(prompt_ids)

    def choose(self) -> Steps[int]:
        """The next token (greedy, or a draw of the generator, under the guide's mask)."""
        assert self.row is not None
        choose = yield from chooser(self.seq, self.row, self.generator, self.guide, "draft", lambda: self.drafted)
        return choose(0)

    def feed(self, token: int, written: int) -> Steps[None]:
        """Follow the cache with `token`, the draft's `written`-th: take the row after it from a
        guess the draft picked, else from a pass that feeds it and the next guesses."""
        self.drafted.append(token)
        if self.lookup is not None:
            self.lookup.extend([token])
        if self.guesses and token == self.guesses[0]:
            assert self.rows is not None
            self.seq.guesses["accepted"] += 1
            self.row, self.rows, self.guesses = self.rows[:1], self.rows[1:], self.guesses[1:]
            return
        self.kv.crop(len(self.kv) - len(self.guesses))  # drop the guesses the draft did not take
        rows, self.guesses = yield from guessed_pass(self.seq, "draft", self.kv, token, self.lookup, self.room - written)
        self.row, self.rows = rows[:1], rows[1:]
