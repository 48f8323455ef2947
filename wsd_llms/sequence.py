"""One request's state as it moves through the phases: waiting, drafting, continuing, finished."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from .events import Event, TextDelta
from .kv_cache import KVCache
from .output_head import HeadRows, Mask
from .params import GenerationParams
from .prompts import Prompts
from .reply import Delta, ReplyText


class CallerLeft(threading.Event):
    """Set when a request's caller has left it (its stream closed, its task cancelled, its timeout
    passed, its event loop closed); `told_closed` when it left because it was told the runtime
    stopped, and `at` when it first left (time.perf_counter()), which says whether it left before
    its timeout or at it."""

    told_closed = False
    at: float | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__()
        self.loop = loop  # an async caller's: once it has closed, nobody can read the request's events

    def set(self) -> None:
        if self.at is None:
            self.at = time.perf_counter()
        super().set()

    def is_set(self) -> bool:
        """Whether the caller has left, a closed loop read as leaving: a request still queued when
        its loop closed was found out only by its first event, after its admission and prefill.
        Reading a closed loop sets this (`at` is when it was read, not when the loop closed, so one
        read past the request's timeout counts as timed out); `wait()` does not read the loop."""
        if self.loop is not None and self.loop.is_closed() and not super().is_set():
            self.set()
        return super().is_set()


class Phase(str, Enum):
    WAITING = "waiting"
    DRAFTING = "drafting"
    CONTINUING = "continuing"
    FINISHED = "finished"


@dataclass
class Forward:
    """A forward pass a sequence needs: feed `ids` into `kv` of `model` ("draft" or "base").

    With keep=0 the answer is the next-token logits [V]; with keep=k, the last k rows [k, V].
    With lazy=True it is those rows as output_head.HeadRows instead, whose logits are computed only
    when asked for. `phase` ("draft", "score" or "base") says what the pass is for; the scheduler
    may batch passes of the same model and phase across sequences. `guesses`: how many of the ids
    after the first are guessed (lookup), checked by their rows: a decode step, never cut in pieces;
    `matched`: the length of the match they came from (lookup.Guess), which ranks them for a busy
    pass's room (scheduler.guess_shares).
    """

    model: str
    kv: KVCache
    ids: list[int]
    keep: int = 0
    phase: str = "draft"
    lazy: bool = False
    guesses: int = 0
    matched: int = 0


@dataclass
class Project:
    """Logits a program needs for rows a lazy forward gave it: float32 [len(rows), V]. The engine
    projects every program's waiting rows together, one call of each model's output projection.

    With `greedy`, the answer is instead each row's largest logit's id (list[int]) once `mask` is
    applied, which the head can find without every logit (output_head.OutputHead.greedy_ids)."""

    rows: HeadRows
    phase: str = "score"
    greedy: bool = False
    mask: Mask | None = None


T = TypeVar("T")

# A decoding program, or a part of one: yields the passes and projections it needs and is sent
# their answers (a lazy Forward's HeadRows, a Project's logits, a greedy Project's ids: each yield
# annotates what it takes), returns T.
Steps = Generator[Forward | Project, Any, T]
Program = Steps[str]  # a request's whole program returns its finish reason

_ids = itertools.count(1)


@dataclass
class Sequence:
    """A request inside the runtime: its parameters, prompts, reply so far, and bookkeeping."""

    params: GenerationParams
    prompts: Prompts
    reply: ReplyText
    deliver: Callable[[Event | BaseException], None]
    asked: dict[str, int] = field(default_factory=dict)  # budgets as the caller gave them, before the windows capped `params`
    request_id: int = field(default_factory=lambda: next(_ids))
    queued: bool = False  # in the scheduler's queue, not yet admitted: its phase reads WAITING
    _phase: Phase = Phase.WAITING  # what its program is doing (set by the program, and on finishing)
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    seconds: dict[str, float] = field(default_factory=lambda: {"draft": 0.0, "score": 0.0, "base": 0.0})
    draft_tokens: int = 0
    base_tokens: int = 0
    kept_draft: int = 0
    switch_point: int | None = None
    rollbacks: int = 0
    constraint: str | None = None  # the grammar spec (structured.constraint_spec), or None
    scoring_open: bool = True  # whether a scoring pass may start this step (engine.SCORING_STRIDE)
    lookup_tokens: int = 0  # ids its draft and continuation may guess per pass (engine.Engine.lookup_tokens)
    guesses: dict[str, int] = field(default_factory=lambda: {"fed": 0, "accepted": 0})
    cancelled: CallerLeft = field(default_factory=CallerLeft)
    draft_kv: KVCache | None = None
    base_kv: KVCache | None = None
    cached_prompt: dict[str, int] = field(default_factory=lambda: {"draft": 0, "base": 0})
    """Prompt positions each model took from the prefix cache, in its first cache (note_restored)."""
    prompt_caches: dict[str, weakref.ref[KVCache]] = field(default_factory=dict)
    program: Program | None = None
    pending: Forward | Project | None = None  # what its program asked for last
    piece_rows: HeadRows | None = None  # rows the pending forward's pieces gave so far (scheduler.prefill_pieces)

    @property
    def phase(self) -> Phase:
        """Waiting while queued (its program may have started, to check the request), else its program's phase."""
        return Phase.WAITING if self.queued else self._phase

    @phase.setter
    def phase(self, phase: Phase) -> None:
        self._phase = phase

    def emit(self, deltas: list[Delta]) -> None:
        """Send final text to the caller, noting the time of the first piece."""
        for d in deltas:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.deliver(TextDelta(d.text, d.source))  # type: ignore[arg-type]

    def cache_limits(self) -> dict[str, int]:
        """Most positions each of this request's caches holds: "draft", "base", and "check" (the
        staged pipeline's check of the draft in one base pass: its first max_tokens base ids, with
        room for a draft that takes twice as many base ids as its own). The draft model alone
        (mode="draft") writes the whole reply, up to max_tokens, into its draft cache."""
        p, prompts = self.params, self.prompts
        return {
            "draft": len(prompts.draft_ids) + (p.max_tokens if p.mode == "draft" else p.max_draft_tokens),
            "base": len(prompts.base_ids) + p.max_tokens + 1,
            "check": len(prompts.base_ids) + min(2 * p.max_draft_tokens, p.max_tokens),
        }

    def cache_budgets(self) -> dict[str, str]:
        """The parameter that grows the draft and the base cache past its prompt (and lowers it): the
        staged check's cache holds at most what the base cache does, so it is never the one too large."""
        return {"draft": "max_tokens" if self.params.mode == "draft" else "max_draft_tokens", "base": "max_tokens"}

    def cache_terms(self) -> dict[str, str]:
        """What cache_limits counts for the draft and base caches, spelled with this request's values
        (for an error that says why a request cannot fit)."""
        prompts, budgets = self.prompts, self.cache_budgets()

        def budget(name: str) -> str:
            value, asked = getattr(self.params, name), self.asked.get(name)
            capped = f" ({asked} capped at the context window)" if asked is not None and asked != value else ""
            return f"{name}={value}{capped}"

        return {
            "draft": f"draft prompt {len(prompts.draft_ids)} + {budget(budgets['draft'])}",
            "base": f"base prompt {len(prompts.base_ids)} + {budget(budgets['base'])} + 1",
        }

    def new_cache(self, kind: str) -> KVCache:
        """An empty cache of `kind` (see cache_limits) that never reserves room beyond its limit."""
        return KVCache(self.cache_limits()[kind])

    def note_restored(self, model: str, kv: KVCache, held: int) -> None:
        """Count `held` positions taken from the prefix cache into `kv` if `kv` is the first cache of
        `model` that this request fed more than one id (its prompt); a later cache of the same model
        (the staged pipeline's second base prefill) takes what the first stored and does not count.
        A weak reference, so a cache dropped early is not kept."""
        first = self.prompt_caches.setdefault(model, weakref.ref(kv))
        if first() is kv:
            prompt = self.prompts.draft_ids if model == "draft" else self.prompts.base_ids
            self.cached_prompt[model] = min(self.cached_prompt[model] + held, len(prompt))

    def cached_tokens(self) -> int:
        """Positions held in this sequence's KV caches."""
        return sum(len(kv) for kv in (self.draft_kv, self.base_kv) if kv is not None)

    def free(self) -> None:
        """Drop the caches (finished, failed or cancelled)."""
        self.draft_kv = self.base_kv = None
        self.pending = self.piece_rows = None
        program, self.program = self.program, None
        if program is not None:
            program.close()  # runs the program's cleanup, which may raise (Engine._drop)
