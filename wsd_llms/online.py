"""The online engine (DESIGN 4): draft, score stable base tokens as they appear, switch, continue.

Equal to `staged` under greedy decoding, but the base model scores while the draft is being
written, drafting stops the moment a window passes, the base cache is cropped to the switch
point instead of prefilling again, and text streams as soon as it is final.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

import torch

from .continuation import continue_reply, keep_draft
from .drafting import DraftPasses
from .handoff import DraftTokens, Handoff, common_prefix, draft_text, final_handoff, forced_ids, switch_floor
from .loading import LoadedModel
from .output_head import HeadRows
from .sampling import make_generator, token_probs
from .sequence import Forward, Phase, Program, Project, Sequence, Steps
from .structured import checked_base_guide, draft_guide
from .switch import SwitchDetector

# When to run the next scoring pass: after `scored` tokens, wait for scored clamped to
# [MIN, MAX] more stable tokens. Each pass re-reads the base model's weights (on a CPU that
# costs most of a decode step), so passes grow apart while no switch comes; the first pass
# waits for the earliest point a window can pass (`switch_window` tokens, or a forced start's).
MIN_SCORE_INTERVAL = 8
MAX_SCORE_INTERVAL = 32


# Whether an unfinished draft's tail is held back from scoring (handoff.WORD_CHARS); tests turn it
# off to make the engine roll back re-tokenized tokens.
HOLD_BACK = True


def next_score_at(scored: int) -> int:
    return scored + min(max(scored, MIN_SCORE_INTERVAL), MAX_SCORE_INTERVAL)


class _Scorer:
    """The base model's view of the draft: a cache over prompt + scored draft tokens, and their probabilities.

    Scoring passes are lazy (sequence.Forward.lazy): the output projection runs in full only for
    the rows the switch rule can need (output_head), and for the row at the switch point.
    """

    def __init__(self, seq: Sequence, detector: SwitchDetector) -> None:
        self.seq = seq
        self.kv = seq.base_kv = seq.new_cache("base")
        self.detector = detector
        self.prompt_len = 0
        self.last: HeadRows | None = None  # the row at the end of the cache (it predicts the next token)
        self.rows: HeadRows | None = None  # the latest pass, one row per fed position
        self.rows_start = 0

    def scored(self) -> int:
        return max(0, len(self.kv) - self.prompt_len)

    def score(self, handoff: Handoff) -> Steps[list[float]]:
        """Bring the cache to prompt + draft ids and return the probabilities of the newly fed draft
        tokens (upper bounds where the exact value cannot decide a switch).

        If re-tokenization changed a token already in the cache, crop back to the common prefix (less one
        token, whose row is needed again) and forget the probabilities from there on.
        """
        target = handoff.prompt_ids + handoff.draft_ids
        self.prompt_len = len(handoff.prompt_ids)
        common = common_prefix(self.kv.ids, target)
        if common < len(self.kv):
            self.seq.rollbacks += 1
            self.kv.crop(max(common - 1, 0))
            self.detector.truncate(max(0, common - self.prompt_len))
            self.last = None
        start = len(self.kv)
        new = target[start:]
        if not new:
            return []
        # Rows only from the last prompt position on: the prompt's own rows are never needed.
        keep = min(len(new), len(target) - self.prompt_len + 1)
        rows: HeadRows = yield Forward("base", self.kv, new, keep=keep, phase="score", lazy=True)
        start = len(target) - keep  # position of rows[0]
        self.rows, self.rows_start = rows, start
        if self.last is None:  # rows[k] predicts target[start + k + 1]
            prev, offset = rows[:-1], start + 1
        else:  # the previous pass predicted target[start]
            prev, offset = self.last.then(rows[:-1]), start
        self.last = rows[-1:]
        first = max(offset, self.prompt_len + len(self.detector))
        if first >= len(target):
            return []
        prev, ids = prev[first - offset :], target[first:]
        bounds = prev.logprob_bounds(ids)
        if bounds is None:
            logits: torch.Tensor = yield Project(prev)
            return token_probs(logits, ids)
        need = self.detector.needs_exact(bounds)
        wanted = [j for j, n in enumerate(need) if n]
        exact: Iterator[float] = iter([])
        if wanted:
            logits = yield Project(prev[wanted])
            exact = iter(token_probs(logits, [ids[j] for j in wanted]))
        return [next(exact) if n else math.exp(b) for n, b in zip(need, bounds)]

    def cut(self, kept: int) -> Steps[HeadRows]:
        """Crop the cache after `kept` draft tokens; returns the row there (its logits predict the next token).

        It comes from the latest pass, or, when the cut lies before it (the base grammar
        rejected an earlier id), from feeding the last kept position again.
        """
        end = self.prompt_len + kept
        at = end - 1 - self.rows_start
        if self.rows is not None and 0 <= at < len(self.rows):
            self.kv.crop(end)
            return self.rows[at : at + 1]
        last = self.kv.ids[end - 1]
        self.kv.crop(end - 1)
        row: HeadRows = yield Forward("base", self.kv, [last], phase="score", lazy=True)
        return row


def run_online(seq: Sequence, draft: LoadedModel, base: LoadedModel) -> Program:
    params, prompts = seq.params, seq.prompts
    draft_gen = make_generator(params.seed)
    base_gen = make_generator(params.seed, stream=1)
    prompt_len = len(prompts.base_ids)
    forced = forced_ids(base.tokenizer, prompts.base_text, prompt_len, prompts.forced_prefix, prompts.base_spans)
    detector = SwitchDetector(params.switch_window, params.switch_threshold)  # a forced start's end raises its floor once known
    scorer = _Scorer(seq, detector)
    score_at = max(detector.first, len(forced) - 1) + 1  # the first pass waits for the earliest point a window can pass

    guide, base_guide = draft_guide(seq, draft), checked_base_guide(seq, base, forced)

    seq.phase = Phase.DRAFTING
    seq.draft_kv = seq.new_cache("draft")
    drafter = DraftPasses(seq, seq.draft_kv, params.max_draft_tokens, draft_gen, guide, draft.tokenizer)
    yield from drafter.start(prompts.draft_ids)
    generated: list[int] = []
    due: deque[Handoff] = deque()  # scoring passes due and not yet run: each ends where the request's own progress put it
    tokens = DraftTokens(base.tokenizer, prompts.base_text, prompt_len, prompts.base_spans)

    def free() -> int:
        """How many reply tokens are kept whatever the check finds: no switch can come earlier."""
        return min(detector.first + 1, params.max_tokens)

    done = False
    while True:
        token = yield from drafter.choose()
        if token in draft.eos_ids:
            done = True
        else:
            guide.accept(token)
            generated.append(token)
            done = len(generated) >= params.max_draft_tokens
        seq.draft_tokens = len(generated)

        text = draft_text(draft.tokenizer, prompts.forced_prefix, generated, final=done)
        handoff: Handoff | None
        if done:
            handoff = final_handoff(base.tokenizer, prompts.base_text, prompt_len, text, prompts.base_spans)
        else:  # tokenized with the prompt while the first words stream from it, or when a scoring pass may fall due
            guess = None if len(seq.reply.ids) < free() else tokens.estimate(text, HOLD_BACK)
            handoff = tokens.exact(text, HOLD_BACK) if guess is None or guess >= min(score_at, params.max_tokens) else None
        if handoff is not None:
            handoff = handoff.first(params.max_tokens)
            detector.raise_floor(switch_floor(handoff, forced, len(prompts.forced_prefix)))
            stable = handoff.draft_ids
            if len(seq.reply.ids) < free() and len(stable) > len(seq.reply.ids):
                keep_draft(seq, stable[: min(free(), len(stable))], base_guide)
                if seq.reply.stopped:
                    return "stop"
            if not done and len(stable) >= min(score_at, params.max_tokens):
                due.append(handoff)
                score_at = next_score_at(len(stable))
        # A pass scores what was stable when it fell due, so its ids, and its probabilities to the
        # bit, are the same alone (a scoring pass may start every step) and under load (every
        # SCORING_STRIDE steps, so that passes batch); at the draft's end every due pass runs.
        if done:
            assert handoff is not None  # the final one
            passes, due = [*due, handoff], deque()
        else:
            passes = [due.popleft()] if due and seq.scoring_open else []
        ended = False
        for k, scoring in enumerate(passes):
            probs = yield from scorer.score(scoring)
            for j, p in enumerate(probs, start=len(detector)):
                if detector.push(p):
                    seq.switch_point = j + 1
                    break
            kept = scoring.draft_ids[: scorer.scored() if seq.switch_point is None else seq.switch_point]
            kept = keep_draft(seq, kept, base_guide)  # cut at the first id the base grammar rejects
            if seq.switch_point is not None:
                seq.switch_point = len(kept)
            if seq.reply.stopped:  # the reply ended in the draft: the base model never took over
                seq.switch_point = None
                return "stop"
            if seq.switch_point is not None or (done and k == len(passes) - 1) or len(kept) >= params.max_tokens:
                rows = yield from scorer.cut(len(kept))
                ended = True
                break
        if ended:  # always, once the draft is done: its last pass is the final hand-off's
            break
        yield from drafter.feed(token, len(generated))

    seq.draft_kv = None
    del drafter  # and its cache: freed now, not when the request ends
    return (yield from continue_reply(seq, base, scorer.kv, rows, base_gen, base_guide))
