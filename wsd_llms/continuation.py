"""The base model's phase (DESIGN 3.6): sample, stop on EOS / stop strings / the budget, extend the cache."""

from __future__ import annotations

import torch

from .loading import LoadedModel
from .model_runner import KVCache
from .sampling import sample
from .sequence import Forward, Phase, Program, Sequence


def continue_base(
    seq: Sequence, base: LoadedModel, kv: KVCache, logits: torch.Tensor, generator: torch.Generator, model: str = "base"
) -> Program:
    """Continue the reply from `logits` (the model's next-token logits); returns the finish reason."""
    seq.phase = Phase.CONTINUING
    reply, budget = seq.reply, seq.params.max_tokens
    while True:
        if reply.stopped:
            return "stop"
        if len(reply.ids) >= budget:
            return "length"
        token = sample(logits, seq.params, generator)
        if token in base.eos_ids:
            return "stop"
        seq.base_tokens += 1
        seq.emit(reply.add([token], model))
        if reply.stopped:
            return "stop"
        if len(reply.ids) >= budget:
            return "length"
        logits = yield Forward(model, kv, [token], phase=model)


def keep_draft(seq: Sequence, ids: list[int]) -> None:
    """Make the reply's draft part these base ids and stream whatever text became final."""
    seq.emit(seq.reply.set_draft(ids))
    seq.kept_draft = len(seq.reply.ids)
