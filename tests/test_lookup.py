"""Prompt lookup (lookup.py; continuation.continue_reply, drafting.DraftPasses): guessed ids change no
reply, only how many passes write it."""

from __future__ import annotations

import random

import pytest

from wsd_llms import InvalidParameterError
from wsd_llms.lookup import MAX_NGRAM, NgramIndex

QUESTIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hello there! Write a list: apples, bananas, apples, bananas"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count: one two three"}],
]
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}}, "required": ["color", "ok"]}


def _latest(ids: list[int], count: int) -> tuple[list[int], int]:
    """What NgramIndex.guess should give, by brute force."""
    for n in range(min(MAX_NGRAM, len(ids)), 0, -1):
        starts = [i for i in range(len(ids) - n) if ids[i : i + n] == ids[-n:]]
        if starts:
            return ids[starts[-1] + n : starts[-1] + n + count], n
    return [], 0


def test_a_guess_is_what_followed_the_latest_earlier_occurrence_of_the_longest_suffix():
    index = NgramIndex([7, 1, 2, 3, 4, 8, 2, 3, 5, 6, 1, 2, 3])
    assert index.guess(3) == ([4, 8, 2], 3)  # (1, 2, 3) before (2, 3), though (2, 3) occurred later
    assert index.guess(1) == ([4], 3) and index.guess(0) == ([], 0)
    index.extend([9])
    assert index.guess(4) == ([], 0)  # 9 never occurred before
    assert NgramIndex([5, 1, 6, 5, 2, 7, 5]).guess(2) == ([2, 7], 1)  # the latest 5 before the end
    assert NgramIndex([1, 1, 1]).guess(4) == ([1], 2)  # as far as the ids go
    assert NgramIndex().guess(4) == ([], 0) and NgramIndex([3]).guess(4) == ([], 0)


def test_guesses_match_a_brute_force_search_as_ids_are_appended():
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(5) for _ in range(rng.randrange(1, 60))]
        index = NgramIndex(ids[:10])
        for token in ids[10:]:
            index.extend([token])
            assert index.guess(4) == _latest(index.ids, 4)
        assert index.ids == ids


@pytest.fixture(params=["shared_runtime", "differ_runtime"])
def runtime(request):
    """A tiny pair's runtime; each test sets lookup_tokens and gets the default back after."""
    rt = request.getfixturevalue(request.param)
    default = rt.engine.lookup_tokens
    yield rt
    rt.configure(lookup_tokens=default)


def _replies(rt, lookup_tokens: int, requests: list[dict]) -> tuple[list, dict, dict]:
    """Each request's result with `lookup_tokens`, and the passes and guesses counted meanwhile."""
    rt.configure(lookup_tokens=lookup_tokens)
    before = rt.stats()
    results = [rt.generate(**request) for request in requests]
    after = rt.stats()
    passes = {k: after.passes[k] - before.passes[k] for k in after.passes}
    guesses = {k: after.prompt_lookup[k] - before.prompt_lookup[k] for k in after.prompt_lookup}
    return results, passes, guesses


@pytest.mark.parametrize("mode", ["online", "staged", "base", "draft"])
def test_replies_with_guesses_equal_replies_without(runtime, mode):
    """Greedy, seeded sampling, stop strings, a repetition penalty and budgets (of the reply and of
    the draft) that end inside a run of guesses: the same text, finish reason and token counts, in
    fewer passes of each model that writes (the draft's guesses in online and staged drafting, the
    continuation's)."""
    requests = [
        {"messages": m, "mode": mode, "max_tokens": max_tokens, "max_draft_tokens": max_draft, **params}
        for m in QUESTIONS
        for max_tokens, max_draft in ((7, 48), (60, 48), (60, 9))
        for params in ({}, {"temperature": 0.9, "seed": 3}, {"stop": ["e "]}, {"repetition_penalty": 1.3})
    ]
    plain, plain_passes, none = _replies(runtime, 0, requests)
    guessed, passes, guesses = _replies(runtime, 4, requests)
    assert none == {"fed": 0, "accepted": 0}
    for a, b in zip(plain, guessed):
        assert (b.text, b.finish_reason, b.switch_point, b.usage) == (a.text, a.finish_reason, a.switch_point, a.usage)
    assert 0 < guesses["accepted"] <= guesses["fed"]
    for model in {"online": ("draft", "base"), "staged": ("draft", "base")}.get(mode, (mode,)):
        assert passes[model] < plain_passes[model]


@pytest.mark.parametrize("mode", ["base", "online"])
def test_a_busy_pass_feeds_fewer_guesses_and_replies_do_not_change(runtime, mode):
    """8 streams at once share a pass's room for guesses (engine.GUESS_ROWS), and every reply is what
    it is alone. The base model alone feeds fewer guesses than alone; online, drafts run on past a
    switch while the scoring passes wait to batch (engine.SCORING_STRIDE), so they may guess more."""
    from concurrent.futures import ThreadPoolExecutor

    requests = [{"messages": QUESTIONS[i % len(QUESTIONS)], "mode": mode, "max_tokens": 40 + 3 * i} for i in range(8)]
    alone, _, alone_guesses = _replies(runtime, 4, requests)
    before = runtime.stats().prompt_lookup
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda request: runtime.generate(**request), requests))
    fed = runtime.stats().prompt_lookup["fed"] - before["fed"]
    assert [r.text for r in together] == [r.text for r in alone]
    assert 0 < fed and (mode == "online" or fed < alone_guesses["fed"])
    assert runtime.stats().peaks[f"{'draft' if mode == 'online' else 'base'}_batch"] > 1


def test_guesses_under_a_grammar_equal_none(runtime):
    """A grammar's mask for each guessed row is the one its position gets one token at a time."""
    requests = [{"messages": m, "mode": mode, "max_tokens": 60, "response_format": SCHEMA} for m in QUESTIONS for mode in ("online", "base")]
    plain, _, _ = _replies(runtime, 0, requests)
    guessed, _, guesses = _replies(runtime, 4, requests)
    assert [r.text for r in guessed] == [r.text for r in plain]
    assert all(r.parsed is not None for r in guessed)
    assert guesses["fed"] > 0


def test_lookup_tokens_is_checked(runtime):
    for value in (-1, 1.5, True, "4"):
        with pytest.raises(InvalidParameterError, match=r"invalid lookup_tokens=.*must be an integer >= 0"):
            runtime.configure(lookup_tokens=value)
    runtime.configure(lookup_tokens=0)
    assert runtime.engine.lookup_tokens == 0
