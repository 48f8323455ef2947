"""The step loop's body: turn requests into sequences, run their forward passes, deliver the results.

Single-threaded: only the runtime's worker thread calls into an Engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .baselines import run_base_only, run_draft_only
from .encoding import least_tokens
from .errors import EXITS, ModelLoadError, PromptTooLongError, RequestFailedError, RequestTimeoutError, WSDError, described, detached
from .events import Event, FinalEvent, Timings, Usage, WSDResult
from .loading import LoadedModel
from .messages import Message
from .model_runner import ModelRunner, Output
from .online import run_online
from .params import GenerationParams
from .prefix_cache import PrefixCache
from .prompts import build_prompts
from .reply import ReplyText, expand_role_stops, repeated_end
from .scheduler import MAX_CACHED_TOKENS, MAX_RUNNING, PASS_OVERHEAD, POSITION_COST, PREFILL_CHUNK, Scheduler, guess_shares, piece_rows, plan_passes, prefill_pieces
from .sequence import CallerLeft, Forward, Phase, Project, Sequence
from .staged import run_staged
from .structured import Cut, constraint_spec, structured_fields
from .tools import CALL_TAG, CLOSE_TAG

log = logging.getLogger(__name__)

# Under load, scoring passes start only every SCORING_STRIDE steps, so that the sequences due
# for one score in the same batched pass; meanwhile they draft on (a delay of a few tokens,
# which changes no output: each pass scores what was stable when it fell due, online.run_online,
# so the switch rule sees the same probabilities to the bit).
SCORING_STRIDE = 4
# Bytes of prompt text a window position, from which a prompt's text is first checked against the
# window without encoding it (Engine._refuse_far_too_long): text runs about 4 bytes a token.
FAR_TOO_LONG = 8

# Ids a decode pass guesses (lookup.NgramIndex; 0: none), of a continuation and of a draft. On a
# 2-core CPU a base pass and its greedy projection cost about the same for 1 to 5 rows (50 against
# 51 ms on the embedded base over a 300-position cache, the guessed rows attending one query at a
# time), 59 ms for 7, and a draft pass with 4 guesses 39.3 against 38.5 ms; so 4. On an H200 a
# graphed pass costs 3.6-4.5 ms for 1 to 16 rows and 1 to 32 ids (results/passes_cuda.md: bound
# by its ~1500 kernels, not by rows or ids), and online WSD with 4 served 1.08x (1 stream) and
# 1.16x (16) the tokens/s without, once its graphs were captured (benchmarks/results/lookup_cuda.md;
# the base model alone: 1.44x and 0.91x); so 4 there too.
LOOKUP_TOKENS = 4

# Ids one pass of a model feeds at most once guesses join it (scheduler.guess_shares). Up to 16
# rows a pass's linear layers on the 2-core CPU cost little more than for 8 (benchmarks/bench_gemm.py),
# and past that each row costs its share of the arithmetic: 8 concurrent base-model streams
# guessing 4 ids each (40 rows a pass) served 108.9 tok/s against 110.8 without guesses.
GUESS_ROWS = 16

# The prefix cache's default size (prefix_cache_tokens=None): as many positions per model as both
# models' keys and values hold in this many bytes. For the embedded pair in float32 (45 KiB a position
# for the draft, 36 KiB for the base) that is 12945 positions, a long conversation or a few long
# documents (with the previous default, 4096, benchmarks/bench_long_chat.py's 30th turn fed 7464
# positions again and its first text took 21.7 s, against 526 and 2.2 s); for a 7B base of
# 32 layers with 32 key/value heads of 128 in float32 (1 MiB a position), about 1000.
PREFIX_CACHE_BYTES = 1 << 30

PROGRAMS = {"online": run_online, "staged": run_staged, "base": run_base_only, "draft": run_draft_only}
MODELS = {"online": ("draft", "base"), "staged": ("draft", "base"), "base": ("base",), "draft": ("draft",)}  # the models each mode runs


def given_up(params: GenerationParams, since: float, now: float, left: CallerLeft) -> str:
    """How stats() counts a request its caller gave up on: "failed" past its timeout (a timeout is a
    failure, whoever notices it) or when the caller left on being told the runtime stopped (it
    ended the request), else "cancelled"; by when the caller left, if it has, so that a request
    cancelled in time counts as cancelled however late the worker ends it."""
    return "failed" if left.told_closed or params.timed_out(since, left.at if left.at is not None else now) else "cancelled"


@dataclass(frozen=True)
class RuntimeStats:
    """A snapshot of the runtime: requests by state, tokens fed per phase, batch sizes, cache use."""

    queued: int
    """Requests sent and not yet running: waiting for admission, or (runtime.stats()) not yet taken
    in by the worker, which takes new requests between steps and after loading the models."""
    running: int
    finished: int
    failed: int
    cancelled: int
    tokens: dict[str, int]
    """Tokens fed through each phase so far: "draft" (draft decoding), "score" (base scoring), "base"
    (base decoding); guessed ids included."""
    batch_sizes: dict[str, int]
    """Sequences in the last step's largest batched pass of each model; 0 while nothing runs."""
    cached_tokens: int
    """Positions held in the KV caches of running requests."""
    reserved_tokens: int
    """Cache positions reserved by admission for the running requests."""
    peaks: dict[str, int]
    """Highest values seen so far: "queued", "running", "draft_batch", "base_batch"."""
    passes: dict[str, int]
    """Forward passes run so far by each model ("draft", "base")."""
    pass_seconds: dict[str, float]
    """Seconds spent in forward passes per phase ("draft", "score", "base"); a batched pass that
    serves several phases is split by the tokens each fed. Scoring's output projection, run
    after its pass for the rows that need it (output_head), counts to "score"."""
    prefix_cache: dict[str, int]
    """Prompt prefixes kept across requests (prefix_cache.PrefixCache), both models together:
    "hits" (times a forward took stored pieces instead of feeding them), "reused_tokens" (positions not fed again),
    "cached_tokens" (positions held)."""
    prompt_lookup: dict[str, int]
    """Ids guessed by drafts and continuations (prompt lookup, `lookup_tokens`): "fed" (checked by a
    pass) and "accepted" (the model chose them, each a pass saved)."""
    retried_passes: int
    """Batched passes (and output projections) that raised and ran again one sequence at a time, so
    that only a sequence that fails alone fails; a logged warning names the error when all passed alone."""

    @classmethod
    def empty(cls) -> RuntimeStats:
        """The snapshot of a runtime that has not started."""
        return cls(
            queued=0,
            running=0,
            finished=0,
            failed=0,
            cancelled=0,
            tokens={"draft": 0, "score": 0, "base": 0},
            batch_sizes={"draft": 0, "base": 0},
            cached_tokens=0,
            reserved_tokens=0,
            peaks={"queued": 0, "running": 0, "draft_batch": 0, "base_batch": 0},
            passes={"draft": 0, "base": 0},
            pass_seconds={"draft": 0.0, "score": 0.0, "base": 0.0},
            prefix_cache={"hits": 0, "reused_tokens": 0, "cached_tokens": 0},
            prompt_lookup={"fed": 0, "accepted": 0},
            retried_passes=0,
        )


def _runner(loaded: LoadedModel, role: str, bound: bool) -> ModelRunner:
    """A ModelRunner for the `role` model, whose failure to set up says which model it was."""
    try:
        return ModelRunner(loaded, bound)
    except WSDError as exc:
        raise ModelLoadError(f"the {role} model {loaded.name!r}: {exc}") from exc
    except Exception as exc:  # a forward pass the runner's load-time checks cannot make (an unusual layer, out of memory)
        raise ModelLoadError(f"the {role} model {loaded.name!r} ({type(loaded.model).__name__}) could not be set up: {described(exc)}") from exc


class Engine:
    """Owns the two models' runners and the scheduler; `step()` advances every running sequence once.

    Within a step, the passes each model owes are grouped (scheduler.plan_passes) and each group
    runs as one batched forward: on CPU one ragged pass takes them all; on a GPU padded passes
    take decode steps together, and prefills and scoring passes of similar length together. A
    long prompt is fed a piece per step (scheduler.prefill_pieces), so the streams that are
    decoding go on meanwhile. Rows that lazy passes leave unprojected (decode steps, the rows
    scoring needs) are projected after the passes, every program's in one call per model.
    """

    def __init__(
        self,
        draft: LoadedModel,
        base: LoadedModel,
        max_running: int = MAX_RUNNING,
        max_cached_tokens: int = MAX_CACHED_TOKENS,
        prefill_chunk: int | None = None,
        prefix_cache_tokens: int | None = None,
        lookup_tokens: int | None = None,
    ) -> None:
        self.draft, self.base = draft, base
        self.runners = {"draft": _runner(draft, "draft", bound=False), "base": _runner(base, "base", bound=True)}  # only the base scores
        self.pass_overhead = PASS_OVERHEAD.get(base.device.type, PASS_OVERHEAD["cuda"])
        self.position_cost = POSITION_COST.get(base.device.type, POSITION_COST["cuda"])
        self.prefill_chunk = prefill_chunk or PREFILL_CHUNK.get(base.device.type, PREFILL_CHUNK["cuda"])
        self.lookup_tokens = LOOKUP_TOKENS if lookup_tokens is None else lookup_tokens
        self.scheduler = Scheduler(max_running, max_cached_tokens)
        if prefix_cache_tokens is None:
            prefix_cache_tokens = PREFIX_CACHE_BYTES // sum(runner.position_bytes for runner in self.runners.values())
        self.prefixes = {model: PrefixCache(prefix_cache_tokens) for model in self.runners}
        self.counts = {"finished": 0, "failed": 0, "cancelled": 0}
        zero = RuntimeStats.empty()  # the counters start from the empty snapshot, so their keys are named once
        self.tokens, self.batch_sizes, self.peaks = dict(zero.tokens), dict(zero.batch_sizes), dict(zero.peaks)
        self.passes, self.pass_seconds = dict(zero.passes), dict(zero.pass_seconds)
        self.guesses = dict(zero.prompt_lookup)  # of the requests that ended (running ones add theirs in stats())
        self.retried_passes = 0
        self.steps = 0

    def model(self, name: str) -> LoadedModel:
        """The "draft" or "base" model."""
        return self.runners[name].loaded

    def prepare(
        self,
        messages: list[Message],
        params: GenerationParams,
        deliver: Callable[[Event | BaseException], None],
    ) -> Sequence:
        """Build both prompts and check they fit; raises before any decoding starts."""
        self._refuse_too_many_messages(messages, params)
        tools = params.tools if params.calls_tools else ()
        prompts = build_prompts(
            self.draft.tokenizer, self.base.tokenizer, messages, params.base_template, tools, params.continue_final_message,
            check=lambda texts: self._refuse_far_too_long(texts, params),
        )
        self._refuse_unembeddable({"draft": prompts.draft_ids, "base": prompts.base_ids}, params)
        asked_params, params = params, self._fit_windows(params, len(prompts.draft_ids), len(prompts.base_ids))
        calls = (CALL_TAG, CLOSE_TAG) if params.calls_tools else None  # no stop counts inside a call's markup
        if params.mode == "draft":  # the draft model alone: its own tokenizer, its own end of turn
            reply = ReplyText(self.draft.tokenizer, tuple(params.stop), calls, _uncallable(messages, params), len(prompts.forced_prefix))
        else:
            role_stops = expand_role_stops(prompts.role_stops) if params.free_text else ()  # a grammar ends JSON
            if params.text_format:  # a marker inside a line is the format's text (a JSON string, say); one on a new line starts a turn
                role_stops = tuple(stop for stop in role_stops if stop.startswith("\n"))
            role_stops += _uncallable(messages, params)
            reply = ReplyText(self.base.tokenizer, tuple(params.stop), calls, role_stops, len(prompts.forced_prefix))
        asked = {name: getattr(asked_params, name) for name in ("max_tokens", "max_draft_tokens")}
        return Sequence(params=params, prompts=prompts, reply=reply, deliver=deliver, constraint=constraint_spec(params), asked=asked)

    def _refuse_too_many_messages(self, messages: list[Message], params: GenerationParams) -> None:
        """Fail a conversation of more messages than the base window has positions before its
        prompts are rendered (100,000 took 4 s on the worker): the plain base prompt gives each
        message before the reply a header of a token at least."""
        if "base" in MODELS[params.mode] and params.base_template == "plain" and len(messages) - 1 >= self.base.context_window:
            raise PromptTooLongError(
                f"the prompt is at least {len(messages) - 1} base tokens (base context window {self.base.context_window}): "
                f"it has {len(messages)} messages; shorten the conversation"
            )

    def _refuse_far_too_long(self, texts: dict[str, str], params: GenerationParams) -> None:
        """Fail a prompt whose text alone cannot fit a window of the mode's models before it is
        encoded: the worker encodes prompts, and megabytes of text held every stream up (1.8 MB:
        2 s), in a message, a tool's description or a call's arguments. Its bytes set a floor under
        its tokens (encoding.least_tokens), read only for text of FAR_TOO_LONG bytes or more a
        window position, so that no ordinary prompt pays for it."""
        over, sizes = [], []
        for model in MODELS[params.mode]:
            loaded = self.model(model)
            window, size = loaded.context_window, len(texts[model].encode())
            if size >= FAR_TOO_LONG * window and (least := least_tokens(loaded.tokenizer, size)) >= window:
                over.append(f"at least {least} {model} tokens ({model} context window {window})")
                sizes.append(f"{size} bytes as the {model}'s")
        if over:
            raise PromptTooLongError(
                f"the prompt is {' and '.join(over)}: its text is {' and '.join(sizes)}; shorten the messages (and tool schemas or calls' arguments)"
            )

    def _refuse_unembeddable(self, ids: dict[str, list[int]], params: GenerationParams) -> None:
        """Fail a prompt with a token its model has no embedding for (a tokenizer that is not the
        model's, or tokens added without resizing the embeddings), before a pass fails on it with
        an IndexError naming nothing."""
        for model in MODELS[params.mode]:
            rows, loaded = self.runners[model].rows, self.runners[model].loaded
            if ids[model] and (top := max(ids[model])) >= rows:
                raise ModelLoadError(
                    f"the {model} model {loaded.name!r} has embeddings for token ids below {rows}, but its tokenizer gave "
                    f"{top} ({loaded.tokenizer.convert_ids_to_tokens(top)!r}) for this prompt, of {len(loaded.tokenizer)} tokens: "
                    "the tokenizer is not this model's, or tokens were added to it without model.resize_token_embeddings(len(tokenizer))"
                )

    def _fit_windows(self, params: GenerationParams, n_draft: int, n_base: int) -> GenerationParams:
        """Check that the prompt fits the context window of each model the mode runs, and cap the
        budgets so that no cache outgrows one: a draft that reaches the draft model's window is
        handed on as at max_draft_tokens, and a reply that reaches its model's window ends ("length")."""
        uses = MODELS[params.mode]
        sizes = {"draft": (n_draft, self.draft.context_window), "base": (n_base, self.base.context_window)}
        if any(sizes[model][0] >= sizes[model][1] for model in uses):
            told = " and ".join(f"{sizes[m][0]} {m} tokens ({m} context window {sizes[m][1]})" for m in uses)
            raise PromptTooLongError(f"the prompt is {told}; shorten the messages")
        room = {model: window - n for model, (n, window) in sizes.items()}
        caps = {"max_tokens": min(params.max_tokens, room[uses[-1]])}  # the reply is in the last model's tokens
        if uses == ("draft", "base"):
            caps["max_draft_tokens"] = min(params.max_draft_tokens, room["draft"])
        return params.model_copy(update=caps)

    def start(self, seq: Sequence) -> None:
        """Start the request's program, up to its first pass (grammars compile and forced starts are checked here)."""
        seq.lookup_tokens = self.lookup_tokens
        seq.program = PROGRAMS[seq.params.mode](seq, self.draft, self.base)
        seq.pending = next(seq.program)

    def add(self, seq: Sequence) -> None:
        """Start the request's program and queue it; if either raises, nothing was queued."""
        self.start(seq)
        self.scheduler.add(seq)

    @property
    def prefix_cache_tokens(self) -> int:
        """Prompt positions each model's prefix store holds at most (the default's, or as configured)."""
        return self.prefixes["base"].max_tokens

    def configure(self, name: str, value: int) -> None:
        """Set one limit (runtime.configure, between steps)."""
        if name == "prefix_cache_tokens":
            for prefixes in self.prefixes.values():
                prefixes.resize(value)
        elif name == "prefill_chunk":
            if value != self.prefill_chunk:
                for prefixes in self.prefixes.values():
                    prefixes.clear()  # their pieces were cut at other points
            self.prefill_chunk = value
        elif name == "lookup_tokens":
            self.lookup_tokens = value  # for requests that start from now on
        else:
            setattr(self.scheduler, name, value)
            if name == "max_cached_tokens":  # a queued request it can no longer admit fails, as a new one would
                now = time.perf_counter()
                for seq, error in self.scheduler.never_fitting():
                    if not self._end_if_over(seq, now):  # one whose caller left, or whose timeout passed, ends as that
                        self._fail(seq, error)

    def forget_requests(self) -> None:
        """Drop every request and kept prefix without a word: a forked child's copies of the parent's
        (their callers are in the parent, and a fork mid-step may have left either half updated)."""
        self.scheduler = Scheduler(self.scheduler.max_running, self.scheduler.max_cached_tokens)
        for prefixes in self.prefixes.values():
            prefixes.clear()

    def has_work(self) -> bool:
        return len(self.scheduler) > 0

    def count(self, outcome: str) -> None:
        """Count a request that ended ("finished", "cancelled" or "failed")."""
        with self.scheduler.lock:
            self.counts[outcome] += 1

    def stats(self) -> RuntimeStats:
        """A consistent snapshot, safe to take from any thread while a step runs."""
        with self.scheduler.lock:
            return self._stats()

    def _stats(self) -> RuntimeStats:
        running = list(self.scheduler.running)
        return RuntimeStats(
            queued=len(self.scheduler.waiting),
            running=len(running),
            finished=self.counts["finished"],
            failed=self.counts["failed"],
            cancelled=self.counts["cancelled"],
            tokens=dict(self.tokens),
            batch_sizes={model: size if running else 0 for model, size in self.batch_sizes.items()},
            cached_tokens=sum(seq.cached_tokens() for seq in running),
            reserved_tokens=self.scheduler.reserved,
            peaks=dict(self.peaks),
            passes=dict(self.passes),
            pass_seconds=dict(self.pass_seconds),
            prefix_cache={
                "hits": sum(p.hits for p in self.prefixes.values()),
                "reused_tokens": sum(p.reused_tokens for p in self.prefixes.values()),
                "cached_tokens": sum(p.tokens() for p in self.prefixes.values()),
            },
            prompt_lookup={key: ended + sum(seq.guesses[key] for seq in running) for key, ended in self.guesses.items()},
            retried_passes=self.retried_passes,
        )

    def step(self) -> None:
        """Admit, drop cancelled or timed-out requests, then run one pass for every running sequence."""
        now = time.perf_counter()
        for seq in list(self.scheduler.waiting):
            self._end_if_over(seq, now)
        batches: dict[str, list[Sequence]] = {"draft": [], "base": []}
        running = self.scheduler.schedule()
        self.steps += 1
        scoring_open = len(running) == 1 or self.steps % SCORING_STRIDE == 0
        for seq in running:
            seq.scoring_open = scoring_open
            if not self._end_if_over(seq, now):
                assert isinstance(seq.pending, Forward)  # projections were all answered last step
                batches[seq.pending.model].append(seq)
        for model, seqs in batches.items():
            runs = self._share_guesses(self._pieces(seqs))
            ragged = self.runners[model].ragged
            plan = plan_passes([f for _, f in runs], self.pass_overhead, self.position_cost, ragged)
            groups = [[runs[i] for i in group] for group in plan]
            self._note_batch(model, max(map(len, groups), default=0))
            for group in groups:
                self._run_batch(model, group)
        self._project()
        self.peaks["running"] = max(self.peaks["running"], len(self.scheduler.running))
        self.peaks["queued"] = max(self.peaks["queued"], len(self.scheduler.waiting))

    @staticmethod
    def _share_guesses(runs: list[tuple[Sequence, Forward]]) -> list[tuple[Sequence, Forward]]:
        """Feed fewer guessed ids where a pass would carry more than GUESS_ROWS ids, counting the
        pieces that run this step; the programs read as many rows as come back."""
        shares = guess_shares([forward for _, forward in runs], GUESS_ROWS)
        trimmed = []
        for (seq, forward), share in zip(runs, shares):
            if share < forward.guesses:  # a forward with guesses is a decode step, never cut: it is seq.pending
                seq.pending = forward = replace(forward, ids=forward.ids[: 1 + share], keep=1 + share, guesses=share)
            trimmed.append((seq, forward))
        return trimmed

    def _end_if_over(self, seq: Sequence, now: float) -> bool:
        """Fail a request past its timeout, or drop a cancelled one (queued or running); whether it
        ended. The timeout comes first: a caller that gave up at it, in a long step, also cancelled."""
        if seq.params.timed_out(seq.created, now):
            self._fail(seq, RequestTimeoutError(f"the request exceeded timeout={seq.params.timeout}s{self.timed_out_where(seq)}"))
        elif seq.cancelled.is_set():
            self._drop(seq, given_up(seq.params, seq.created, now, seq.cancelled))
        else:
            return False
        return True

    def timed_out_where(self, seq: Sequence) -> str:
        """Where a request that timed out was: still queued for admission (the limits, and what may
        be raised), or generating (how far it got)."""
        sched = self.scheduler
        if seq.queued:
            return (
                f" waiting for admission ({len(sched.running)} running of max_running={sched.max_running}, "
                f"max_cached_tokens={sched.max_cached_tokens}); raise those limits or the timeout"
            )
        return f" while generating ({len(seq.reply.ids)} reply tokens so far)"

    def _note_batch(self, model: str, size: int) -> None:
        self.batch_sizes[model] = size
        self.peaks[f"{model}_batch"] = max(self.peaks[f"{model}_batch"], size)

    def _pieces(self, seqs: list[Sequence]) -> list[tuple[Sequence, Forward]]:
        """What each sequence feeds this step: its pending forward, or the next piece of a long one;
        a sequence whose piece does not fit this step's prefill budget sits the step out. A prompt
        starts from the pieces an earlier request stored, where its ids begin the same."""
        pairs = [(seq, seq.pending) for seq in seqs if self._restore(seq) and isinstance(seq.pending, Forward)]  # all forwards: they were batched by them
        sizes = prefill_pieces([forward for _, forward in pairs], self.prefill_chunk, [self._marks(seq, forward.model) for seq, forward in pairs])
        return [
            (seq, forward if n == len(forward.ids) else replace(forward, ids=forward.ids[:n], keep=piece_rows(forward, n), lazy=True))
            for (seq, forward), n in zip(pairs, sizes)
            if n is not None
        ]

    def _marks(self, seq: Sequence, model: str) -> tuple[int, ...]:
        """Where `model`'s prompt may be cut besides the multiples of prefill_chunk: where its messages start and where it ends, on
        a runner whose passes give a row the same bits in any batch (ragged, on CPU); a padded
        pass (a GPU) pays a launch cost a piece, and its pieces are not reused bit for bit."""
        return seq.prompts.marks[model] if self.runners[model].ragged else ()

    def _restore(self, seq: Sequence) -> bool:
        """Take the stored pieces that continue a forward fed in more than one piece (prefix_cache);
        False if that failed the request."""
        forward = seq.pending
        if not isinstance(forward, Forward) or len(forward.ids) == 1:
            return True
        try:
            held = self.prefixes[forward.model].restore(
                forward.kv, forward.ids, forward.keep, self.prefill_chunk, self.runners[forward.model].num_layers, self._marks(seq, forward.model)
            )
        except BaseException as exc:
            if isinstance(exc, EXITS):
                raise
            self._fail(seq, exc)
            return False
        seq.note_restored(forward.model, forward.kv, held)
        if held:
            seq.pending = replace(forward, ids=forward.ids[held:])
        return True

    def _run_batch(self, model: str, group: list[tuple[Sequence, Forward]]) -> None:
        if len(group) == 1:
            self._run_one(*group[0])
            return
        forwards = [forward for _, forward in group]
        t0 = time.perf_counter()
        try:
            outputs = self.runners[model].extend_batch(
                [f.kv for f in forwards], [f.ids for f in forwards], [f.keep for f in forwards], [f.lazy for f in forwards], [f.guesses > 0 for f in forwards]
            )
        except BaseException as exc:  # isolate the failure: run each sequence alone, so only the one that fails is failed
            if isinstance(exc, EXITS):
                raise
            self._retried(f"{model} pass", exc, [self._run_one(seq, forward) for seq, forward in group])
            return
        elapsed = time.perf_counter() - t0
        self._note_pass(model, forwards, elapsed)
        for (seq, forward), output in zip(group, outputs):
            self._advance(seq, forward, output, elapsed)

    def _run_one(self, seq: Sequence, forward: Forward) -> bool:
        """Run one sequence's pass; whether it ran (if it raised, the sequence failed)."""
        t0 = time.perf_counter()
        try:
            output = self.runners[forward.model].extend(forward.kv, forward.ids, forward.keep, forward.lazy, forward.guesses > 0)
        except BaseException as exc:
            if isinstance(exc, EXITS):
                raise
            self._fail(seq, exc)
            return False
        elapsed = time.perf_counter() - t0
        self._note_pass(forward.model, [forward], elapsed)
        self._advance(seq, forward, output, elapsed)
        return True

    def _retried(self, what: str, exc: BaseException, ran_alone: list[bool]) -> None:
        """Count a batched pass that raised and ran again a sequence at a time. If every sequence then
        ran alone, batching itself failed (no request did): log a warning, since the step lost its
        batching (logged, not warnings.warn: on the worker thread, a filter turning warnings into
        errors would end the worker)."""
        self.retried_passes += 1
        if all(ran_alone):
            log.warning("a batched %s of %d sequences raised %s: %s; each ran alone without error", what, len(ran_alone), type(exc).__name__, exc)

    def _project(self) -> None:
        """Hand every program waiting on logits (sequence.Project) its rows' logits: one call of each
        model's output projection for all of them, again while programs ask for more."""
        while waiting := [seq for seq in self.scheduler.running if isinstance(seq.pending, Project)]:
            by_head: dict[int, list[Sequence]] = {}
            for seq in waiting:
                by_head.setdefault(id(seq.pending.rows.head), []).append(seq)  # type: ignore[union-attr]
            for seqs in by_head.values():
                self._project_group(seqs)

    def _project_group(self, seqs: list[Sequence]) -> bool:
        """Project the rows these sequences wait on, in one call; whether it ran (if not, the failing ones failed)."""
        requests: list[Project] = [seq.pending for seq in seqs]  # type: ignore[misc]
        t0 = time.perf_counter()
        try:
            answers = self._answers(requests)
        except BaseException as exc:
            if isinstance(exc, EXITS):
                raise
            if len(seqs) == 1:
                self._fail(seqs[0], exc)
                return False
            ran = [self._project_group([seq]) for seq in seqs]  # isolate the failure, as for a batched pass
            self._retried("output projection", exc, ran)
            return all(ran)
        elapsed, total = time.perf_counter() - t0, sum(len(r.rows) for r in requests)
        for seq, request, answer in zip(seqs, requests, answers):
            share = elapsed * len(request.rows) / total
            seq.seconds[request.phase] += share
            self.pass_seconds[request.phase] += share
            self._send(seq, answer)
        return True

    @staticmethod
    def _answers(requests: list[Project]) -> list[torch.Tensor | list[int]]:
        """Each request's logits, or its rows' greedy ids: the full projection runs once for all
        rows where any request needs logits; otherwise the head finds the ids its own way."""
        head = requests[0].rows.head
        hidden = torch.cat([r.rows.hidden for r in requests])
        owner = [r for r in requests for _ in range(len(r.rows))]  # each row's request
        logits = None if all(r.greedy for r in requests) else head.logits(hidden)
        greedy = [k for k, r in enumerate(owner) if r.greedy]
        found = head.greedy_ids(hidden[greedy], [owner[k].mask for k in greedy], None if logits is None else logits[greedy]) if greedy else []
        ids, answers, start = iter(found), [], 0
        for r in requests:
            n = len(r.rows)
            answers.append([next(ids) for _ in range(n)] if r.greedy else logits[start : start + n])  # type: ignore[index]
            start += n
        return answers

    def _note_pass(self, model: str, forwards: list[Forward], seconds: float) -> None:
        self.passes[model] += 1
        tokens = sum(len(f.ids) for f in forwards)
        for f in forwards:
            self.pass_seconds[f.phase] += seconds * len(f.ids) / tokens

    def _advance(self, seq: Sequence, forward: Forward, output: Output, seconds: float) -> None:
        """Count a pass to `seq`; hand its output to the program, or, after a piece, keep the rest pending."""
        seq.seconds[forward.phase] += seconds
        self.tokens[forward.phase] += len(forward.ids)
        pending = seq.pending
        try:  # out of memory copying a piece or joining its rows, say: this request fails, the others go on
            if len(forward.ids) > 1 + forward.guesses:  # a whole piece is kept for requests that start the same
                self.prefixes[forward.model].store(forward.kv, len(forward.kv) - len(forward.ids), self.prefill_chunk, self._marks(seq, forward.model))
            if forward is pending and seq.piece_rows is not None:  # rows its earlier pieces gave (a piece cut among the rows kept)
                output, seq.piece_rows = seq.piece_rows.then(output), None  # type: ignore[arg-type]  # pieces are lazy
            elif forward is not pending and pending is not None and forward.keep:
                seq.piece_rows = output if seq.piece_rows is None else seq.piece_rows.then(output)  # type: ignore[arg-type, assignment]
        except BaseException as exc:
            if isinstance(exc, EXITS):
                raise
            self._fail(seq, exc)
            return
        if forward is pending:
            self._send(seq, output)
        elif isinstance(pending, Forward):
            seq.pending = replace(pending, ids=pending.ids[len(forward.ids) :], keep=pending.keep - forward.keep)

    def _send(self, seq: Sequence, output: Output | list[int]) -> None:
        """Hand the program its output; it asks for the next pass, or ends and the request finishes.
        An exception in either (the program's, or in building the result) fails this request alone."""
        assert seq.program is not None
        try:
            try:
                seq.pending = seq.program.send(output)
            except StopIteration as stop:
                self._finish(seq, stop.value)
        except BaseException as exc:
            if isinstance(exc, EXITS):
                raise
            self._fail(seq, exc)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        """Fail one request with a clear error; the others go on. A WSDError (the request's own
        fault found as it ran, say) reaches the caller as itself; anything else as the cause of a
        RequestFailedError."""
        if not self._drop(seq, "failed"):
            return
        if isinstance(exc, WSDError):
            error = detached(exc)
        else:
            error = RequestFailedError(f"request {seq.request_id} failed: {described(exc)}")
            error.__cause__ = detached(exc)
        seq.deliver(error)

    def _drop(self, seq: Sequence, outcome: str) -> bool:
        """Count a request's end as `outcome`, take it off the queues and free its caches; False, and
        nothing done, if it had ended already. It sends the caller nothing but a failing cleanup: _fail
        and _finish send their answer after it, and a caller that has left (its stream closed, its
        timeout passed) waits for none."""
        with self.scheduler.lock:  # a snapshot sees the request in a queue or counted, never neither
            if not self.scheduler.remove(seq):
                return False
            self.count(outcome)
            for key, value in seq.guesses.items():
                self.guesses[key] += value
        seq.phase = Phase.FINISHED
        try:
            seq.free()
        except BaseException as exc:  # the program's cleanup failed: its caller hears of it, the others go on
            if isinstance(exc, EXITS):
                raise
            seq.deliver(RequestFailedError(f"request {seq.request_id} failed as it ended: {described(exc)}"))
        return True

    def _cut(self, seq: Sequence, finish_reason: str, stop_reason: str | None) -> Cut | None:
        """What cut a reply short, if anything did: a stop string of the caller's, or its budget
        (the model's context window where it capped max_tokens, _fit_windows, else max_tokens)."""
        if stop_reason is not None:
            return Cut(f"the stop string {stop_reason!r} ended the reply", f"leave {stop_reason!r} out of stop", by_budget=False)
        if finish_reason != "length":
            return None
        model = MODELS[seq.params.mode][-1]  # the reply is in the last model's tokens
        window = self.model(model).context_window
        prompt = len(seq.prompts.draft_ids if model == "draft" else seq.prompts.base_ids)
        loop = repeated_end(seq.reply.text)  # more room would only repeat it longer
        penalty = "a repetition_penalty (1.1-1.3)" if seq.params.repetition_penalty <= 1 else f"a repetition_penalty above {seq.params.repetition_penalty}"
        remedy = None if loop is None else f"its end repeats {loop!r} over and over, which more tokens would not end: {penalty}, other wording or a larger model may"
        if prompt + len(seq.reply.ids) >= window:
            return Cut(f"the reply reached the {model} model's context window ({window} tokens with the prompt's {prompt})", remedy or "shorten the messages")
        return Cut(f"the reply used up max_tokens={seq.params.max_tokens}", remedy or "raise max_tokens")

    def _finish(self, seq: Sequence, finish_reason: str) -> None:
        seq.emit(seq.reply.finish(cut=finish_reason == "length"))
        now = time.perf_counter()
        reply = seq.reply
        stop_reason = reply.stop_found if reply.stop_found in seq.params.stop else None
        result = WSDResult(
            text=reply.text,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            switch_point=seq.switch_point,
            draft_text=reply.text[: reply.draft_chars],
            usage=Usage(
                draft_prompt_tokens=len(seq.prompts.draft_ids) if "draft" in MODELS[seq.params.mode] else 0,  # read by a model that ran
                base_prompt_tokens=len(seq.prompts.base_ids) if "base" in MODELS[seq.params.mode] else 0,
                draft_tokens=seq.draft_tokens,
                kept_draft_tokens=seq.kept_draft,
                base_tokens=seq.base_tokens,
                reply_tokens=len(reply.ids),
                draft_cached_prompt_tokens=seq.cached_prompt["draft"],
                base_cached_prompt_tokens=seq.cached_prompt["base"],
            ),
            timings=Timings(
                ttft=None if seq.first_token_at is None else seq.first_token_at - seq.created,
                draft=seq.seconds["draft"],
                scoring=seq.seconds["score"],
                base=seq.seconds["base"],
                total=now - seq.created,
            ),
            draft_model=self.draft.name,
            base_model=self.base.name,
            mode=seq.params.mode,
            rollbacks=seq.rollbacks,
            stop_reason=stop_reason,
            **structured_fields(reply.text, seq.params, self._cut(seq, finish_reason, stop_reason)),
        )
        # A caller that gave up while this step finished the request (at its timeout, or closing its
        # stream) never reads the result: it is counted as what ended it for them.
        if self._drop(seq, given_up(seq.params, seq.created, now, seq.cancelled) if seq.cancelled.is_set() else "finished"):
            seq.deliver(FinalEvent(result))


def _uncallable(messages: list[Message], params: GenerationParams) -> tuple[str, ...]:
    """The call tag as a role marker (it ends the reply, the whitespace before it dropped) where the
    history holds calls but this request offers none (no tools, or tool_choice="none"): a model that
    copies the history's calls ("42\n<tool_call>...") had put call markup in a plain reply's content,
    where a provider offered no tools writes none. Free text only: a grammar's JSON may hold the tag."""
    if params.calls_tools or not params.free_text or params.text_format or not any(m.tool_calls for m in messages):
        return ()
    return expand_role_stops((CALL_TAG,))
