"""Continuing a reply with one model: the base model's phase (DESIGN 3.6), or the draft model's whole
reply in mode="draft": sample, stop on EOS / stop strings / the budget, extend the cache."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .loading import LoadedModel
from .lookup import NgramIndex
from .kv_cache import KVCache
from .sampling import sample
from .output_head import HeadRows
from .sequence import Forward, Phase, Project, Sequence, Steps
from .structured import Guide


def continue_reply(
    seq: Sequence,
    loaded: LoadedModel,
    kv: KVCache,
    rows: HeadRows,
    generator: torch.Generator,
    guide: Guide,
    model: str = "base",
) -> Steps[str]:
    """Continue the reply from `rows` (whose last row gives the model's next-token logits) under
    `guide` with `loaded`, the `model` ("base", or "draft" writing the whole reply), whose token
    count it adds to; returns the finish reason. A reply whose budget is spent never projects them.

    Each pass feeds the latest token and up to `seq.lookup_tokens` guessed ones (lookup), and the
    rows it returns are read in order for as long as the token chosen from a row is the guess fed
    after it: the same choices, and the same draws of `generator`, as one token a pass."""
    seq.phase = Phase.CONTINUING if model == "base" else Phase.DRAFTING  # the draft model alone drafts the whole reply
    reply, budget = seq.reply, seq.params.max_tokens
    rows = rows[-1:]
    guesses: list[int] = []  # guesses: the ids fed after the one rows[0] follows
    lookup = NgramIndex(kv.ids) if seq.lookup_tokens else None  # the prompt and the reply so far
    while True:
        if reply.stopped:
            return "stop"
        if len(reply.ids) >= budget:
            return "length"
        choose = yield from chooser(seq, rows, generator, guide, model, lambda: reply.ids)  # each row follows the reply so far
        for j in range(len(rows)):
            token = choose(j)
            if token in loaded.eos_ids:
                return "stop"
            guide.accept(token)
            if model == "base":
                seq.base_tokens += 1
            else:
                seq.draft_tokens += 1
            seq.emit(reply.add([token], model))
            if lookup is not None:
                lookup.extend([token])
            hit = j < len(guesses) and token == guesses[j]  # then row j + 1 follows this token
            seq.guesses["accepted"] += hit
            if reply.stopped:
                return "stop"
            if len(reply.ids) >= budget:
                return "length"
            if not hit:
                break
        kv.crop(len(kv) - len(guesses) + j)  # drop the guesses after the first one missed
        rows, guesses = yield from guessed_pass(seq, model, kv, token, lookup, budget - len(reply.ids))


def guessed_pass(seq: Sequence, model: str, kv: KVCache, token: int, lookup: NgramIndex | None, room: int) -> Steps[tuple[HeadRows, list[int]]]:
    """Feed `token` into `kv` of `model`, with up to `seq.lookup_tokens` ids guessed by `lookup`
    (at most `room`); returns the pass's lazy rows and the guesses it fed, which a busy pass may
    have cut short (engine.GUESS_ROWS): rows[k + 1] follows guesses[k]."""
    guesses, matched = ([], 0) if lookup is None else lookup.guess(min(seq.lookup_tokens, room))
    rows: HeadRows = yield Forward(model, kv, [token, *guesses], keep=1 + len(guesses), phase=model, lazy=True, guesses=len(guesses), matched=matched)
    guesses = guesses[: len(rows) - 1]
    seq.guesses["fed"] += len(guesses)
    return rows, guesses


def chooser(
    seq: Sequence, rows: HeadRows, generator: torch.Generator, guide: Guide, model: str, written: Callable[[], list[int]]
) -> Steps[Callable[[int], int]]:
    """Project `rows` (one call) and return choose(j): the token row j gives, under the guide's mask
    and the repetition penalty over written(), the model's reply so far, as they stand when asked
    (row j is asked for once the tokens before it are written). Greedy, unpenalized and unmasked
    (or a lone row), it asks only for each row's largest logit's id (sequence.Project.greedy),
    which a head with a screen finds without the full projection (output_head.OutputHead.greedy_ids)."""
    params = seq.params
    if params.greedy and params.repetition_penalty == 1.0 and (len(rows) == 1 or not guide.active):
        mask = guide.mask if guide.active else None
        ids: list[int] = yield Project(rows, phase=model, greedy=True, mask=mask)
        return lambda j: ids[j]
    logits: torch.Tensor = yield Project(rows, phase=model)
    return lambda j: sample(guide.mask(logits[j]), params, generator, written())


def keep_draft(seq: Sequence, ids: list[int], guide: Guide) -> list[int]:
    """Make the reply's draft part the longest prefix of these base ids that `guide` accepts,
    stream whatever text became final, and return the kept ids."""
    ids = ids[: guide.sync(ids)]
    seq.emit(seq.reply.set_draft(ids))
    seq.kept_draft = len(seq.reply.ids)
    return ids
