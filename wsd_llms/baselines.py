"""Each model alone, through the same machinery: the baselines WSD is measured against.

`mode="base"`: the base model answers the plain-template prompt by itself.
`mode="draft"`: the draft model answers by itself (its reply counted in draft tokens).
"""

from __future__ import annotations

from .continuation import continue_reply
from .encoding import encode_text
from .loading import LoadedModel
from .sampling import make_generator
from .output_head import HeadRows
from .sequence import Forward, Phase, Program, Sequence
from .structured import checked_base_guide, draft_guide


def run_base_only(seq: Sequence, draft: LoadedModel, base: LoadedModel) -> Program:
    seq.phase = Phase.CONTINUING  # the base model writes the whole reply
    seq.base_kv = seq.new_cache("base")
    prefix = encode_text(base.tokenizer, seq.prompts.forced_prefix)
    guide = checked_base_guide(seq, base, prefix)
    prefix = prefix[: seq.params.max_tokens]  # the reply starts with it, as WSD's does, within its budget
    rows: HeadRows = yield Forward("base", seq.base_kv, seq.prompts.base_ids + prefix, phase="base", lazy=True)
    seq.emit(seq.reply.add(prefix, "base"))
    seq.base_tokens = len(seq.reply.ids)  # counted with the reply's other tokens, as WSD counts it in the kept draft (to a stop in it)
    return (yield from continue_reply(seq, base, seq.base_kv, rows, make_generator(seq.params.seed), guide))


def run_draft_only(seq: Sequence, draft: LoadedModel, base: LoadedModel) -> Program:
    """The draft model writes the whole reply; `seq.reply` decodes with the draft tokenizer."""
    seq.phase = Phase.DRAFTING
    seq.draft_kv = seq.new_cache("draft")
    guide = draft_guide(seq, draft)
    rows: HeadRows = yield Forward("draft", seq.draft_kv, seq.prompts.draft_ids, lazy=True)  # the forced prefix ends it
    prefix = encode_text(draft.tokenizer, seq.prompts.forced_prefix)[: seq.params.max_tokens]
    seq.emit(seq.reply.add(prefix, "draft"))  # the reply starts with it, as WSD's does
    seq.draft_tokens = len(seq.reply.ids)  # counted with the reply's other tokens (to a stop in it)
    reason = yield from continue_reply(seq, draft, seq.draft_kv, rows, make_generator(seq.params.seed), guide, "draft")
    seq.kept_draft = len(seq.reply.ids)  # all of it the draft's: kept draft + base is the reply, as in every mode
    return reason
