"""The output projection outside the forward (output_head): lazy rows project to the eager logits,
the scoring bound never undercuts a probability, the switch rule decides with bounds as it does
with exact values, and the engine projects a step's rows together."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch
from tiny import make_tokenizer, tiny_deepseek, tiny_gemma3, tiny_granite, tiny_llama
from machine import needs_bfloat16_kernels

from wsd_llms import output_head, packed_linear
from wsd_llms.messages import normalize_messages
from wsd_llms.model_runner import ModelRunner
from wsd_llms.output_head import HeadRows, OutputHead
from wsd_llms.params import parse_params
from wsd_llms.runtime import WSDRuntime
from wsd_llms.switch import SwitchDetector, find_switch

MODELS = {
    "llama": lambda: tiny_llama(make_tokenizer(300), 0),
    "gemma3": lambda: tiny_gemma3(make_tokenizer(420), 1),  # soft-capped logits
    "deepseek": lambda: tiny_deepseek(make_tokenizer(300), 2),  # padded passes
}


@pytest.fixture
def small_bound(monkeypatch):
    """Bounds from the first 64 words, so the tiny vocabularies (300 and 420 words) get them."""
    monkeypatch.setattr(output_head, "BOUND_WORDS", 64)
    monkeypatch.setattr(output_head, "MIN_BOUND_VOCAB", 128)


def _ids(seed: int, n: int, vocab: int) -> list[int]:
    return torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kind", MODELS)
def test_lazy_rows_project_to_the_eager_logits_bit_for_bit(kind):
    runner = ModelRunner(MODELS[kind]())
    vocab = runner.model.config.vocab_size
    ids = _ids(0, 20, vocab)
    eager = runner.extend(runner.new_cache(), ids, keep=6)
    lazy = runner.extend(runner.new_cache(), ids, keep=6, lazy=True)
    assert isinstance(lazy, HeadRows) and len(lazy) == 6
    assert torch.equal(lazy.head.logits(lazy.hidden), eager)
    assert torch.equal(lazy.head.logits(lazy[[1, 4]].hidden), eager[[1, 4]])  # any rows, alone or together
    # Lazy and eager rows share a batched pass; each gets what it gets alone.
    kvs = [runner.new_cache() for _ in range(3)]
    for kv, n in zip(kvs, [4, 9, 0]):
        if n:
            runner.extend(kv, _ids(n, n, vocab))
    new, keeps, lazies = [ids[:7], ids[:1], ids[:5]], [3, 0, 2], [True, False, True]
    alone = [runner.new_cache() for _ in range(3)]
    for kv, n in zip(alone, [4, 9, 0]):
        if n:
            runner.extend(kv, _ids(n, n, vocab))
    expected = [runner.extend(kv, row, keep) for kv, row, keep in zip(alone, new, keeps)]
    got = runner.extend_batch(kvs, new, keeps, lazies)
    for e, g, is_lazy in zip(expected, got, lazies):
        logits = g.head.logits(g.hidden) if is_lazy else g
        if runner.ragged:
            assert torch.equal(logits, e)
        else:
            torch.testing.assert_close(logits, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("slice_exact", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama", "llama-tied", "gemma3"])
def test_bounds_never_undercut_the_exact_probability(small_bound, kind, dtype, slice_exact):
    """On this CPU the slice's oneDNN kernel gives the whole projection's bits, so bounds allow
    almost nothing for rounding; where it might not (a GPU), they allow 4 units in the last place."""
    loaded = MODELS[kind.removesuffix("-tied")]()
    model = loaded.model
    if kind.endswith("-tied"):  # the head's rows are the input embeddings: every target is bounded
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.to(dtype).requires_grad_(False)  # the worker runs in inference mode; here an unpacked head (bfloat16 on an AVX2 CPU) would track grads
    runner = ModelRunner(loaded)
    assert runner.head._slice_exact
    runner.head._slice_exact = slice_exact
    vocab = model.config.vocab_size
    rows = runner.extend(runner.new_cache(), _ids(1, 60, vocab), keep=60, lazy=True)
    logits = rows.head.logits(rows.hidden)
    logp = torch.log_softmax(logits, dim=-1)
    # How far a bound may lie above p: the mass outside the slice, and the allowance for rounding.
    eps = torch.finfo(dtype).eps
    slack = 2 * eps * logits.abs().amax(-1) + output_head.BOUND_FLOOR
    if not slice_exact:
        slack += output_head.BOUND_ULPS * eps * logits.abs().amax(-1)
    # Targets across the vocabulary, inside and outside the bounded slice, and each row's most likely word.
    for targets in [_ids(2, 60, vocab), logp.argmax(-1).tolist(), [i % 64 for i in range(60)]]:
        bounds = rows.logprob_bounds(targets)
        exact = logp.gather(-1, torch.tensor(targets)[:, None])[:, 0]
        for row, (t, b, e) in enumerate(zip(targets, bounds, exact.tolist())):
            assert b >= e
            if t < 64 or runner.head._words is not None:  # the target's own logit over the slice's mass (and its own)
                mass = torch.logsumexp(logits[row, :64], -1) if t < 64 else torch.logaddexp(torch.logsumexp(logits[row, :64], -1), logits[row, t])
                assert b - e <= float(torch.logsumexp(logits[row], -1) - mass + slack[row]) + 1e-3
            else:  # an untied packed head keeps no row for a word outside the slice: p <= 1 (unpacked, as
                # bfloat16 on a CPU without its kernels, it keeps the head's rows)
                assert b == pytest.approx(output_head.BOUND_FLOOR)


def _forbid(ids: list[int]):
    """A mask as structured.Guide.mask gives one: a copy with `ids` at -inf."""

    def mask(logits: torch.Tensor) -> torch.Tensor:
        masked = logits.clone()
        masked[ids] = -math.inf
        return masked

    return mask


@needs_bfloat16_kernels
def test_greedy_screen_gives_the_full_projections_argmax(small_bound):
    """The bfloat16 screen's ids are torch.argmax's over the float32 projection, masked or not:
    exact ties go to the first id, near ties and flat rows to the full projection."""
    loaded = MODELS["llama"]()
    model = loaded.model
    words = model.get_input_embeddings().weight
    model.get_output_embeddings().weight = words  # tied, float32, no bias or soft-capping: screened
    with torch.no_grad():
        words[200] = words[100]  # an exact tie, whatever the row
        words[150] = words[50] * (1 + 2e-7)  # ties within the float32 sums' rounding
        words[7] = (1 + 0.49 * 2**-7) * 2**-6  # rounds down in bfloat16, as the row below: every product errs one way
    head = ModelRunner(loaded).head
    assert head._screen is not None
    vocab, size = words.shape
    generator = torch.Generator().manual_seed(0)
    hidden = torch.cat(
        [
            torch.randn(40, size, generator=generator).pow(3) * 4,  # heavy-tailed, like final states
            words[[100, 50]].detach() * 50,  # rows whose largest logits are the ties
            torch.full((1, size), 1 + 0.49 * 2**-7),  # the bound's worst case
            torch.zeros(1, size),  # every logit equal: the first word
        ]
    )
    with torch.inference_mode():
        logits = head.logits(hidden)
        top = logits.argmax(-1).tolist()
        masks = [None if i % 2 else _forbid([top[i], 3, 4]) for i in range(len(hidden))]
        expected = [int(torch.argmax(row if mask is None else mask(row))) for row, mask in zip(logits, masks)]
        assert head.greedy_ids(hidden, masks) == expected
        assert head.greedy_ids(hidden, [None] * len(hidden)) == top
        assert head.screened_rows > 40 and head.fallback_rows >= 3  # both ways were taken
        assert top[-1] == 0 and top[-4] == 100 and top[-2] == 7  # the first of equal logits wins
        head.use_screen = False
        assert head.greedy_ids(hidden, masks) == expected
        # The bound holds for every word of every row, and is not loose beyond use.
        screened = head._screen(hidden.to(torch.bfloat16)).float()
        gamma, sizes, scales = output_head._screen_scales(hidden)
        candidates = head._candidates(screened.clone(), sizes, scales, gamma, masks)
        for z, scale, exact, mask, found in zip(screened, scales, logits, masks, candidates):
            eps = output_head._screen_error(z, head._norms, scale)
            assert bool(((z - exact).abs() <= eps).all())
            assert float(eps.max()) < 30 * float((z - exact).abs().max()) + 1e-5
            z = z if mask is None else mask(z)
            assert found.tolist() == (z + eps >= (z - eps).max()).nonzero()[:, 0].tolist()  # the top found in one pass
        assert sum(len(found) > 1 for found in candidates) >= 10


def test_no_screen_where_its_bounds_do_not_hold(small_bound):
    """Soft-capped logits, a bfloat16 projection, and an untied packed head (no rows to compute
    candidates again) project in full."""
    assert ModelRunner(MODELS["gemma3"]()).head._screen is None
    assert ModelRunner(MODELS["llama"]()).head._screen is None  # untied
    loaded = MODELS["llama"]()
    loaded.model.get_output_embeddings().weight = loaded.model.get_input_embeddings().weight
    loaded.model.to(torch.bfloat16)
    assert ModelRunner(loaded).head._screen is None

@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_making_a_runner_draws_nothing_from_torchs_global_generator(small_bound, kind, monkeypatch):
    """Loading leaves a caller's torch.manual_seed where it was: the probes' layers and the
    bound's copy of the head's first rows are made from given tensors, not drawn."""
    loaded = MODELS[kind]()
    monkeypatch.setattr(packed_linear, "_STACKING_EXACT", {})  # so that every load-time check runs here
    packed_linear._onednn_linear_works.cache_clear()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    runner = ModelRunner(loaded)
    assert runner.head._subset is not None  # the bound's copy was made
    assert torch.equal(torch.get_rng_state(), state)


def test_no_bound_for_a_small_vocabulary_or_a_head_the_model_scales():
    assert ModelRunner(MODELS["llama"]()).head.logprob_bounds(torch.zeros(1, 32), [5]) is None  # 300 words
    granite = ModelRunner(tiny_granite(make_tokenizer(300), 3))
    assert not granite.head.projects  # its forward divides the logits: it keeps its own head
    ids = _ids(3, 12, granite.model.config.vocab_size)
    lazy = granite.extend(granite.new_cache(), ids, keep=4, lazy=True)
    with torch.inference_mode():
        own = granite.model(input_ids=torch.tensor([ids])).logits[0, -4:]
    torch.testing.assert_close(lazy.head.logits(lazy.hidden), own, atol=1e-5, rtol=1e-5)


def test_switch_decisions_from_bounds_equal_exact_ones():
    """Push the exact probability only where needs_exact says it can matter, an upper bound
    elsewhere: the switch point is the one the exact probabilities give, for any chunking."""
    rng = random.Random(0)
    skipped = 0
    for _ in range(3000):
        window, threshold = rng.randint(1, 6), rng.choice([0.3, 0.8, 0.9, 1.0])
        first = rng.choice([0, 0, rng.randint(0, 12)])  # a forced start's last token
        probs = [rng.choice([rng.uniform(0.85, 1.0), rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.05), 1.0, 0.0]) for _ in range(rng.randint(0, 40))]
        detector, got, i = SwitchDetector(window, threshold, first), None, 0
        while i < len(probs) and got is None:
            chunk = probs[i : i + rng.randint(1, 12)]
            bounds = [
                (math.log(p) if p > 0 else rng.choice([-math.inf, -3.0])) + rng.choice([0.0, 1e-4, 0.5, 3.0]) for p in chunk
            ]
            need = detector.needs_exact(bounds)
            skipped += need.count(False)
            for j, (p, n, b) in enumerate(zip(chunk, need, bounds)):
                if detector.push(p if n else math.exp(b)):
                    got = i + j
                    break
            i += len(chunk)
        assert got == find_switch(probs, window, threshold, first)
    assert skipped > 10000  # the bounds did spare most exact values


def test_needs_exact_does_not_walk_a_long_window():
    """A window longer than any draft is answered at once: needs_exact starts at the first window
    that can end (switch_window=10**9 used to hold the worker for good on every scoring pass)."""
    detector = SwitchDetector(10**9, 0.8)
    start = time.perf_counter()
    for _ in range(20):
        assert all(detector.needs_exact([math.log(0.5)] * 32))  # with the rest certain, the window could pass
        assert not any(detector.push(0.5) for _ in range(32))
    assert time.perf_counter() - start < 1.0


QUESTIONS = ["What is the capital of France?", "Hello there! Write a list.", "Count: one two three", "def f(x): return x * 2"]
SETTINGS = [
    {"switch_threshold": 0.9, "switch_window": 3},
    {"switch_threshold": 0.5, "switch_window": 2},
    {"switch_threshold": 0.05, "switch_window": 1},
    {"switch_threshold": 0.8, "switch_window": 6},
]


@pytest.mark.parametrize("pair", ["shared", "differ"])
def test_online_with_bounds_equals_staged(small_bound, monkeypatch, pair):
    tokenizer = make_tokenizer(300)
    draft = tiny_llama(tokenizer, 0, "tiny-draft", sharpen=3.0)
    base = tiny_llama(tokenizer, 0, "tiny-base", sharpen=3.0) if pair == "shared" else tiny_gemma3(make_tokenizer(420), 1)
    needs_exact, spared = SwitchDetector.needs_exact, []

    def counting(self, bounds):
        need = needs_exact(self, bounds)
        spared.append(need.count(False))
        return need

    monkeypatch.setattr(SwitchDetector, "needs_exact", counting)
    rt = WSDRuntime.from_models(draft, base)
    try:
        assert rt.engine.runners["base"].head.logprob_bounds(torch.zeros(1, 32), [1]) is not None
        assert rt.engine.runners["draft"].head.logprob_bounds(torch.zeros(1, 32), [1]) is None  # never scored: no slice kept
        switches = set()
        for question in QUESTIONS:
            for settings in SETTINGS:
                messages = [{"role": "user", "content": question}]
                staged = rt.generate(messages, mode="staged", max_tokens=40, max_draft_tokens=64, **settings)
                online = rt.generate(messages, mode="online", max_tokens=40, max_draft_tokens=64, **settings)
                assert (online.text, online.switch_point, online.finish_reason) == (staged.text, staged.switch_point, staged.finish_reason)
                switches.add(online.switch_point is not None)
    finally:
        rt.close()
    assert switches == {True, False} and sum(spared) > 0


def test_a_step_projects_every_waiting_row_in_one_call(monkeypatch):
    rt = WSDRuntime.from_models(tiny_llama(make_tokenizer(300), 0), tiny_gemma3(make_tokenizer(420), 1))
    engine = rt.engine  # stepped by hand: no worker runs
    calls = []
    logits = OutputHead.logits
    monkeypatch.setattr(OutputHead, "logits", lambda self, hidden: calls.append(len(hidden)) or logits(self, hidden))
    try:
        for question in QUESTIONS[:3]:
            seq = engine.prepare(normalize_messages([{"role": "user", "content": question}]), parse_params(mode="base", max_tokens=5), lambda e: None)
            engine.add(seq)
        for _ in range(3):
            calls.clear()
            engine.step()
            assert calls == [3]  # three base decodes: one projection of three rows
    finally:
        rt.close()


def test_a_failing_projection_fails_only_its_request(monkeypatch):
    """Rows that cannot be projected (here: NaN, from a poisoned word's embedding) fail their
    request; the batched projection is retried row by row, and the others go on."""
    tokenizer = make_tokenizer(300)
    rt = WSDRuntime.from_models(tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1))
    engine = rt.engine
    poison = tokenizer.encode("zq", add_special_tokens=False)[0]
    with torch.no_grad():
        engine.base.model.get_input_embeddings().weight[poison] = float("nan")
    logits = OutputHead.logits

    def checked(self, hidden):
        if torch.isnan(hidden).any():
            raise FloatingPointError("NaN hidden states")
        return logits(self, hidden)

    monkeypatch.setattr(OutputHead, "logits", checked)
    outcomes = {}
    try:
        for question in ["Hello there", "zq zq", "Count: one two"]:
            seq = engine.prepare(
                normalize_messages([{"role": "user", "content": question}]),
                parse_params(mode="base", max_tokens=4),
                lambda e, q=question: outcomes.__setitem__(q, e),
            )
            engine.add(seq)
        while engine.has_work():
            engine.step()
    finally:
        rt.close()
    assert "NaN hidden states" in str(outcomes.pop("zq zq"))
    assert all(e.result.finish_reason in ("length", "stop") for e in outcomes.values())
    assert engine.counts == {"finished": 2, "failed": 1, "cancelled": 0}
