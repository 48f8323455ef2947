"""The output projection run outside the model's forward, so a scoring pass can skip most of it.

The switch rule (DESIGN 3.5) needs a draft token's exact probability only where a window
containing it could still pass. Everywhere else an upper bound decides the same way, and one
comes cheaply from a slice of the vocabulary: p(t) = e^l_t / sum_j e^l_j <= e^l_t / sum_{j in S} e^l_j
for any S holding t. Tokenizers put their frequent words first, so the first BOUND_WORDS ids hold
most of the probability mass: on the embedded pair 8192 of the base's 262144 words bound all but
16-20% of the serving benchmark's draft tokens below any passing window (benchmarks/bench_scoring.py),
and the full projection runs only for those.

Greedy decoding needs only the largest logit's id, in either model. A bfloat16 copy of the
projection (half the bytes to stream) screens the words: with a rigorous bound on its rounding,
only words within that bound of the top can be the float32 projection's argmax (2 of 262144 at the
median on the embedded base), and their logits are computed again in float32
(`OutputHead.greedy_ids`). The id is the one the full projection's argmax gives, ties included;
where the bound cannot decide, the row is projected in full.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .packed_linear import PackedLinear, can_pack, linear_of

# Vocabulary ids [0, BOUND_WORDS) the bound projects: 1/32 of the embedded base's output projection.
BOUND_WORDS = 8192

# Below this many words the whole projection is cheap enough: no bound.
MIN_BOUND_VOCAB = 2 * BOUND_WORDS

# What a bound allows for rounding, in log-probability. Where the slice's kernel gives the whole
# projection's bits (checked at load: `check_slice`), only float32 softmax arithmetic (FLOOR) and a
# target outside the slice, whose logit is a dot product of its own (2 units in the last place of
# it). Elsewhere (a GPU's kernels may split the sums by shape) also 4 units in the last place of
# the largest logit: each logit, and so their log-sum-exp, may round another way.
BOUND_ULPS = 4.0
BOUND_FLOOR = 1e-4

# A grammar's mask: logits [V] -> a copy with the forbidden words at -inf (structured.Guide.mask).
Mask = Callable[[torch.Tensor], torch.Tensor]

# More candidates than this after the screen (a flat distribution, or a mask that forbids all):
# the row is projected in full instead.
MAX_CANDIDATES = 256

_BF16_UNIT = 2.0**-8  # bfloat16's unit roundoff (8 significant bits)


def _screen_scales(hidden: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """For rows [n, H]: the float32 sums' relative error bound gamma, each row's norm (with room
    for its own rounding), and what a word's row norm is multiplied by in `_screen_error`."""
    n = hidden.shape[-1]
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)  # a float32 sum of n products
    u = _BF16_UNIT
    sizes = hidden.norm(dim=-1) * (1 + 1e-3)
    return gamma, sizes, (2 * u + u * u + gamma * (1 + u) ** 2 + gamma) * sizes


def _screen_error(screened: torch.Tensor, norms: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """How far screened logits may lie from the float32 projection's, for words whose rows have
    these norms: the operands' rounding to bfloat16 and both sums (scale * norm), the result's
    rounding to bfloat16 (allowing a whole unit in the last place, should a kernel truncate), and
    room for flushed subnormals."""
    return norms * scale + screened.abs() * (2 * _BF16_UNIT / (1 - 2 * _BF16_UNIT)) + 1e-6


def _float32_matmul_is_ieee() -> bool:
    """Whether float32 matrix products run in float32 (`torch.set_float32_matmul_precision` can let
    oneDNN use bfloat16 inside them, beyond what the screen's bounds allow for)."""
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    return torch.get_float32_matmul_precision() == "highest" and getattr(mkldnn, "fp32_precision", "none") in ("none", "ieee")


class OutputHead:
    """A causal LM's output projection and final soft-capping, applied to its final hidden states.

    Build it before the model's linear layers are packed: it copies the bound's slice of the dense
    projection (unless `bound` is off: a model that is never scored) and the greedy screen's.
    `identity()` stands in where the model's own head cannot be reproduced (its forward returns
    logits already): the rows are logits, and every probability is exact.
    """

    def __init__(self, model: Any = None, bound: bool = True) -> None:
        self.model = model
        self.use_bound = True  # off: every scored probability is exact (benchmarks/bench_scoring.py compares)
        self.softcap: float | None = None
        self.dtype = torch.float32
        self._subset: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._words: torch.Tensor | None = None  # the projection's rows, for a target outside the subset
        self._bias: torch.Tensor | None = None
        self._slice_exact = False  # whether the slice's logits are the whole projection's, bit for bit
        self.use_screen = True  # off: greedy ids always come from the full projection (benchmarks/bench_greedy_head.py compares)
        self._screen: Callable[[torch.Tensor], torch.Tensor] | None = None  # the projection in bfloat16
        self._norms: torch.Tensor | None = None  # each word's row norm, rounded up, float32 [V]
        self._top_norm: torch.Tensor | None = None  # the largest of them
        self.screened_rows = self.fallback_rows = 0  # greedy rows the screen decided, and those projected in full
        if model is None:
            return
        head = model.get_output_embeddings()
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        if not isinstance(head, torch.nn.Linear) or head.out_features < MIN_BOUND_VOCAB:
            return  # no slice to take or screen to build, or the whole projection is cheap
        self.dtype = head.weight.dtype
        weight, bias = head.weight.detach(), head.bias
        self._bias = None if bias is None else bias.detach()
        inputs = model.get_input_embeddings()
        tied = getattr(inputs, "weight", None) is head.weight
        packed = can_pack(weight)
        # The rows stay at hand where they cost nothing: a tied head's are the input embeddings;
        # an untied head packed for oneDNN drops its dense copy, so its bound skips outside words.
        self._words = inputs.weight if tied else (None if packed else head.weight)
        if bound:  # a model that is scored: a copy of the first rows (made from them, not drawn: loading takes nothing from torch's global generator)
            subset = linear_of(weight[:BOUND_WORDS].clone(), None if bias is None else bias[:BOUND_WORDS].clone())
            self._subset = PackedLinear(subset) if packed else subset
        # The greedy screen, for a float32 projection with its rows at hand (to compute candidates
        # again) and nothing after the product (a bias or soft-capping would need their own bounds).
        if packed and self.dtype == torch.float32 and self._words is not None and bias is None and self.softcap is None:
            if can_pack(weight[:1].to(torch.bfloat16)):
                self._screen = PackedLinear.of(weight.to(torch.bfloat16))
                self._norms = weight.float().norm(dim=1) * (1 + 1e-3)  # with room for their own rounding
                self._top_norm = self._norms.max()

    @classmethod
    def identity(cls) -> OutputHead:
        return cls()

    def check_slice(self) -> None:
        """Find out whether the slice gives the whole projection's bits for its words (then bounds
        need almost no allowance for rounding). Call it once the model's layers are packed. The
        inputs are heavy-tailed, like activations, and come in several row counts, since kernels
        are chosen by shape."""
        if self._subset is None:
            return
        head = self.model.get_output_embeddings()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(31, head.in_features, generator=generator).pow(3).mul(8)
        x = x.to(device=next(self.model.parameters()).device, dtype=self.dtype)
        with torch.inference_mode():
            self._slice_exact = all(torch.equal(self._subset(x[:n]), head(x[:n])[:, :BOUND_WORDS]) for n in (1, 2, 3, 8, 17))

    @property
    def projects(self) -> bool:
        """Whether rows are hidden states this head projects (else they are logits already)."""
        return self.model is not None

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for rows of final hidden states [..., H], as the model's forward computes them."""
        if not self.projects:
            return hidden.float()
        return self._cap(self.model.get_output_embeddings()(hidden)).float()

    def logprob_bounds(self, hidden: torch.Tensor, ids: list[int]) -> list[float] | None:
        """Upper bounds on log p(ids[j]) under row j, from the first BOUND_WORDS words (and the
        target's own row); a target outside them with no row at hand is bounded by p <= 1.
        None where this head computes no bounds (a small vocabulary, or rows that are logits)."""
        if self._subset is None or not self.use_bound:
            return None
        sub = self._cap(self._subset(hidden)).float()  # [n, BOUND_WORDS]
        lse = torch.logsumexp(sub, dim=-1)
        targets = torch.tensor(ids, device=sub.device)
        inside = targets < BOUND_WORDS
        own = sub.gather(-1, targets.clamp(max=BOUND_WORDS - 1)[:, None])[:, 0]
        known = inside.clone()
        if self._words is not None and not bool(inside.all()):
            out = (~inside).nonzero()[:, 0]
            rows = self._words[targets[out]]
            logit = (hidden[out].float() * rows.float()).sum(-1)
            if self._bias is not None:
                logit = logit + self._bias[targets[out]].float()
            logit = self._cap(logit.to(self.dtype)).float()
            own[out] = logit
            lse[out] = torch.logaddexp(lse[out], logit)  # the target joins the subset
            known[out] = True
        eps = torch.finfo(self.dtype).eps
        slack = torch.where(inside, 0.0, 2 * eps * own.abs()) + BOUND_FLOOR
        if not self._slice_exact:
            slack = slack + BOUND_ULPS * eps * torch.maximum(sub.abs().amax(-1), own.abs())
        bounds = torch.where(known, own - lse + slack, torch.full_like(own, BOUND_FLOOR))
        return bounds.tolist()

    def greedy_ids(self, hidden: torch.Tensor, masks: Sequence[Mask | None], logits: torch.Tensor | None = None) -> list[int]:
        """For each row of final hidden states [n, H], the id of its largest logit once its mask is
        applied: what `torch.argmax` over the float32 projection gives (the first of equal ones).

        From `logits` where the caller has them; else from the bfloat16 screen where this head has
        one, the float32 projection running only for a row the screen cannot decide."""
        if logits is None and (self._screen is None or not self.use_screen or not _float32_matmul_is_ieee()):
            logits = self.logits(hidden)
        if logits is not None:
            return [int(torch.argmax(row if mask is None else mask(row))) for row, mask in zip(logits, masks)]
        assert self._screen is not None and self._norms is not None and self._words is not None
        screened = self._screen(hidden.to(torch.bfloat16)).float()
        rows = hidden.float()
        ids = self._screen_ids(screened, rows, masks)
        undecided = [i for i, token in enumerate(ids) if token is None]
        self.screened_rows += len(ids) - len(undecided)
        self.fallback_rows += len(undecided)
        if undecided:
            full = self.logits(hidden[undecided])
            for i, token in zip(undecided, self.greedy_ids(hidden[undecided], [masks[i] for i in undecided], full)):
                ids[i] = token
        return ids  # type: ignore[return-value]

    def _screen_ids(self, screened: torch.Tensor, hidden: torch.Tensor, masks: Sequence[Mask | None]) -> list[int | None]:
        """The float32 projection's argmax for each row, masked, from its screened logits [n, V];
        None where the bounds leave it open.

        Rounding the weights and the row to bfloat16, summing, and rounding the result move a
        logit by at most `_screen_error`; the float32 projection's own sum moves it by at most
        gamma * S (S = sum |w_k h_k| <= |w| |h|). So only the candidates can be the argmax, and
        their float32 logits, summed again in any order, decide it unless two lie within both
        sums' rounding of each other."""
        gamma, sizes, scales = _screen_scales(hidden)
        found = self._candidates(screened, sizes, scales, gamma, masks)
        return [self._decide(words, h, size, gamma) for words, h, size in zip(found, hidden, sizes)]

    def _candidates(
        self, screened: torch.Tensor, sizes: torch.Tensor, scales: torch.Tensor, gamma: float, masks: Sequence[Mask | None]
    ) -> list[torch.Tensor]:
        """Each row's words whose screened logit plus its error reaches the best screened logit
        less its error (masked words never do); `sizes`, `scales`, `gamma`: the rows' `_screen_scales`.
        The words near the top are found first, in one pass over the rows, since no error exceeds
        `widest`: no screened logit exceeds |w| |h| by more than the bfloat16 operands' and the
        sum's rounding (Cauchy-Schwarz)."""
        assert self._norms is not None and self._top_norm is not None
        top = self._top_norm
        widest = _screen_error(top * sizes * (1 + _BF16_UNIT) ** 2 * (1 + 2 * _BF16_UNIT) * (1 + gamma), top, scales)
        for i, mask in enumerate(masks):
            if mask is not None:
                screened[i] = mask(screened[i])  # forbidden words at -inf
        best, at = screened.max(dim=-1)
        reach = best - _screen_error(best, self._norms[at], scales) - widest
        near = (screened >= reach[:, None]).nonzero()
        found = []
        for z, words, scale in zip(screened, near[:, 1].split(torch.bincount(near[:, 0], minlength=len(screened)).tolist()), scales):
            z = z[words]
            eps = _screen_error(z, self._norms[words], scale)
            found.append(words[z + eps >= (z - eps).max()] if len(words) else words)
        return found

    def _decide(self, candidates: torch.Tensor, hidden: torch.Tensor, size: torch.Tensor, gamma: float) -> int | None:
        """One row's argmax among its candidates (ids), or None where their float32 logits leave it open."""
        assert self._norms is not None and self._words is not None
        if len(candidates) == 1:
            return int(candidates[0])
        if not 1 < len(candidates) <= MAX_CANDIDATES:  # a flat row, everything masked, or NaN
            return None
        exact = self._words[candidates].float() @ hidden
        slack = self._norms[candidates] * (2 * gamma * size) + 1e-6
        best = int(torch.argmax(exact))
        rivals = torch.cat([exact[:best] + slack[:best], exact[best + 1 :] + slack[best + 1 :]])
        return int(candidates[best]) if float(exact[best] - slack[best]) > float(rivals.max()) else None


@dataclass
class HeadRows:
    """Some positions' final hidden states from one pass, to be projected only where needed.

    What a lazy forward returns (sequence.Forward.lazy). A program asks the engine for their
    logits (sequence.Project), and the engine projects every program's rows of a step in one
    call: on a CPU the projection streams its whole weight whether it takes one row or eight.
    """

    hidden: torch.Tensor  # [n, H] (logits [n, V] for an identity head)
    head: OutputHead

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, rows: slice | list[int]) -> HeadRows:
        return HeadRows(self.hidden[rows], self.head)

    def then(self, other: HeadRows) -> HeadRows:
        """These rows followed by `other`'s."""
        return HeadRows(torch.cat([self.hidden, other.hidden]), self.head)

    def logprob_bounds(self, ids: list[int]) -> list[float] | None:
        """See OutputHead.logprob_bounds."""
        return self.head.logprob_bounds(self.hidden, ids)
