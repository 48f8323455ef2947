"""Decides which sequences run in the next step: bounded admission from a FIFO queue (a head too
large for the cache budget may be passed a bounded number of times), then every running sequence
advances once per step (so no request starves and long replies do not hold back short ones).
Also how a step runs: its forwards grouped into passes by cost (plan_passes, guess_shares), and
long prompts cut into prefill pieces (prefill_pieces, piece_end)."""

from __future__ import annotations

import threading
from collections import deque

from .errors import RequestTooLargeError
from .sequence import Forward, Sequence

# The fixed cost of one forward pass (reading the weights, launching the layers), in units of
# one token's compute, measured for the embedded models (benchmarks/bench_passes.py): 17-20 on a
# 2-core CPU; 7500-12000 on an H200 in bfloat16, where a pass costs about 20 ms of kernel
# launches whether it feeds 1 token or 512.
PASS_OVERHEAD = {"cpu": 18.0, "cuda": 7500.0}

# What a padded batched pass pays per cached position of each row, in the same units: every row's
# cache is copied into the batch (a shorter row's is zero-filled up to the longest) and attended
# over, where a lone sequence attends over its cache in place. Measured on the 2-core CPU
# (benchmarks/bench_passes.py, padded decode): 0.007 (base) to 0.018 (draft). On a GPU the copies
# run at memory bandwidth (an estimate, as yet unmeasured). So a sequence with a long cache (a
# long document) runs apart from short ones instead of slowing every stream's step. Ragged passes
# (attention.wsd_sdpa, on CPU) attend in place and pay nothing per position.
POSITION_COST = {"cpu": 0.012, "cuda": 0.01}

# Tokens of prompt a step feeds each model (chunked prefill): streams that are decoding pause for
# one piece rather than for the whole prompt (prefill_pieces: a step may feed prompts it finishes
# beside a long prompt's piece, up to about twice this). On a 2-core CPU (benchmarks/bench_long_prompt.py,
# a 2905-token document among 4 streams) pieces of 256 stall them for at most 0.52-0.54 s against
# 1.00 s with 512, for 1-2% more time to the document's first token (128: 0.31-0.32 s, 11% more); a
# prefix is also kept in finer pieces (bench_prefix_cache.py). On a GPU a pass of 8192 tokens
# should cost little more than a decode step (an estimate, as yet unmeasured).
PREFILL_CHUNK = {"cpu": 256, "cuda": 8192}

# A prompt's prefill is also cut where each of its messages starts and where it ends (prompts.Prompts
# marks), so that a later request with the same messages first (the next turn of a conversation or
# an agent loop, another question under the same system prompt) takes those pieces from the prefix cache. A mark
# less than MIN_PIECE ids past a piece's start is passed over: each pass has a fixed cost (about
# 17 tokens' worth on the 2-core CPU, PASS_OVERHEAD).
MIN_PIECE = 32


def piece_end(start: int, marks: tuple[int, ...], chunk: int) -> int:
    """Where the prefill piece that starts at position `start` ends: at the first mark (ascending)
    at least MIN_PIECE past it, if one comes before the next multiple of `chunk`; else there. A
    piece that starts at a mark passes over a multiple of `chunk` less than MIN_PIECE past it (a
    mark at 253 would leave a pass of 3 ids before 256), so it may run to chunk + MIN_PIECE - 1 ids.
    Pieces start at 0 and each starts where the last ended, so a prompt's cuts depend on its own
    ids and marks alone, and two prompts with the same start are cut alike there."""
    grid = (start // chunk + 1) * chunk
    if start % chunk and grid - start < MIN_PIECE:
        grid += chunk
    return next((m for m in marks if start + MIN_PIECE <= m < grid), grid)


# The caches each decoding program fills (Sequence.cache_limits).
CACHES = {"online": ("draft", "base"), "staged": ("draft", "check", "base"), "base": ("base",), "draft": ("draft",)}

# Programs that free each cache before they make the next (staged.run_staged): they hold one at a time.
ONE_AT_A_TIME = {"staged"}


def token_budget(seq: Sequence) -> int:
    """Most cache positions this request can ever hold at once (both models), reserved at admission."""
    limits = seq.cache_limits()
    held = [limits[kind] for kind in CACHES[seq.params.mode]]
    return max(held) if seq.params.mode in ONE_AT_A_TIME else sum(held)


def _too_large_reason(seq: Sequence, limit: int) -> tuple[str, str]:
    """What token_budget counts for this request, each term with its value, and what would bring it
    under `limit`: the budgets that fit, or shorter messages where the prompts alone leave no room
    for one token of each budget."""
    mode, terms, limits, budget = seq.params.mode, seq.cache_terms(), seq.cache_limits(), seq.cache_budgets()
    fixed = {kind: limits[kind] - getattr(seq.params, name) for kind, name in budget.items()}  # each cache's positions before its budget
    if mode in ONE_AT_A_TIME:  # its largest cache counts (never the staged check's: Sequence.cache_budgets)
        caches = [kind for kind in CACHES[mode] if kind in budget and limits[kind] > limit]
        held = f"the larger of: {', or '.join(terms[kind] for kind in caches)}" if len(caches) > 1 else terms[caches[0]]
        rooms = {budget[kind]: limit - fixed[kind] for kind in caches}
    else:
        caches = list(CACHES[mode])
        held = " + ".join(terms[kind] for kind in caches)
        rooms = {" + ".join(budget[kind] for kind in caches): limit - sum(fixed[kind] for kind in caches)}
    if min(rooms.values()) < (1 if mode in ONE_AT_A_TIME else len(caches)):  # room for one token of each budget
        return held, "its prompts leave no room for a reply: shorten the messages"
    lowered = f" {'and' if mode in ONE_AT_A_TIME else 'or'} ".join(budget[kind] for kind in caches)
    return held, f"lower {lowered} (to fit, {' and '.join(f'{name} <= {room}' for name, room in rooms.items())})"


# The runtime's default limits (WSDRuntime, Engine, Scheduler): sequences running at once, and the
# positions their caches may hold together.
MAX_RUNNING = 16
MAX_CACHED_TOKENS = 65536


class Scheduler:
    """FIFO admission bounded by concurrent sequences and reserved cache tokens.

    A request at the head of the queue whose reservation does not fit beside the running ones (one
    with max_tokens=10**6 reserves the base's whole context window and the draft's prompt and
    max_draft_tokens: 33,312 positions for "Hi" on the embedded pair) may be passed by later
    requests that fit now, so that short requests do not wait for a long one to end; each waiting
    request is passed by at most `max_running` of them (counted while it waits behind another too),
    then admission waits for it, so it still starts once enough running requests end.
    """

    def __init__(self, max_running: int = MAX_RUNNING, max_cached_tokens: int = MAX_CACHED_TOKENS) -> None:
        self.max_running = max_running
        self.max_cached_tokens = max_cached_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved = 0
        self._passed: dict[int, int] = {}  # id of a waiting request -> how many later ones were admitted before it
        # Held by each change of the queues and by readers of a snapshot (Engine.stats, from other
        # threads), so a reader never sees a request in neither queue or its reservation left behind.
        self.lock = threading.RLock()

    def add(self, seq: Sequence) -> None:
        """Queue a request; one that could never fit fails now."""
        error = self.too_large(seq)
        if error is not None:
            raise error
        seq.queued = True
        with self.lock:
            self.waiting.append(seq)

    def too_large(self, seq: Sequence) -> RequestTooLargeError | None:
        """The error for a request whose reservation is over max_cached_tokens (it could never run), else None."""
        need = token_budget(seq)
        if need <= self.max_cached_tokens:
            return None
        held, advice = _too_large_reason(seq, self.max_cached_tokens)
        return RequestTooLargeError(
            f"this request may need {need} cached tokens ({held}), more than the runtime's "
            f"max_cached_tokens={self.max_cached_tokens}; {advice}, or raise max_cached_tokens"
        )

    def never_fitting(self) -> list[tuple[Sequence, RequestTooLargeError]]:
        """The waiting requests that max_cached_tokens, lowered since they came, could never admit, with their errors."""
        with self.lock:
            return [(seq, error) for seq in self.waiting if (error := self.too_large(seq)) is not None]

    def schedule(self) -> list[Sequence]:
        """Admit from the head of the queue while the limits allow, then past a head too large for
        the room left (see the class); return the running sequences."""
        with self.lock:
            while self.waiting and len(self.running) < self.max_running and self._fits(self.waiting[0]):
                self._admit(self.waiting.popleft())
            ahead: list[Sequence] = []  # the waiting requests that the one looked at would pass
            for seq in list(self.waiting):  # from the head, which does not fit (or no room is left)
                if len(self.running) >= self.max_running:
                    break
                if not ahead or not self._fits(seq):
                    ahead.append(seq)
                    if self._passed.get(id(seq), 0) >= self.max_running:  # passed enough: the rest wait for it
                        break
                    continue
                self.waiting.remove(seq)
                self._admit(seq)
                for passed in ahead:
                    self._passed[id(passed)] = self._passed.get(id(passed), 0) + 1
                if any(self._passed[id(passed)] >= self.max_running for passed in ahead):
                    break
            return list(self.running)

    def _fits(self, seq: Sequence) -> bool:
        """Whether `seq`'s reservation fits beside the running requests' (alone, it always runs)."""
        return not self.running or self.reserved + token_budget(seq) <= self.max_cached_tokens

    def _admit(self, seq: Sequence) -> None:
        seq.queued = False
        self._passed.pop(id(seq), None)
        self.reserved += token_budget(seq)
        self.running.append(seq)

    def remove(self, seq: Sequence) -> bool:
        """Take a request off the queues; whether it was on one (a request two threads end, a closing
        runtime's worker and a configure() say, is removed once)."""
        with self.lock:
            if seq in self.running:
                self.running.remove(seq)
                self.reserved -= token_budget(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
                self._passed.pop(id(seq), None)
                seq.queued = False
            else:
                return False
            return True

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)


def plan_passes(forwards: list[Forward], overhead: float, position_cost: float, ragged: bool = False) -> list[list[int]]:
    """Group one model's pending forwards into batched passes; returns index lists into `forwards`.

    A ragged pass (`ragged`: the CPU runner) feeds every row only its own tokens, so all forwards
    share one. A padded pass is padded to its longest row and longest cache, so its cost is
    `overhead + rows * (width + position_cost * cached)` (a lone row pays nothing per cached
    position). The output projection runs for each row's own kept rows whatever the grouping, so it
    does not count. In order of width and cache length, a forward joins the current group when that
    is cheaper than its own pass: decode steps over caches of similar length share one pass,
    prefills and scoring passes of similar size share one.
    """
    if ragged:
        return [list(range(len(forwards)))] if forwards else []

    def cost(width: int, cached: int, rows: int) -> float:
        return overhead + rows * (width + (position_cost * cached if rows > 1 else 0.0))

    order = sorted(range(len(forwards)), key=lambda i: (len(forwards[i].ids), len(forwards[i].kv)))
    groups: list[list[int]] = []
    width = cached = 0
    for i in order:
        w, c = len(forwards[i].ids), len(forwards[i].kv)
        if groups:
            rows = len(groups[-1])
            if cost(max(width, w), max(cached, c), rows + 1) <= cost(width, cached, rows) + cost(w, c, 1):
                groups[-1].append(i)
                width, cached = max(width, w), max(cached, c)
                continue
        groups.append([i])
        width, cached = w, c
    return groups


# In a pass of several forwards, guesses come only from matches of at least this many ids. Alone a
# guessed row costs little beside the pass it saves when right (a draft pass with 4 guesses took
# 39.3 ms against 38.5), so even the first id guessed after a match of one id (right 16% of the
# time in the embedded draft's replies) pays. In a busy pass a row costs its share of the
# arithmetic and its attention, while a right guess saves only one stream's share of a step: on
# the serving benchmark's prompts, online WSD served 69.3 tok/s at 8 concurrent with guesses from
# 1-id matches left out of passes of 4 or more forwards, against 64.0 with them (64.6 without any
# guesses), and at 4 concurrent 49.1 against 46.3 with them left out of passes of 2 or more.
MIN_SHARED_MATCH = 2


def guess_shares(forwards: list[Forward], rows: int) -> list[int]:
    """How many of its guessed ids (lookup) each of one model's forwards feeds this step, so that
    the pass feeds at most `rows` ids: every id that is not a guess first, then what room is left,
    to the guesses from the longest matches first (lookup.Guess: likelier right), one id at a time
    round the forwards with equally long ones, and in a pass of several forwards none from matches
    shorter than MIN_SHARED_MATCH. A guess changes no output, so any share is safe."""
    shares = [0] * len(forwards)
    room = rows - sum(len(forward.ids) - forward.guesses for forward in forwards)
    least = MIN_SHARED_MATCH if len(forwards) > 1 else 0
    for matched in sorted({forward.matched for forward in forwards if forward.guesses and forward.matched >= least}, reverse=True):
        tier = [i for i, forward in enumerate(forwards) if forward.guesses and forward.matched == matched]
        while room > 0 and tier:
            for i in tier[:room]:
                shares[i] += 1
            room -= len(tier[:room])
            tier = [i for i in tier if shares[i] < forwards[i].guesses]
    return shares


def piece_rows(forward: Forward, n: int) -> int:
    """Of the rows `forward` keeps, how many its first `n` ids give (prefill_pieces)."""
    return max(0, forward.keep - (len(forward.ids) - n))


def prefill_pieces(forwards: list[Forward], chunk: int, marks: list[tuple[int, ...]] | None = None) -> list[int | None]:
    """How many of each forward's ids run this step (chunked prefill); None where it waits a step.

    `forwards` come in admission order, with their prompts' `marks`. A forward is cut where
    `piece_end` says (the same cuts under any load, so a reply does not depend on what else runs),
    its last piece keeping the rows it asks for; a lazy forward may also be cut at a mark among
    those rows (the base model's prompt end, in a scoring pass that feeds it with the first draft
    ids and needs its last position's row), the piece before keeping its share of them
    (`piece_rows`), so that the whole prompt is a stored piece for the next turn (which costs such a
    pass one more step). Decode steps (one id, and any guesses after it) always run whole. The
    other forwards share a budget of `chunk` ids per step: first those that give rows this step (a
    short prompt, a scoring pass or its prompt's last piece, a prompt's last piece), then those
    that go on (a long prompt's next piece), each kind in admission order, and the first of each
    kind always runs. So a short prompt or a scoring pass never waits behind a long prompt's
    prefill, and that prefill still gets a piece every step: a step feeds at most about two chunks.
    """
    sizes: list[int | None] = [None] * len(forwards)
    finishing, going_on = [], []
    for i, (forward, its_marks) in enumerate(zip(forwards, marks or [()] * len(forwards))):
        n, start = len(forward.ids), len(forward.kv)
        if n == 1 + forward.guesses:
            sizes[i] = n
            continue
        end = piece_end(start, its_marks, chunk)
        rest = start + n - end
        if rest >= max(forward.keep, 1):
            going_on.append((i, end - start))
        elif forward.lazy and rest >= 1 and end in its_marks:  # cut among its rows: it gives some this step
            finishing.append((i, end - start))
        else:
            finishing.append((i, n))
    budget = chunk
    for kind in (finishing, going_on):
        for j, (i, piece) in enumerate(kind):
            if j == 0 or piece <= budget:
                sizes[i], budget = piece, budget - piece
    return sizes
