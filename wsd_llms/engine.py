"""The step loop's body: turn requests into sequences, run their forward passes, deliver the results.

Single-threaded: only the runtime's worker thread calls into an Engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .baselines import run_base_only, run_draft_only
from .errors import PromptTooLongError, RequestFailedError
from .events import Event, FinalEvent, Timings, Usage, WSDResult
from .loading import LoadedModel
from .messages import Message
from .model_runner import ModelRunner
from .online import run_online
from .params import GenerationParams
from .prompts import build_prompts
from .reply import ReplyText, expand_role_stops
from .scheduler import Scheduler
from .sequence import Phase, Sequence
from .staged import run_staged

PROGRAMS = {"online": run_online, "staged": run_staged, "base": run_base_only, "draft": run_draft_only}


class Engine:
    """Owns the two models' runners and the scheduler; `step()` advances every running sequence once."""

    def __init__(self, draft: LoadedModel, base: LoadedModel) -> None:
        self.draft, self.base = draft, base
        self.runners = {"draft": ModelRunner(draft), "base": ModelRunner(base)}
        self.scheduler = Scheduler()

    def prepare(
        self,
        messages: list[Message],
        params: GenerationParams,
        deliver: Callable[[Event | BaseException], None],
    ) -> Sequence:
        """Build both prompts and check they fit; raises before any decoding starts."""
        prompts = build_prompts(self.draft.tokenizer, self.base.tokenizer, messages, params.base_template)
        n_draft, n_base = len(prompts.draft_ids), len(prompts.base_ids)
        if n_draft >= self.draft.context_window or n_base >= self.base.context_window:
            raise PromptTooLongError(
                f"the prompt is {n_draft} draft tokens (draft context window {self.draft.context_window}) and "
                f"{n_base} base tokens (base context window {self.base.context_window}); shorten the messages"
            )
        if params.mode == "draft":  # the draft model alone: its own tokenizer, its own end of turn
            reply = ReplyText(self.draft.tokenizer, tuple(params.stop))
        else:
            reply = ReplyText(self.base.tokenizer, tuple(params.stop) + expand_role_stops(prompts.role_stops))
        return Sequence(params=params, prompts=prompts, reply=reply, deliver=deliver)

    def add(self, seq: Sequence) -> None:
        seq.program = PROGRAMS[seq.params.mode](seq, self.draft, self.base)
        seq.pending = next(seq.program)
        self.scheduler.add(seq)

    def has_work(self) -> bool:
        return len(self.scheduler) > 0

    def step(self) -> None:
        for seq in self.scheduler.schedule():
            if seq.cancelled.is_set():
                self._drop(seq)
                continue
            try:
                self._advance(seq)
            except Exception as exc:  # one request's failure must not stop the others
                self._drop(seq)
                error = RequestFailedError(f"request {seq.request_id} failed: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                seq.deliver(error)

    def _advance(self, seq: Sequence) -> None:
        forward = seq.pending
        assert forward is not None and seq.program is not None
        t0 = time.perf_counter()
        logits = self.runners[forward.model].extend(forward.kv, forward.ids, forward.keep)
        seq.seconds[forward.phase] += time.perf_counter() - t0
        try:
            seq.pending = seq.program.send(logits)
        except StopIteration as stop:
            self._finish(seq, stop.value)

    def _drop(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        seq.phase = Phase.FINISHED
        seq.free()

    def _finish(self, seq: Sequence, finish_reason: str) -> None:
        seq.emit(seq.reply.finish())
        now = time.perf_counter()
        reply = seq.reply
        result = WSDResult(
            text=reply.text,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            switch_point=seq.switch_point,
            draft_text=reply.text[: reply.draft_chars],
            usage=Usage(
                draft_prompt_tokens=len(seq.prompts.draft_ids),
                base_prompt_tokens=len(seq.prompts.base_ids),
                draft_tokens=seq.draft_tokens,
                kept_draft_tokens=seq.kept_draft,
                base_tokens=seq.base_tokens,
                reply_tokens=len(reply.ids),
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
        )
        self._drop(seq)
        seq.deliver(FinalEvent(result))
