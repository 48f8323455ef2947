"""The base model's phase (DESIGN 3.6): sample, stop on EOS / stop strings / the budget, extend the cache."""

from __future__ import annotations

import torch

from .loading import LoadedModel
from .kv_cache import KVCache
from .sampling import sample
from .output_head import HeadRows
from .sequence import Forward, Phase, Program, Project, Sequence
from .structured import Guide


def continue_base(
    seq: Sequence,
    base: LoadedModel,
    kv: KVCache,
    rows: HeadRows,
    generator: torch.Generator,
    guide: Guide,
    model: str = "base",
) -> Program:
    """Continue the reply from `rows` (whose last row gives the model's next-token logits) under
    `guide`; returns the finish reason. A reply whose budget is spent never projects them."""
    seq.phase = Phase.CONTINUING
    reply, budget = seq.reply, seq.params.max_tokens
    while True:
        if reply.stopped:
            return "stop"
        if len(reply.ids) >= budget:
            return "length"
        if seq.params.greedy:
            token = (yield Project(rows[-1:], phase=model, greedy=True, mask=guide.mask if guide.active else None))[0]
        else:
            logits = (yield Project(rows[-1:], phase=model))[0]
            token = sample(guide.mask(logits), seq.params, generator)
        if token in base.eos_ids:
            return "stop"
        guide.accept(token)
        seq.base_tokens += 1
        seq.emit(reply.add([token], model))
        if reply.stopped:
            return "stop"
        if len(reply.ids) >= budget:
            return "length"
        rows = yield Forward(model, kv, [token], phase=model, lazy=True)


def keep_draft(seq: Sequence, ids: list[int], guide: Guide) -> list[int]:
    """Make the reply's draft part the longest prefix of these base ids that `guide` accepts,
    stream whatever text became final, and return the kept ids."""
    ids = ids[: guide.sync(ids)]
    seq.emit(seq.reply.set_draft(ids))
    seq.kept_draft = len(seq.reply.ids)
    return ids
