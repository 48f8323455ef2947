"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seeded generator,
after the request's repetition penalty."""

from __future__ import annotations

from collections.abc import Sequence

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
    """A 64-bit `seed` (a negative one as its two's complement) and a stream number as the 32 bits
    torch's CPU generator keeps (its mt19937 takes a seed's low 32 bits only). A seed below 2**32
    is itself for the draft's draws (stream 0); higher bits are mixed in (murmur3's finalizer), so
    seed + 2**32 draws otherwise than seed; the base's draws (stream 1) flip the top bit with a
    constant, so no seed below 2**31 draws the base stream of another (seed + 1 had been the base
    stream of seed). 32 bits cannot keep every 64-bit seed apart."""
    u = seed % 2**64
    return (u & 0xFFFFFFFF) ^ _fmix32(u >> 32) ^ (stream * 0x9E3779B9 & 0xFFFFFFFF)


def _fmix32(h: int) -> int:
    """murmur3's 32-bit finalizer: a bijection with every input bit in every output bit (0 -> 0)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def penalize(logits: torch.Tensor, written: Sequence[int], penalty: float) -> torch.Tensor:
    """transformers' repetition penalty (RepetitionPenaltyLogitsProcessor, CTRL's): the logit of
    each id in `written` is divided by `penalty` where positive, multiplied where negative, in float32."""
    scores = logits.float()
    if penalty == 1.0 or not written:
        return scores
    ids = torch.tensor(sorted(set(written)), device=scores.device)
    picked = scores.gather(0, ids)
    return scores.scatter(0, ids, torch.where(picked < 0, picked * penalty, picked / penalty))


def sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator, written: Sequence[int] = ()) -> int:
    """One token id from a [vocab] row of logits; `written`: the model's reply so far, whose ids the
    request's repetition penalty makes less likely. Unlike transformers' generate, the prompt's ids
    are not penalized: a reply over retrieved passages must be free to use their words, and the
    prompt's turn ends (an end-of-turn token, a template's role marker) free to end the reply."""
    if params.repetition_penalty != 1.0:
        logits = penalize(logits, written, params.repetition_penalty)
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
