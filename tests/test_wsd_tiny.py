"""The online engine equals the paper's staged pipeline, token for token, on tiny random model pairs."""

from __future__ import annotations

import asyncio

import pytest
import torch

from wsd_llms import FinalEvent, TextDelta

QUESTIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hello there! Write a list."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count: one two three"}],
    [{"role": "user", "content": "Tell me about photosynthesis."}, {"role": "assistant", "content": "Sure, here"}],
    [{"role": "user", "content": "def f(x): return x * 2"}],
]
SETTINGS = [
    {"switch_threshold": 0.9, "switch_window": 3},
    {"switch_threshold": 0.5, "switch_window": 2},
    {"switch_threshold": 0.05, "switch_window": 1},
    {"switch_threshold": 0.8, "switch_window": 6},
]


def _both(runtime, messages, **params):
    staged = runtime.generate(messages, mode="staged", **params)
    online = runtime.generate(messages, mode="online", **params)
    return staged, online


def _assert_parity(staged, online):
    assert online.text == staged.text
    assert online.finish_reason == staged.finish_reason
    assert online.switch_point == staged.switch_point
    assert online.usage.reply_tokens == staged.usage.reply_tokens


@pytest.mark.parametrize("pair", ["shared_runtime", "differ_runtime"])
def test_online_equals_staged(pair, request):
    runtime = request.getfixturevalue(pair)
    switched, kept_whole = 0, 0
    for messages in QUESTIONS:
        for settings in SETTINGS:
            staged, online = _both(runtime, messages, max_tokens=40, **settings)
            _assert_parity(staged, online)
            switched += staged.switch_point is not None
            kept_whole += staged.switch_point is None
    # The grid must exercise both sides of the rule, or this test proves little.
    assert switched >= 3 and kept_whole >= 3, (switched, kept_whole)


def test_draft_stops_at_switch_and_staged_drafts_everything(shared_runtime):
    staged, online = _both(shared_runtime, QUESTIONS[0], max_tokens=60, switch_threshold=0.5, switch_window=2)
    assert staged.switch_point is not None
    assert online.usage.draft_tokens < staged.usage.draft_tokens


def test_max_tokens_caps_whole_reply(differ_runtime):
    for limit in (1, 3, 7, 25):
        staged, online = _both(differ_runtime, QUESTIONS[1], max_tokens=limit, switch_threshold=0.9)
        _assert_parity(staged, online)
        assert online.usage.reply_tokens <= limit
        assert online.finish_reason == "length"


def test_max_draft_tokens_hands_over_to_base(differ_runtime):
    staged, online = _both(differ_runtime, QUESTIONS[2], max_tokens=50, max_draft_tokens=5)
    _assert_parity(staged, online)
    assert online.usage.draft_tokens == 5
    assert online.usage.base_tokens > 0


def test_forced_prefix_starts_the_reply(shared_runtime):
    staged, online = _both(shared_runtime, QUESTIONS[3], max_tokens=30)
    _assert_parity(staged, online)
    assert online.text.startswith("Sure, here")
    for mode in ("base", "draft"):  # the baselines' replies start with it too, so that they compare
        assert shared_runtime.generate(QUESTIONS[3], max_tokens=30, mode=mode).text.startswith("Sure, here")


@pytest.mark.parametrize("pair", ["shared_runtime", "differ_runtime"])
def test_switch_never_falls_inside_a_forced_start(pair, request):
    """The base model takes over after the forced start at the earliest, so the reply always
    starts with all of it; online and staged agree. (Before, a confident window inside it cut
    the rest of it off: "Sure, here is" became "Sure, h" and whatever the base wrote next.)"""
    runtime = request.getfixturevalue(pair)
    base = runtime.engine.base.tokenizer
    switched = 0
    for prefix in ("Sure, here is the answer", "Photosynthesis is the process by which"):
        messages = [{"role": "user", "content": "Tell me about photosynthesis."}, {"role": "assistant", "content": prefix}]
        forced = len(base.encode(prefix, add_special_tokens=False))
        for settings in SETTINGS:
            staged, online = _both(runtime, messages, max_tokens=40, **settings)
            _assert_parity(staged, online)
            assert online.text.startswith(prefix), (prefix, settings, online.text)
            if online.switch_point is not None:
                switched += 1
                assert online.switch_point >= forced
    assert switched >= 1, switched  # the rule was exercised, not only drafts kept whole


@pytest.mark.parametrize("pair", ["shared_runtime", "differ_runtime"])
def test_stop_inside_the_kept_draft(pair, request):
    """A stop string inside the text that is kept before any scoring (a forced start, the first
    window): online stops there at once, staged after its check; both say no switch happened."""
    runtime = request.getfixturevalue(pair)
    messages = [{"role": "user", "content": "of a list of x"}, {"role": "assistant", "content": "x of Paris list <|user|> and more"}]
    for settings in SETTINGS:
        staged, online = _both(runtime, messages, max_tokens=32, stop=["e"], **settings)
        _assert_parity(staged, online)
        assert online.text == "x of Paris list <|us" and online.finish_reason == "stop" and online.switch_point is None


@pytest.mark.parametrize("pair", ["shared_runtime", "differ_runtime"])
def test_a_role_marker_in_the_forced_start_is_kept_in_every_mode(pair, request):
    """The caller's forced start holding the plain template's role marker was cut there in online,
    staged and base modes, and kept in draft mode, which has no role markers."""
    runtime = request.getfixturevalue(pair)
    messages = [{"role": "user", "content": "of a list of x"}, {"role": "assistant", "content": "x of\n\n[User]\nParis"}]
    staged, online = _both(runtime, messages, max_tokens=24)
    _assert_parity(staged, online)
    for mode in ("online", "staged", "base", "draft"):
        assert runtime.generate(messages, max_tokens=24, mode=mode).text.startswith("x of\n\n[User]\nParis"), mode


@pytest.mark.parametrize("pair", ["shared_runtime", "differ_runtime"])
def test_a_stop_inside_the_forced_start_counts_its_tokens_to_the_stop_in_every_mode(pair, request):
    """The base and draft baselines counted the whole forced start as written, past a stop inside
    it, while the reply (and WSD's kept draft) ends at the stop."""
    runtime = request.getfixturevalue(pair)
    messages = [{"role": "user", "content": "of a list of x"}, {"role": "assistant", "content": "x of Paris list and more"}]
    for mode in ("online", "staged", "base", "draft"):
        result = runtime.generate(messages, max_tokens=32, stop=["is l"], mode=mode)
        usage = result.usage
        assert result.text == "x of Par" and result.finish_reason == "stop", mode
        written = {"online": usage.kept_draft_tokens + usage.base_tokens, "staged": usage.kept_draft_tokens + usage.base_tokens, "base": usage.base_tokens, "draft": usage.draft_tokens}
        assert written[mode] == usage.reply_tokens == usage.kept_draft_tokens + usage.base_tokens, (mode, usage)


def test_stop_strings(differ_runtime):
    full = differ_runtime.generate(QUESTIONS[0], max_tokens=40, switch_threshold=0.9)
    stop = full.text[10:13]
    staged, online = _both(differ_runtime, QUESTIONS[0], max_tokens=40, switch_threshold=0.9, stop=[stop])
    _assert_parity(staged, online)
    assert online.text == full.text[: full.text.index(stop)]
    assert online.finish_reason == "stop"


RE_SPLIT = [  # scripted drafts whose later text re-tokenizes base tokens before it ("x some" is [x, ▁some], "x somen" [x, ▁, s, o, m, en])
    *[(["x", "▁some", "n"], None, {"max_tokens": n}) for n in (4, 5, 6, 8)],  # the first words stream before any scoring
    (["x", "▁some", "n"], None, {"max_tokens": 30, "switch_window": 4, "switch_threshold": 1e-9}),
    (["x", "▁some", "n"], None, {"max_tokens": 30, "stop": ["om"]}),
    (["x", "▁some", "n", "▁the"], None, {"max_tokens": 8, "max_draft_tokens": 4, "switch_window": 4, "switch_threshold": 1e-9, "stop": ["som"]}),
    (["x", "▁", "y", "o", "u", "▁the"], None, {"max_tokens": 12, "switch_window": 2, "switch_threshold": 1e-9}),  # "x yo" is [x, ▁, y, o]; "x you" [x, ▁you]
    (["n", "▁the"], "x some", {"max_tokens": 20, "switch_window": 1, "switch_threshold": 1e-9}),  # a forced start the draft's "n" re-splits
]


@pytest.mark.parametrize(("pieces", "forced", "settings"), RE_SPLIT)
def test_online_equals_staged_where_later_draft_text_re_splits_earlier_tokens(draft_tokenizer, pieces, forced, settings):
    """A BPE merge a new character undoes can reach back past the last two tokens, to the first
    words streamed before any scoring, or to a token a switch would land on: the held-back tail
    is the draft's last word, so the online engine streams, scores and switches on the tokens the
    staged check sees. A forced start that the draft's next text re-splits is never cut."""
    from tiny import scripted_draft, tiny_llama

    from wsd_llms.runtime import WSDRuntime

    messages = [{"role": "user", "content": "Hello"}] + ([{"role": "assistant", "content": forced}] if forced else [])
    rt = WSDRuntime.from_models(
        scripted_draft(draft_tokenizer, pieces, start="▁some" if forced else "<|assistant|>"), tiny_llama(draft_tokenizer, 1, "tiny-base", sharpen=0.5)
    )
    try:
        staged, online = _both(rt, messages, **settings)
        _assert_parity(staged, online)
        assert (online.usage.kept_draft_tokens, online.rollbacks) == (staged.usage.kept_draft_tokens, 0)
        events = list(rt.stream(messages, **settings))
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == staged.text
        assert staged.text.startswith(forced or "x")
    finally:
        rt.close()


def test_rollback_after_retokenization_equals_staged(differ_runtime, monkeypatch):
    """With no hold-back, appending draft text re-tokenizes scored base tokens: roll back, stay equal."""
    import wsd_llms.online

    monkeypatch.setattr(wsd_llms.online, "HOLD_BACK", False)
    monkeypatch.setattr(wsd_llms.online, "MAX_SCORE_INTERVAL", 1)
    monkeypatch.setattr(wsd_llms.online, "MIN_SCORE_INTERVAL", 1)
    rollbacks = 0
    for messages in QUESTIONS:
        for settings in SETTINGS[:2] + SETTINGS[3:]:
            staged, online = _both(differ_runtime, messages, max_tokens=40, max_draft_tokens=64, **settings)
            _assert_parity(staged, online)
            rollbacks += online.rollbacks
    assert rollbacks > 0


def test_holdback_covers_tail_retokenization(differ_runtime):
    """The default hold-back absorbs tail re-tokenization without any rollback."""
    for messages in QUESTIONS:
        staged, online = _both(differ_runtime, messages, max_tokens=40, switch_threshold=0.9)
        _assert_parity(staged, online)
        assert online.rollbacks == 0


def test_stream_deltas_join_to_text_and_name_their_model(shared_runtime):
    events = list(shared_runtime.stream(QUESTIONS[0], max_tokens=40, switch_threshold=0.5, switch_window=2))
    final = events[-1]
    assert isinstance(final, FinalEvent)
    deltas = [e for e in events[:-1] if isinstance(e, TextDelta)]
    assert "".join(d.text for d in deltas) == final.result.text
    sources = [d.source for d in deltas]
    assert set(sources) == {"draft", "base"}
    assert sources == sorted(sources, key=lambda s: s == "base")  # draft pieces, then base pieces
    assert "".join(d.text for d in deltas if d.source == "draft") == final.result.draft_text


async def test_async_equals_sync_and_never_blocks_the_loop(shared_runtime):
    sync = shared_runtime.generate(QUESTIONS[1], max_tokens=60)
    ticks = 0
    stop = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    parts, result = [], None
    async for event in shared_runtime.astream(QUESTIONS[1], max_tokens=60):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            result = event.result
    stop.set()
    await task
    assert result is not None and result.text == sync.text == "".join(parts)
    assert ticks >= 5
    assert (await shared_runtime.agenerate(QUESTIONS[1], max_tokens=60)).text == sync.text


def test_seeded_sampling_is_reproducible(differ_runtime):
    params = dict(max_tokens=30, temperature=1.0, top_p=0.9, top_k=50)
    a = differ_runtime.generate(QUESTIONS[0], seed=7, **params)
    b = differ_runtime.generate(QUESTIONS[0], seed=7, **params)
    c = differ_runtime.generate(QUESTIONS[0], seed=8, **params)
    assert a.text == b.text
    assert a.text != c.text
    staged = differ_runtime.generate(QUESTIONS[0], seed=7, mode="staged", **params)
    assert staged.text == a.text  # each model draws from its own seeded generator
    top = [differ_runtime.generate(QUESTIONS[0], seed=2**64 - 1, mode=mode, **params).text for mode in ("online", "staged")]
    assert top[0] == top[1]  # the largest seed works too
    assert differ_runtime.generate(QUESTIONS[0], seed=7 + 2**32, **params).text != a.text  # every bit of a 64-bit seed counts


def test_the_repetition_penalty_is_transformers_own_over_the_reply(differ_runtime, draft_tokenizer):
    """`penalize` is transformers' RepetitionPenaltyLogitsProcessor, and the base model alone,
    greedy, writes what a greedy loop over transformers' forward and that processor writes, with
    the penalty over the ids of the reply so far (not the prompt's, as transformers' generate
    would: the replies then ran to max_tokens, unable to end their turn)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from tiny import make_tokenizer, tiny_gemma3
    from wsd_llms.messages import normalize_messages
    from wsd_llms.prompts import build_prompts
    from wsd_llms.reply import decode
    from wsd_llms.sampling import penalize

    logits, written = torch.randn(50) * 4, [3, 7, 7, 0, 49, 12]
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([written]), logits[None].clone())[0]
    assert torch.equal(penalize(logits, written, 1.7), expected) and torch.equal(penalize(logits, written, 1.0), logits)
    reference = tiny_gemma3(make_tokenizer(420), 1, "tiny-gemma3")  # the base of differ_runtime, as it was before packing
    prompt = build_prompts(draft_tokenizer, reference.tokenizer, normalize_messages(QUESTIONS[1])).base_ids
    texts = set()
    for penalty in (1.0, 1.5):
        reply: list[int] = []
        with torch.inference_mode():
            for _ in range(30):
                row = reference.model(torch.tensor([prompt + reply])).logits[0, -1:]
                row = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([reply]), row) if reply else row
                reply.append(int(torch.argmax(row)))
        ours = differ_runtime.generate(QUESTIONS[1], mode="base", max_tokens=30, repetition_penalty=penalty)
        assert ours.finish_reason == "length" and ours.text == decode(reference.tokenizer, reply)
        texts.add(ours.text)
    assert len(texts) == 2


@pytest.mark.parametrize("pair", ["shared_runtime", "differ_runtime"])
def test_online_equals_staged_with_a_repetition_penalty(pair, request):
    """The penalty changes what each model writes (the draft over the reply it drafts, the base over
    the reply it continues), never the check, and the online engine still equals the staged one."""
    runtime = request.getfixturevalue(pair)
    changed = 0
    for messages in QUESTIONS:
        for settings in SETTINGS[:2]:
            settings = {**settings, "max_tokens": 40, "max_draft_tokens": 64}  # drafts past the budget, not to 512
            plain = runtime.generate(messages, **settings)
            staged, online = _both(runtime, messages, repetition_penalty=1.4, **settings)
            _assert_parity(staged, online)
            changed += online.text != plain.text
            sampled = _both(runtime, messages, repetition_penalty=1.4, temperature=0.8, seed=5, **settings)
            _assert_parity(*sampled)
    assert changed >= len(QUESTIONS)


@pytest.mark.parametrize("pair", ["shared_runtime", "differ_runtime"])
def test_a_forced_start_counts_as_the_reply_for_the_draft_s_penalty_too(pair, request):
    """The draft model alone penalizes the forced start, the start of its reply; so does WSD's draft,
    whose prompt ends with it (it had penalized only the tokens it drafted after it): where no window
    can pass (one longer than the reply), WSD's reply is the draft model's alone."""
    runtime = request.getfixturevalue(pair)
    for start in ("Sure, here", "def f(x): return x"):
        messages = [{"role": "user", "content": "Write a list."}, {"role": "assistant", "content": start}]
        params = dict(max_tokens=20, max_draft_tokens=20, repetition_penalty=3.0)
        alone = runtime.generate(messages, mode="draft", **params)
        for mode in ("online", "staged"):
            wsd = runtime.generate(messages, mode=mode, switch_window=21, **params)
            assert wsd.switch_point is None and wsd.text == alone.text


def test_every_bit_of_a_seed_counts_and_streams_do_not_overlap():
    """torch's CPU generator keeps a seed's low 32 bits: stream_seed mixes the high bits in, keeps
    seeds below 2**32 apart, and keeps the base streams of seeds below 2**31 off their draft streams."""
    from wsd_llms.sampling import make_generator, stream_seed

    small = range(0, 2**31, 2**31 // 100_000)
    drafts, bases = {stream_seed(s, 0) for s in small}, {stream_seed(s, 1) for s in small}
    assert len(drafts) == len(bases) == len(small) and not drafts & bases
    assert stream_seed(5, 0) == 5  # a seed below 2**32 draws as it always did for the draft
    high = [7, 7 + 2**32, 7 + 2**40, 2**63, 2**64 - 1]
    assert len({stream_seed(s, k) for s in high for k in (0, 1)}) == 2 * len(high)
    assert all(0 <= stream_seed(s, k) < 2**32 for s in high for k in (0, 1))
    assert stream_seed(-1, 1) == stream_seed(2**64 - 1, 1)  # a negative seed is its two's complement
    draws = [torch.rand(4, generator=make_generator(seed)).tolist() for seed in (7, 7 + 2**32)]
    assert draws[0] != draws[1] and draws[0] == torch.rand(4, generator=make_generator(7)).tolist()


def test_closing_a_stream_early_cancels_it(shared_runtime):
    stream = shared_runtime.stream(QUESTIONS[1], max_tokens=200, switch_threshold=1.0)
    next(stream)
    stream.close()
    # The runtime keeps serving: the next request completes.
    assert shared_runtime.generate(QUESTIONS[0], max_tokens=5).finish_reason in ("stop", "length")


def test_result_facts(shared_runtime):
    r = shared_runtime.generate(QUESTIONS[0], max_tokens=40, switch_threshold=0.5, switch_window=2)
    assert r.switch_point == r.usage.kept_draft_tokens
    assert r.usage.reply_tokens == r.usage.kept_draft_tokens + r.usage.base_tokens
    assert r.usage.draft_prompt_tokens > 0 and r.usage.base_prompt_tokens > 0
    t = r.timings
    assert 0 < t.ttft <= t.total and t.draft > 0 and t.scoring > 0 and t.base > 0
    assert (r.draft_model, r.base_model) == ("tiny-draft", "tiny-base")


@pytest.mark.parametrize("mode", ["online", "staged", "base", "draft"])
def test_usage_counts_a_forced_start_with_the_reply(differ_runtime, mode):
    """The reply's tokens are its writers' counts in every mode, a forced start (the last message the
    assistant's) included: the kept draft and the base's in WSD, the one model's in a baseline, where
    the draft model's whole reply is its kept draft (it had been 0, so the parts did not add up)."""
    messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital of France is"}]
    usage = differ_runtime.generate(messages, mode=mode, max_tokens=20).usage
    written = usage.draft_tokens if mode == "draft" else usage.kept_draft_tokens + usage.base_tokens
    assert usage.reply_tokens == written == usage.kept_draft_tokens + usage.base_tokens == 20


def test_baseline_modes_run_each_model_alone(differ_runtime):
    base = differ_runtime.generate(QUESTIONS[0], mode="base", max_tokens=20)
    draft = differ_runtime.generate(QUESTIONS[0], mode="draft", max_tokens=20)
    assert base.usage.draft_tokens == 0 and base.usage.kept_draft_tokens == 0 and base.draft_text == ""
    assert draft.usage.reply_tokens == draft.usage.draft_tokens <= 20 and draft.usage.base_tokens == 0
    assert draft.draft_text == draft.text
    # The draft alone writes what WSD's draft phase writes (WSD with a never-reached threshold and no base turn).
    wsd = differ_runtime.generate(QUESTIONS[0], switch_threshold=1.0, max_tokens=20)
    assert wsd.draft_text.startswith(draft.text.strip()[:10])


def test_usage_counts_the_prompts_of_the_models_that_ran(differ_runtime):
    """A baseline's usage counts no prompt for the model it does not run, and the adapters' totals
    (usage_counts) are the prompt and cache reads of the model that wrote the reply: with
    mode="draft", the base's prompt, never run, had been given as the input and its cache reads,
    none, as the cache's, where the draft had read most of its prompt from the prefix cache."""
    from wsd_llms.integration import usage_counts

    messages = [{"role": "system", "content": "The capital of France is Paris. " * 12}, *QUESTIONS[0]]
    wsd = differ_runtime.generate(messages, max_tokens=8).usage
    base = differ_runtime.generate(messages, mode="base", max_tokens=8).usage
    differ_runtime.generate(messages, mode="draft", max_tokens=8)  # fills the draft's prefix cache
    draft = differ_runtime.generate(messages, mode="draft", max_tokens=8)
    assert (base.draft_prompt_tokens, base.base_prompt_tokens) == (0, wsd.base_prompt_tokens)
    assert (draft.usage.draft_prompt_tokens, draft.usage.base_prompt_tokens) == (wsd.draft_prompt_tokens, 0)
    counts = usage_counts(draft)
    assert draft.usage.draft_cached_prompt_tokens > 0
    assert (counts["input_tokens"], counts["cache_read_tokens"]) == (draft.usage.draft_prompt_tokens, draft.usage.draft_cached_prompt_tokens)
    assert counts["total_tokens"] == draft.usage.draft_prompt_tokens + draft.usage.reply_tokens


@pytest.mark.parametrize("pair", ["shared_runtime", "differ_runtime"])
def test_the_prompt_is_tokenized_with_the_draft_only_when_a_scoring_pass_may_fall_due(pair, request, monkeypatch):
    """Between scoring passes the online engine estimates the draft's stable base tokens instead of
    tokenizing the whole prompt with it every step (handoff.DraftTokens). Every reply, and every
    scoring pass (the draft tokens it scores), is what tokenizing every step gives, while the
    exact tokenizations drop to those the first words and the passes need."""
    from wsd_llms import handoff, online

    runtime = request.getfixturevalue(pair)
    runs: dict[str, list] = {}
    for way in ("every step", "estimated"):
        scored, exact, drafted = [], [], []
        score, take = online._Scorer.score, handoff.DraftTokens.exact

        def scoring(self, due, score=score, scored=scored):
            scored.append(len(due.draft_ids))
            return (yield from score(self, due))

        def exactly(self, text, hold=True, take=take, exact=exact):
            exact.append(text)
            return take(self, text, hold)

        monkeypatch.setattr(online._Scorer, "score", scoring)
        monkeypatch.setattr(handoff.DraftTokens, "exact", exactly)
        if way == "every step":
            monkeypatch.setattr(handoff.DraftTokens, "estimate", lambda self, text, hold=True: None)
        replies = []
        for messages in QUESTIONS:
            for settings in SETTINGS:
                result = runtime.generate(messages, max_tokens=48, max_draft_tokens=48, **settings)
                replies.append((result.text, result.switch_point))
                drafted.append(result.usage.draft_tokens)
        runs[way] = [replies, scored, len(exact), sum(drafted)]
        monkeypatch.undo()
    assert runs["estimated"][:2] == runs["every step"][:2]
    assert runs["every step"][2] >= runs["every step"][3] - len(QUESTIONS) * len(SETTINGS)  # about one a draft token
    assert runs["estimated"][2] <= len(runs["estimated"][1]) + 8 * len(QUESTIONS) * len(SETTINGS)  # the passes and the first words
    assert runs["estimated"][2] < runs["every step"][2] / 2


def test_a_draft_of_byte_tokens_streams_only_text_it_keeps():
    """A draft model whose tokenizer falls back to bytes (Llama's, Gemma's) writes characters as runs
    of byte tokens, which its decoder turns into U+FFFD while a run ends in an incomplete or invalid
    character: text that streamed from such a run used to vanish from the draft, and the request
    failed ("contradicts text already streamed"). Now it finishes, equal to the staged pipeline."""
    from tiny import CHAT_TEMPLATE, byte_fallback_tokenizer, make_tokenizer, tiny_llama

    from wsd_llms.runtime import WSDRuntime

    bytes_tok = byte_fallback_tokenizer()
    bytes_tok.chat_template = CHAT_TEMPLATE
    bytes_tok.add_special_tokens({"eos_token": "</s>"})
    runtime = WSDRuntime.from_models(tiny_llama(bytes_tok, 0, "tiny-bytes", sharpen=3.0), tiny_llama(make_tokenizer(420), 1, "tiny-base", sharpen=1.0))
    try:
        messages = [
            {"role": "user", "content": "four. I bananas, you jumps four. of are a How dog. plus </s> <|assistant|>"},
            {"role": "assistant", "content": "The "},
        ]
        for settings in ({"switch_threshold": 1.0, "switch_window": 7}, *SETTINGS):
            staged, online = _both(runtime, messages, max_tokens=8, max_draft_tokens=30, **settings)
            _assert_parity(staged, online)
            events = list(runtime.stream(messages, max_tokens=8, max_draft_tokens=30, **settings))
            assert "".join(e.text for e in events if isinstance(e, TextDelta)) == events[-1].result.text == online.text
    finally:
        runtime.close()


def test_a_forced_start_ending_in_a_character_of_byte_tokens_is_kept_whole():
    """The base writes the forced start's last character ("😀") in byte tokens, which share its
    offsets: the earliest switch falls on the last of them, not the first, so the reply keeps the
    whole character in both modes."""
    from tiny import CHAT_TEMPLATE, byte_fallback_tokenizer, make_tokenizer, tiny_llama

    from wsd_llms.runtime import WSDRuntime

    base_tokenizer = byte_fallback_tokenizer()
    base_tokenizer.chat_template = CHAT_TEMPLATE
    base_tokenizer.add_special_tokens({"eos_token": "</s>"})
    runtime = WSDRuntime.from_models(tiny_llama(make_tokenizer(300), 0, "tiny-draft", sharpen=3.0), tiny_llama(base_tokenizer, 1, "tiny-bytes"))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "AA\U0001f600"}]
    try:
        staged, online = _both(runtime, messages, max_tokens=8, switch_window=1, switch_threshold=1e-9)
        _assert_parity(staged, online)
        assert staged.text.startswith("AA\U0001f600") and staged.switch_point == 6  # A, A and the emoji's 4 bytes
    finally:
        runtime.close()


def test_a_tokenizer_with_ids_past_its_model_s_embeddings_fails_the_request_saying_so():
    """A tokenizer not the model's (or tokens added without resizing the embeddings) failed each
    request in a pass, "IndexError: index out of range in self". The request fails before any pass,
    naming the model, the id and the embedding size; a prompt of ids it can embed is served."""
    from tiny import make_tokenizer, tiny_llama

    from wsd_llms import ModelLoadError
    from wsd_llms.runtime import WSDRuntime

    big = make_tokenizer(300)
    draft = tiny_llama(make_tokenizer(120), 0, "tiny-draft", sharpen=3.0)
    draft.tokenizer = big
    runtime = WSDRuntime.from_models(draft, tiny_llama(big, 1, "tiny-base", sharpen=3.0))
    try:
        with pytest.raises(ModelLoadError, match=r"draft model 'tiny-draft' has embeddings for token ids below 120, but its tokenizer gave 2\d\d .*resize_token_embeddings"):
            runtime.generate([{"role": "user", "content": "The capital of France is Paris."}], max_tokens=4)
        assert runtime.generate([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0).finish_reason in ("stop", "length")
        assert (runtime.stats().failed, runtime.stats().finished) == (1, 1)
    finally:
        runtime.close()


def test_a_finished_draft_keeps_the_whole_characters_of_its_last_byte_run():
    """max_draft_tokens may cut a draft inside a character written in byte tokens: the hand-off
    drops that character alone. The byte-fallback decoder turned the whole run into U+FFFD, so
    "é" before a cut emoji was dropped too (and a grammar then had the base write it again)."""
    from tiny import byte_fallback_tokenizer

    from wsd_llms.handoff import draft_text

    tokenizer = byte_fallback_tokenizer()
    written = [1, *(3 + b for b in "é".encode())]  # "Aé"
    cut_emoji = written + [3 + "😀".encode()[0]]
    assert draft_text(tokenizer, "", cut_emoji) == draft_text(tokenizer, "", written) == "Aé"
    assert draft_text(tokenizer, "", [1, 3 + 0xFF, 3 + 0xFE]) == "A"  # bytes of no character: none kept
    assert draft_text(tokenizer, "", cut_emoji, final=False) == "A"  # unfinished: the run is not final yet
