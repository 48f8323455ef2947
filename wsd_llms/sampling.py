"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seeded generator."""

from __future__ import annotations

import torch

from .params import GenerationParams


def make_generator(seed: int | None, stream: int = 0) -> torch.Generator:
    """A CPU generator: same seed, same draws, whatever the device of the model. `stream` gives
    one request's second model draws of its own (seed + stream, wrapped into the 64 bits torch takes)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed + stream if seed + stream < 2**64 else seed + stream - 2**64)
    return gen


def sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator) -> int:
    """One token id from a [vocab] row of logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float().cpu() / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        drop[0] = False  # the most likely token always stays (a top_p that rounds to 0 in float32 would drop it)
        scores = scores.scatter(0, order[drop], -float("inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_probs(prev_logits: torch.Tensor, ids: list[int]) -> list[float]:
    """Probability of ids[j] under prev_logits[j]: float32 softmax over the full vocabulary."""
    logp = torch.log_softmax(prev_logits.float(), dim=-1)
    index = torch.tensor(ids, device=logp.device).unsqueeze(-1)
    return torch.exp(logp.gather(-1, index).squeeze(-1)).tolist()
