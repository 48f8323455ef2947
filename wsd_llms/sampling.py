"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seeded generator."""

from __future__ import annotations

import torch

from .params import GenerationParams


def make_generator(seed: int | None, stream: int = 0) -> torch.Generator:
    """A CPU generator: same seed, same draws, whatever the device of the model. `stream` gives
    one request's second model draws of its own (`stream_seed`)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(stream_seed(seed, stream))
    return gen


def stream_seed(seed: int, stream: int) -> int:
    """A 64-bit `seed` (negative ones as their two's complement) and a stream number mixed into the 32
    bits torch's CPU generator keeps (its mt19937 takes a seed's low 32 bits only), with splitmix64's
    finalizer: every bit of the seed counts, and no seed's stream is another seed's (seed + 1 had
    been the base model's stream of seed, and seed + 2**32 the same reply as seed)."""
    z = (seed + stream * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    z ^= z >> 31
    return (z ^ (z >> 32)) & 0xFFFFFFFF


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
