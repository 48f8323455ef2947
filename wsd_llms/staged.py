"""The paper's three stages run one after another: the reference the online engine must equal."""

from __future__ import annotations

import torch

from .continuation import continue_reply, keep_draft
from .drafting import DraftPasses
from .handoff import draft_text, final_handoff, forced_ids, switch_floor
from .loading import LoadedModel
from .output_head import HeadRows
from .sampling import make_generator, token_probs
from .sequence import Forward, Phase, Program, Project, Sequence
from .structured import checked_base_guide, draft_guide
from .switch import find_switch


# Rows of the check's logits held at once (each is the base vocabulary's size in float32: 1 MiB
# for the embedded base), so a 512-token draft's check needs 64 MiB, not 512.
CHECK_ROWS = 64


def run_staged(seq: Sequence, draft: LoadedModel, base: LoadedModel) -> Program:
    """Draft the whole reply, score it in one base pass, switch, re-prefill and continue."""
    params, prompts = seq.params, seq.prompts
    draft_gen = make_generator(params.seed)
    base_gen = make_generator(params.seed, stream=1)

    # 1-2. Draft until EOS or max_draft_tokens.
    seq.phase = Phase.DRAFTING
    seq.draft_kv = seq.new_cache("draft")
    forced = forced_ids(base.tokenizer, prompts.base_text, len(prompts.base_ids), prompts.forced_prefix, prompts.base_spans)
    guide, base_guide = draft_guide(seq, draft), checked_base_guide(seq, base, forced)
    drafter = DraftPasses(seq, seq.draft_kv, params.max_draft_tokens, draft_gen, guide, draft.tokenizer)
    yield from drafter.start(prompts.draft_ids)
    generated: list[int] = []
    while len(generated) < params.max_draft_tokens:
        token = yield from drafter.choose()
        if token in draft.eos_ids:
            break
        guide.accept(token)
        generated.append(token)
        if len(generated) < params.max_draft_tokens:
            yield from drafter.feed(token, len(generated))
    seq.draft_tokens = len(generated)
    seq.draft_kv = None
    del drafter  # and its cache: freed now, not when the request ends

    # 3-5. Check the draft with one base pass (unconstrained) and find the switch point.
    text = draft_text(draft.tokenizer, prompts.forced_prefix, generated)
    handoff = final_handoff(base.tokenizer, prompts.base_text, len(prompts.base_ids), text, prompts.base_spans)
    probs: list[float] = []
    if handoff.draft_ids:  # only the first max_tokens draft tokens can be kept: only they are checked
        seq.base_kv, draft_ids = seq.new_cache("check"), handoff.draft_ids[: params.max_tokens]  # counted as the base's
        rows: HeadRows = yield Forward("base", seq.base_kv, handoff.prompt_ids + draft_ids, keep=len(draft_ids) + 1, phase="score", lazy=True)
        for start in range(0, len(draft_ids), CHECK_ROWS):  # rows[j] predicts draft_ids[j]
            logits: torch.Tensor = yield Project(rows[start : min(start + CHECK_ROWS, len(draft_ids))])
            probs += token_probs(logits, draft_ids[start : start + CHECK_ROWS])
        seq.base_kv = None
        del rows  # the check cache is freed now, not when the request ends
    floor = switch_floor(handoff, forced, len(prompts.forced_prefix))
    switch = find_switch(probs[: params.max_tokens], params.switch_window, params.switch_threshold, floor)
    # 6-7. Keep the draft up to the switch (and up to the first id the base grammar rejects),
    # then continue from a fresh prefill of prompt + kept draft.
    kept = keep_draft(seq, handoff.draft_ids[: params.max_tokens if switch is None else switch + 1], base_guide)
    seq.switch_point = None if switch is None or seq.reply.stopped else len(kept)  # a stop in the draft: no switch
    if seq.reply.stopped or len(kept) >= params.max_tokens:
        return "stop" if seq.reply.stopped else "length"
    seq.base_kv = seq.new_cache("base")
    rows = yield Forward("base", seq.base_kv, handoff.prompt_ids + kept, phase="base", lazy=True)
    return (yield from continue_reply(seq, base, seq.base_kv, rows, base_gen, base_guide))
