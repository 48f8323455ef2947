"""The model runner's batched passes equal one-at-a-time passes, and the pass planner groups sensibly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny import make_tokenizer, tiny_deepseek, tiny_gemma3, tiny_llama, tiny_phi3_longrope
from machine import needs_bfloat16_kernels

from wsd_llms.attention import attention_backends
from wsd_llms.kv_cache import KVCache, KVStore
from wsd_llms.model_runner import ModelRunner
from wsd_llms import packed_linear
from wsd_llms.packed_linear import PackedLinear, SharedInputPart, can_pack, pack_linears
from wsd_llms.scheduler import guess_shares, piece_end, piece_rows, plan_passes, prefill_pieces
from wsd_llms.sequence import Forward

# (cached tokens, new tokens, kept rows): an empty-cache prefill, decode steps, scoring passes;
# the 40-token rows cross the Gemma 3 model's 16-token sliding window.
ROWS = [(0, 9, 0), (3, 1, 0), (20, 12, 5), (40, 2, 0), (40, 14, 14), (1, 1, 1)]


@pytest.fixture(params=["llama", "gemma3", "deepseek"])
def runner(request):
    """Llama; Gemma 3 (sliding windows); DeepSeek-V3 (cached keys and values of different sizes)."""
    if request.param == "llama":
        return ModelRunner(tiny_llama(make_tokenizer(300), 0))
    if request.param == "deepseek":
        return ModelRunner(tiny_deepseek(make_tokenizer(300), 2))
    return ModelRunner(tiny_gemma3(make_tokenizer(420), 1))


def _ids(seed: int, n: int, vocab: int) -> list[int]:
    return torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _caches(runner: ModelRunner, rows: list[tuple[int, int, int]] = ROWS) -> list[KVCache]:
    """One cache per (cached, new, keep) row, holding `cached` random ids."""
    vocab = runner.model.config.vocab_size
    caches = []
    for i, (cached, _, _) in enumerate(rows):
        kv = runner.new_cache()
        if cached:
            runner.extend(kv, _ids(i, cached, vocab))
        caches.append(kv)
    return caches


def test_ragged_batch_equals_one_at_a_time(runner):
    vocab = runner.model.config.vocab_size
    new = [_ids(100 + i, n, vocab) for i, (_, n, _) in enumerate(ROWS)]
    keeps = [k for _, _, k in ROWS]
    alone, batched = _caches(runner), _caches(runner)
    expected = [runner.extend(kv, ids, keep) for kv, ids, keep in zip(alone, new, keeps)]
    got = runner.extend_batch(batched, new, keeps)
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    # The caches now hold the same positions: the next token gives the same logits.
    for a, b in zip(alone, batched):
        assert a.ids == b.ids
        torch.testing.assert_close(runner.extend(b, [42]), runner.extend(a, [42]), atol=1e-4, rtol=1e-4)


def test_cpu_linears_are_packed_exact_and_batch_invariant():
    """Every linear layer runs on oneDNN: the same numbers as F.linear, for any input layout, and a
    row's result does not depend on the rows that share its call (what makes batching exact)."""
    loaded = tiny_llama(make_tokenizer(300), 0)
    linears = {name: m for name, m in loaded.model.named_modules() if type(m) is torch.nn.Linear}
    ModelRunner(loaded)
    modules = dict(loaded.model.named_modules())
    assert linears and all(isinstance(modules[name], PackedLinear | SharedInputPart) for name in linears)
    assert not any(type(m) is torch.nn.Linear for m in loaded.model.modules())
    head, linear = loaded.model.get_output_embeddings(), linears["lm_head"]
    x = torch.randn(3, 9, 32)
    with torch.inference_mode():
        for view in [x[:1, :1], x[:, 2:7], x[:, ::2], x.transpose(0, 1)]:  # contiguous or not
            torch.testing.assert_close(head(view), torch.nn.functional.linear(view, linear.weight), atol=1e-5, rtol=1e-5)
        rows = x.reshape(-1, 32)
        together = head(rows)
        assert all(torch.equal(head(rows[i : i + n]), together[i : i + n]) for i, n in [(0, 1), (5, 2), (8, 8), (3, 17)])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3, tiny_deepseek])
def test_siblings_reading_one_input_share_one_gemm_with_the_same_bits(make):
    """Layers that read the same input (query, key and value projections; gate and up) run as one
    GEMM: the model's logits stay bit for bit those of one packed layer each, a lone row included,
    and the GEMM's output is let go once every sibling has taken its part."""
    tokenizer = make_tokenizer(420 if make is tiny_gemma3 else 300)
    fused, apart = make(tokenizer, 3).model, make(tokenizer, 3).model
    ids = torch.tensor([[5, 9, 2, 7, 11]])
    assert pack_linears(fused, probe=lambda: fused(input_ids=ids[:, :4], use_cache=False).logits) == pack_linears(apart)
    attention, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert isinstance(mlp.gate_proj, SharedInputPart) and mlp.gate_proj.shared is mlp.up_proj.shared
    assert isinstance(attention.q_proj, SharedInputPart) and isinstance(attention.o_proj, PackedLinear)
    assert isinstance(mlp.down_proj, PackedLinear)
    with torch.inference_mode():
        for n in (5, 1):
            assert torch.equal(fused(input_ids=ids[:, :n]).logits, apart(input_ids=ids[:, :n]).logits)
    assert all(getattr(part.shared._pass, "output", None) is None for part in (mlp.gate_proj, attention.q_proj))  # let go


class _Siblings(torch.nn.Module):
    """Two same-shaped layers that read one input, unless the model `feeds` b a's output, `writes`
    the input between their reads, or `flattens` a's output (a column slice of a shared GEMM cannot
    be viewed so)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.b, self.how = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0  # a tensor of its own, to write to
        a = self.a(x)
        if self.how == "writes":
            x.mul_(2)
        b = self.b(a if self.how == "feeds" else x)
        return (a.view(-1) if self.how == "flattens" else a).sum() + b.sum()


@pytest.mark.parametrize("how", ["feeds", "writes", "flattens"])
def test_siblings_stay_apart_unless_they_read_one_input_and_can_take_a_slice(how):
    model = _Siblings(how)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        expected = model(x)
    pack_linears(model, probe=lambda: model(x))
    assert isinstance(model.a, PackedLinear) and isinstance(model.b, PackedLinear)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected)
    shared = _Siblings("reads")
    packed_linear._STACKING_EXACT.clear()  # so that the check runs here: it must not draw from torch's global generator
    state = torch.get_rng_state()
    pack_linears(shared, probe=lambda: shared(x))
    assert isinstance(shared.a, SharedInputPart) and shared.a.shared is shared.b.shared
    assert torch.equal(torch.get_rng_state(), state)


def test_a_probe_that_fails_leaves_one_gemm_per_layer():
    def fail() -> None:
        raise ValueError("this model cannot run the probe")

    model = _Siblings("reads")
    pack_linears(model, probe=fail)
    assert isinstance(model.a, PackedLinear) and isinstance(model.b, PackedLinear)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bfloat16_kernels)])
def test_a_lone_row_gets_the_bits_it_gets_among_others(dtype):
    """oneDNN's one-row kernel sums long rows in another order (1536 inputs or more, on this
    machine), and its kernels for a few rows are slower, so PackedLinear feeds fewer than MIN_ROWS
    rows as that many: one, two or three rows get the bits they get among sixteen."""
    packed = PackedLinear(torch.nn.Linear(2048, 640, bias=False, dtype=dtype))
    x = torch.randn(16, 1, 2048).pow(3).to(dtype)  # heavy-tailed, like activations
    with torch.inference_mode():
        together = packed(x)
        for n in range(1, packed_linear.MIN_ROWS + 1):
            assert all(torch.equal(packed(x[i : i + n]), together[i : i + n]) for i in range(0, 16 - n + 1, n))
        assert torch.equal(packed(x[0, 0]), together[0, 0])  # any layout of one row
        assert torch.equal(packed(x[:3].view(1, 3, 2048)), together[:3].view(1, 3, 640))  # three rows as one sequence


def test_ragged_passes_equal_lone_passes_bit_for_bit_and_plain_ones_closely(runner):
    """On CPU every pass is ragged: the rows' new tokens go through the layers flattened into one
    sequence and each row attends over its own cache (attention.wsd_sdpa). A row gets exactly
    the logits of a pass of its own, whatever shares the pass: decode steps, scoring passes, a
    first prefill, across Gemma 3's 16-position sliding window too; and they match the model's own
    (padded, masked) path. A model whose attention reshapes its cached states (DeepSeek-V3's latent
    keys) fails the load probe and keeps padded batches."""
    vocab = runner.model.config.vocab_size
    rows = [(5, 1, 0), (14, 6, 6), (17, 1, 1), (40, 3, 2), (0, 20, 0)]  # (cached, new, keep)
    new = [_ids(50 + i, n, vocab) for i, (_, n, _) in enumerate(rows)]
    keeps = [keep for _, _, keep in rows]
    assert runner.ragged == (runner.model.config.model_type != "deepseek_v3")
    lone = [runner.extend(kv, ids, keep) for kv, ids, keep in zip(_caches(runner, rows), new, keeps)]
    batched = runner.extend_batch(_caches(runner, rows), new, keeps)
    ragged, runner.ragged = runner.ragged, False
    try:
        plain = [runner.extend(kv, ids, keep) for kv, ids, keep in zip(_caches(runner, rows), new, keeps)]
    finally:
        runner.ragged = ragged
    for a, b, c in zip(lone, batched, plain):
        assert a.shape == b.shape == c.shape
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
        if ragged:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cached", [20, 40])
def test_a_decode_step_with_guesses_gets_the_bits_of_one_id_a_pass(runner, cached):
    """A stepwise row (a decode step and the ids guessed after it, lookup) gives each of its rows,
    and leaves its cache with, the bits that feeding its ids one pass each gives, alone or among
    other rows; 40 cached positions cross Gemma 3's 16-position sliding window. Without stepwise
    attention the rows differ in their last bits (the load probe checks them against plain passes)."""
    if not runner.ragged:
        pytest.skip("padded passes (DeepSeek-V3's latent keys) do not give a row the bits of a pass of its own")
    vocab = runner.model.config.vocab_size
    new = _ids(9, 5, vocab)
    (one_by_one,) = _caches(runner, [(cached, 1, 1)])
    expected = torch.cat([runner.extend(one_by_one, [token], keep=1) for token in new])
    (alone,), (among,) = _caches(runner, [(cached, 5, 5)]), _caches(runner, [(cached, 5, 5)])
    others = _caches(runner, [(7, 1, 0), (12, 6, 6)])
    got_alone = runner.extend(alone, new, keep=5, stepwise=True)
    got_among = runner.extend_batch([others[0], among, others[1]], [[3], new, _ids(4, 6, vocab)], [0, 5, 6], stepwise=[False, True, False])[1]
    assert torch.equal(got_alone, expected) and torch.equal(got_among, expected)
    after = runner.extend(one_by_one, [42])
    assert torch.equal(runner.extend(alone, [42]), after) and torch.equal(runner.extend(among, [42]), after)


def test_a_sliding_window_layer_reads_only_its_window_in_a_ragged_pass():
    """Positions a sliding-window layer can no longer see are not read: NaN written there (in the
    sliding layers only) changes nothing, for a decode step and a scoring pass past the window."""
    runner = ModelRunner(tiny_gemma3(make_tokenizer(420), 1))
    config, vocab = runner.model.config, runner.model.config.vocab_size
    sliding = [i for i, kind in enumerate(config.layer_types) if kind == "sliding_attention"]
    assert runner.ragged and sliding
    for count in (1, 5):
        (clean,), (poisoned,) = _caches(runner, [(40, count, 0)]), _caches(runner, [(40, count, 0)])
        new = _ids(7, count, vocab)
        unseen = 40 - config.sliding_window + 1  # the first new token sees positions from here on
        with torch.inference_mode():
            for buffer in poisoned.store.buffers:
                buffer[sliding, :, :, :unseen] = float("nan")
        expected, got = runner.extend_batch([clean, poisoned], [new, new], [count, count])
        assert torch.isfinite(got).all() and torch.equal(got, expected)


@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "plain"])
def test_a_longrope_row_gets_its_own_frequencies_whatever_runs_beside_it(ragged):
    """Phi-3's longrope picks short or long RoPE frequencies for a whole pass by its longest
    position: a short row batched with one past the bound took the long ones, so its reply
    depended on what ran beside it. Rows on either side run in passes of their own; a failing
    pass still leaves every cache as it was."""
    runner = ModelRunner(tiny_phi3_longrope(make_tokenizer(300), 0))
    runner.ragged = runner.ragged and ragged
    vocab = runner.model.config.vocab_size
    short, long, step = _ids(0, 20, vocab), _ids(1, 100, vocab), [5]
    alone = runner.new_cache()
    expected = [runner.extend(alone, short), runner.extend(alone, step)]
    caches = [runner.new_cache() for _ in range(3)]
    got = runner.extend_batch(caches, [short, long, short[:10]], [0, 0, 0])
    assert torch.equal(got[0], expected[0]) and not torch.equal(got[1], got[0])
    assert torch.equal(runner.extend_batch(caches[:2], [step, step], [0, 0])[0], expected[1])
    logits, calls = runner.head.logits, []

    def second_pass_fails(*args, **kwargs):  # the first side's pass has stored its states
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("no room")
        return logits(*args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(runner.head, "logits", second_pass_fails)
        before = [list(kv.ids) for kv in caches]
        with pytest.raises(MemoryError):
            runner.extend_batch(caches, [step] * 3, [0] * 3)
        assert [kv.ids for kv in caches] == before and len(calls) == 2
        assert all(layer.length == len(kv) for kv in caches for layer in kv.cache.layers)


@pytest.mark.parametrize("where", ["layer", "projection"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "alone"])
@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "plain"])
def test_a_pass_that_fails_midway_leaves_every_cache_as_it_was(monkeypatch, ragged, batch, where):
    """A pass that raises in a layer (the first layers have stored their states) or in the output
    projection (every layer has) leaves each cache as it was, so the engine's retry runs each row
    alone from there and gets what a pass that never failed gives."""
    runner = ModelRunner(tiny_gemma3(make_tokenizer(420), 1))
    assert runner.ragged
    runner.ragged = ragged
    vocab = runner.model.config.vocab_size
    failing, clean = [], []
    for i, n in enumerate([5, 20, 33] if batch else [20]):
        for caches in (failing, clean):
            kv = runner.new_cache()
            runner.extend(kv, _ids(i, n, vocab))
            caches.append(kv)
    ids = [list(kv.ids) for kv in failing]

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no room")

    with monkeypatch.context() as m:
        if where == "layer":
            m.setattr(runner.model.model.layers[1].mlp, "forward", out_of_memory)
        else:
            m.setattr(runner.head, "logits", out_of_memory)
        with pytest.raises(MemoryError):
            if batch:
                runner.extend_batch(failing, [[9]] * len(failing), [0] * len(failing))
            else:
                runner.extend(failing[0], [9, 10])
    assert [kv.ids for kv in failing] == ids
    assert all(layer.length == len(kv) for kv in failing for layer in kv.cache.layers)
    for kv, other in zip(failing, clean):
        assert torch.equal(runner.extend(kv, [9]), runner.extend(other, [9]))


def test_only_cpu_float32_and_bfloat16_weights_are_packed():
    """bfloat16 packs where the CPU has oneDNN kernels for it (an AVX2 CPU has none: no warning, nn.Linear)."""
    assert can_pack(torch.empty(4, 4)) and can_pack(torch.empty(4, 4, dtype=torch.bfloat16)) == packed_linear._cpu_runs_bfloat16()
    assert not can_pack(torch.empty(4, 4, dtype=torch.float16)) and not can_pack(torch.empty(4, 4, device="meta"))


_WITHOUT_BFLOAT16_KERNELS = """
import sys, warnings
import torch
sys.path.insert(0, sys.argv[1])
from tiny import make_tokenizer, tiny_llama
from wsd_llms import output_head, packed_linear
from wsd_llms.model_runner import ModelRunner

output_head.BOUND_WORDS, output_head.MIN_BOUND_VOCAB = 64, 128  # bounds for the tiny vocabulary (and a screen, given the kernels)

warnings.simplefilter("error")  # a 'failed a self-check' warning, say, fails this
assert not packed_linear._cpu_runs_bfloat16()
assert packed_linear.can_pack(torch.empty(4, 4)) and not packed_linear.can_pack(torch.empty(4, 4, dtype=torch.bfloat16))
tied = tiny_llama(make_tokenizer(300), 0)
tied.model.get_output_embeddings().weight = tied.model.get_input_embeddings().weight
with torch.inference_mode():  # the model's own argmax, before the runner packs its layers
    expected = [int(tied.model(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1].argmax())]
float32 = ModelRunner(tied)
assert float32.head._screen is None  # the greedy screen is a bfloat16 copy: none here
assert float32.head.greedy_ids(float32.extend(float32.new_cache(), [5, 6, 7], lazy=True).hidden[-1:], [None]) == expected
bf16 = tiny_llama(make_tokenizer(300), 0)
bf16.model.to(torch.bfloat16).requires_grad_(False)
runner = ModelRunner(bf16)
assert not any(isinstance(m, packed_linear.PackedLinear) for m in bf16.model.modules())
assert torch.isfinite(runner.extend(runner.new_cache(), [5, 6, 7])).all()
print("ok")
"""


def test_a_cpu_without_bfloat16_kernels_keeps_bfloat16_layers_plain_and_quiet():
    """As on an AVX2 CPU, whatever this one has (oneDNN held to AVX2 in a process of its own): float32
    layers still pack, bfloat16 ones stay on nn.Linear with no warning and run, and greedy ids come
    from the full projection, with no screen."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_BFLOAT16_KERNELS, str(Path(__file__).parent)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_second_runner_on_a_packed_model_changes_nothing():
    loaded = tiny_llama(make_tokenizer(300), 0)
    first = ModelRunner(loaded)
    head = loaded.model.get_output_embeddings()
    second = ModelRunner(loaded)
    assert loaded.model.get_output_embeddings() is head
    assert torch.equal(first.extend(first.new_cache(), [5, 6, 7]), second.extend(second.new_cache(), [5, 6, 7]))


def _fw(n: int, keep: int = 0, cached: int = 0) -> Forward:
    kv = KVCache()
    kv.ids = list(range(cached))
    return Forward("base", kv, list(range(n)), keep)


def test_plan_passes_batches_decodes_and_similar_multi_token_passes():
    forwards = [_fw(1), _fw(30, 8), _fw(1), _fw(60), _fw(28, 9), _fw(1), _fw(61)]
    groups = plan_passes(forwards, overhead=16.0, position_cost=0.012)
    as_sizes = sorted(sorted(len(forwards[i].ids) for i in g) for g in groups)
    assert as_sizes == [[1, 1, 1], [28, 30], [60, 61]]
    assert sorted(i for g in groups for i in g) == list(range(len(forwards)))


def test_plan_passes_keeps_a_long_pass_apart_from_decode_steps():
    forwards = [_fw(1), _fw(1), _fw(40, 40)]
    assert sorted(map(sorted, plan_passes(forwards, overhead=16.0, position_cost=0.012))) == [[0, 1], [2]]
    # When a pass's fixed cost dwarfs a token's (a GPU), everything shares one pass.
    assert plan_passes(forwards, overhead=1e6, position_cost=0.012) == [[0, 1, 2]]


def test_plan_passes_decodes_a_long_cache_apart_from_short_ones():
    # Batching copies every row's cache and pads the short ones to the longest: a 3000-position
    # cache would cost each of four short rows far more than its own pass does.
    forwards = [_fw(1, cached=120), _fw(1, cached=3000), _fw(1, cached=90), _fw(1, cached=150), _fw(1, cached=100)]
    assert sorted(map(sorted, plan_passes(forwards, overhead=18.0, position_cost=0.012))) == [[0, 2, 3, 4], [1]]
    # Where copying a position costs nothing next to a pass (position_cost 0), all share one pass;
    # so do all forwards in a ragged pass, which feeds and keeps only what each row asks for.
    assert len(plan_passes(forwards, overhead=18.0, position_cost=0.0)) == 1
    mixed = [*forwards, _fw(40, 40), _fw(12, 3, cached=50)]
    assert plan_passes(mixed, overhead=18.0, position_cost=0.012, ragged=True) == [list(range(7))]


def test_prefill_pieces_cut_long_forwards_at_fixed_points_within_a_step_budget():
    # A long prompt is fed 512 at a time; the rest follows in later steps, cut from where it left off.
    assert prefill_pieces([_fw(1100)], 512) == [512]
    assert prefill_pieces([_fw(588)], 512) == [512]
    assert prefill_pieces([_fw(76)], 512) == [76]
    # The last piece keeps every row the forward asks for, even past the chunk size.
    assert prefill_pieces([_fw(600, 200)], 512) == [600]
    assert prefill_pieces([_fw(1000, 200)], 512) == [512]
    # Pieces share the step's budget: first the forwards this step finishes, then those that go on,
    # each in admission order. The first of each kind always runs; one that does not fit waits
    # whole (its cut points never depend on what else runs); decode steps always run. A short
    # prompt does not wait behind a long one's prefill, nor the long one behind short ones.
    assert prefill_pieces([_fw(1000), _fw(40), _fw(1), _fw(1)], 512) == [512, 40, 1, 1]
    assert prefill_pieces([_fw(40), _fw(1000), _fw(30), _fw(1)], 512) == [40, 512, 30, 1]
    assert prefill_pieces([_fw(300), _fw(250), _fw(1000)], 512) == [300, None, 512]
    assert prefill_pieces([_fw(1000), _fw(1000, cached=512), _fw(600)], 512) == [512, None, None]
    assert prefill_pieces([_fw(1000), _fw(700)], 1024) == [1000, None]
    assert prefill_pieces([_fw(700, 700), _fw(2)], 512) == [700, None]
    # A decode step with ids guessed after it (lookup) runs whole, whatever the budget left.
    guessed = Forward("base", KVCache(), [1, 2, 3, 4, 5], keep=5, guesses=4)
    assert prefill_pieces([_fw(1000), guessed, _fw(40)], 512) == [512, 5, 40]


def test_guess_shares_fit_a_pass_to_its_rows():
    """Guessed ids fill what room a pass has left after every other id: the guesses from the
    longest matches first, one id at a time round those from equally long ones; only a lone
    forward feeds guesses from a match of one id."""
    def guessing(n: int, matched: int = 3) -> Forward:
        return Forward("base", KVCache(), list(range(1 + n)), keep=1 + n, guesses=n, matched=matched)

    assert guess_shares([guessing(4), _fw(1), guessing(2)], 16) == [4, 0, 2]  # room for all
    assert guess_shares([guessing(4)] * 8, 16) == [1] * 8  # 8 decode rows leave 8 ids: one each
    assert guess_shares([guessing(4)] * 9, 16) == [1] * 7 + [0, 0]  # 7 left for 9
    assert guess_shares([guessing(4)] * 3 + [_fw(1)], 12) == [3, 3, 2, 0]  # 8 left for 3
    ranked = [guessing(4, matched=1), guessing(4, matched=3), guessing(2, matched=2), guessing(4, matched=3)] + [_fw(1)] * 6
    assert guess_shares(ranked, 16) == [0, 3, 0, 3] + [0] * 6  # 6 left: the 3-id matches' first
    assert guess_shares(ranked, 20) == [0, 4, 2, 4] + [0] * 6  # 10 left: then the 2-id match's
    assert guess_shares(ranked, 40) == [0, 4, 2, 4] + [0] * 6  # never the 1-id match's in a shared pass
    assert guess_shares([guessing(4, matched=1)], 16) == [4]  # but alone
    assert guess_shares([guessing(4), _fw(40)], 16) == [0, 0]  # a prefill piece leaves no room
    assert guess_shares([_fw(1), _fw(3, 3)], 16) == [0, 0]


def test_the_engine_shares_guess_room_after_prompts_are_cut_in_pieces():
    """A prompt that waits to be fed whole counts only the piece that runs this step: a 4-id piece
    of a 300-id prompt leaves a guessing decode step its room (16 - 4 - 1 = 11 ids); the trimmed
    forward is what the sequence now waits on."""
    from types import SimpleNamespace

    from wsd_llms.engine import Engine

    prompt = _fw(300)
    piece = Forward("base", prompt.kv, prompt.ids[:4], keep=0, lazy=True)
    decode = Forward("base", KVCache(), list(range(13)), keep=13, guesses=12, matched=3)
    waiting, guessing = SimpleNamespace(pending=prompt), SimpleNamespace(pending=decode)
    runs = Engine._share_guesses([(waiting, piece), (guessing, decode)])
    assert [forward.guesses for _, forward in runs] == [0, 11] and runs[0][1] is piece
    assert guessing.pending is runs[1][1] and guessing.pending.ids == list(range(12)) and waiting.pending is prompt


def test_prompts_are_also_cut_where_their_messages_end():
    """A mark (a message's end) cuts a piece when it lies at least MIN_PIECE past the piece's start
    and before the next multiple of the chunk; the cuts run from position 0, so two prompts that
    start alike are cut alike there."""
    def cuts(marks: tuple[int, ...]) -> list[int]:
        found = [piece_end(0, marks, 256)]
        while found[-1] < 300:
            found.append(piece_end(found[-1], marks, 256))
        return found

    marks = (10, 40, 70, 90, 300)  # MIN_PIECE is 32
    assert [piece_end(p, marks, 256) for p in (0, 40, 70, 256)] == [40, 90, 256, 300]
    assert cuts(marks) == [40, 90, 256, 300]
    assert cuts(marks[:3]) == [40, 256, 512]  # fewer messages: cut alike up to the last mark it keeps (40)
    # A piece cut at a mark just short of a multiple of the chunk passes over it: no pass of 3 ids.
    assert cuts((253, 280, 520)) == [253, 512]  # 280 is too close to 253 to cut, as 256 is
    assert cuts((253, 290)) == [253, 290, 512]
    assert cuts((100, 230, 500)) == [100, 230, 500]
    # prefill_pieces cuts there, from where the cache ends; the last piece keeps its rows.
    assert prefill_pieces([_fw(95)], 256, [marks]) == [40]
    assert prefill_pieces([_fw(55, cached=40)], 256, [marks]) == [50]
    assert prefill_pieces([_fw(52, 3, cached=40)], 256, [marks]) == [52]  # 2 ids past the mark: fewer than the rows kept
    assert prefill_pieces([_fw(95)], 256, [()]) == [95]
    # A lazy forward is cut at a mark among its rows too (a scoring pass's prompt end, where the
    # next turn's pieces are cut), the piece before keeping its share of them; at the grid it is not.
    scoring = replace(_fw(52, 3, cached=40), lazy=True)
    assert prefill_pieces([scoring], 256, [marks]) == [50] and piece_rows(scoring, 50) == 1
    assert prefill_pieces([_fw(3000), scoring], 256, [(), marks]) == [256, 50]  # it gives rows: not behind a long prompt's piece
    assert prefill_pieces([replace(_fw(56, 5, cached=202), lazy=True)], 256, [marks]) == [56]  # 256 is no mark


def test_growing_cache_equals_transformers_cache_across_growth_and_crops():
    """KVCache appends in place and doubles its buffer; feeding past several doublings, with crops
    between, gives the logits of transformers' own concatenating DynamicCache."""
    from transformers import DynamicCache

    runner = ModelRunner(tiny_gemma3(make_tokenizer(420), 1))
    ids = _ids(7, 160, runner.model.config.vocab_size)
    ours, plain = runner.new_cache(), runner.new_cache()
    plain.cache = DynamicCache()  # DynamicLayer: a concatenation per append
    for kv in (ours, plain):
        runner.extend(kv, ids[:20])
    step = 20
    while step < len(ids):
        for kv in (ours, plain):
            if step % 50 == 0:
                kv.crop(step - 5)
        start = len(ours)
        a, b = runner.extend(ours, ids[start : start + 3], keep=3), runner.extend(plain, ids[start : start + 3], keep=3)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        step = len(ours)
    assert ours.store.buffers is not None and ours.store.buffers[0].shape[-2] >= len(ours) > 64


def test_kv_store_grows_by_doubling_and_refuses_mismatched_layers():
    """All layers share one key buffer and one value buffer (their head sizes may differ, as in
    DeepSeek-style attention); they double when full, keep what they held, and a layer whose
    key/value shape differs from the others gets a clear error instead of a silent mix-up."""

    store = KVStore(num_layers=3)
    keys, values = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 6)
    first = store.room(40, keys, values)
    assert first[0].shape == (3, 1, 2, 80, 8) and first[1].shape == (3, 1, 2, 80, 6)
    first[0][1, :, :, :40] = keys
    first[1][1, :, :, :40] = values
    assert store.room(80, keys, values) is first  # fits: no copy
    grown = store.room(81, keys, values)
    assert grown[0].shape[-2] == 162 and torch.equal(grown[0][1, :, :, :40], keys) and torch.equal(grown[1][1, :, :, :40], values)
    with pytest.raises(ValueError, match=r"\(1, 4, 1, 8\) do not fit a cache of 2 heads of size 8"):
        store.room(82, torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 6))


def test_kv_store_spare_room_stops_at_its_limit():
    """A sequence's cache never reserves more than the sequence can hold, so max_cached_tokens
    bounds the memory the caches take, not half of it; asked for more, it still grows."""

    store = KVStore(num_layers=2, limit=100)
    keys, values = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    assert store.room(40, keys, values)[0].shape[-2] == 80
    assert store.room(81, keys, values)[0].shape[-2] == 100  # not 162
    assert store.room(101, keys, values)[0].shape[-2] == 101


def test_sequence_caches_are_limited_to_what_the_request_can_hold():
    from wsd_llms.engine import Engine
    from wsd_llms.messages import normalize_messages
    from wsd_llms.params import parse_params
    from wsd_llms.scheduler import token_budget

    model = tiny_llama(make_tokenizer(300), 0)
    engine = Engine(model, model)
    seq = engine.prepare(normalize_messages([{"role": "user", "content": "Hi"}]), parse_params(max_tokens=20, max_draft_tokens=30), print)
    limits = seq.cache_limits()
    assert limits["draft"] == len(seq.prompts.draft_ids) + 30 and limits["base"] == len(seq.prompts.base_ids) + 21
    assert seq.new_cache("draft").store.limit == limits["draft"]
    assert token_budget(seq) == limits["draft"] + limits["base"]  # what admission reserves, online
    # The draft model alone writes its whole reply into the draft cache: max_tokens, not max_draft_tokens.
    alone = engine.prepare(normalize_messages([{"role": "user", "content": "Hi"}]), parse_params(max_tokens=20, max_draft_tokens=512, mode="draft"), print)
    assert token_budget(alone) == alone.cache_limits()["draft"] == len(alone.prompts.draft_ids) + 20
    # The staged pipeline frees each cache before it makes the next: it reserves the largest. Its
    # check holds the draft's first max_tokens base ids at most.
    staged = engine.prepare(normalize_messages([{"role": "user", "content": "Hi"}]), parse_params(max_tokens=20, max_draft_tokens=30, mode="staged"), print)
    limits = staged.cache_limits()
    assert limits["check"] == len(staged.prompts.base_ids) + 20 and token_budget(staged) == max(limits.values()) < sum(limits.values())


def test_failed_batch_leaves_every_row_as_it_was(runner, monkeypatch):
    """If handing the new states back fails (say, out of memory while making one row's cache: the
    first row's is empty), no row has changed: each can then be run alone, as the engine's retry
    does, with the logits of a pass that never failed."""

    vocab = runner.model.config.vocab_size
    new = [_ids(100 + i, n, vocab) for i, (_, n, _) in enumerate(ROWS)]
    keeps = [k for _, _, k in ROWS]
    failing, clean = _caches(runner), _caches(runner)
    target = failing[0].store
    room = KVStore.room

    def out_of_memory(store, end, keys, values):
        if store is target:
            raise MemoryError("no room")
        return room(store, end, keys, values)

    lengths = [len(kv) for kv in failing]
    with monkeypatch.context() as m:
        m.setattr(KVStore, "room", out_of_memory)
        with pytest.raises(MemoryError):
            runner.extend_batch(failing, new, keeps)
    assert [len(kv) for kv in failing] == lengths
    assert all(layer.length == len(kv) for kv in failing for layer in kv.cache.layers)
    for kv, other, ids, keep in zip(failing, clean, new, keeps):
        torch.testing.assert_close(runner.extend(kv, ids, keep), runner.extend(other, ids, keep), atol=1e-5, rtol=1e-5)


def test_cuda_passes_leave_out_cudnn_attention_and_cpu_passes_change_nothing():
    """cuDNN attention costs about 1 ms of CPU per call (H200 profile), so CUDA passes run without it;
    the choice is restored afterwards and CPU passes leave the settings alone."""
    flags = torch.backends.cuda

    def enabled() -> tuple[bool, bool, bool, bool]:  # cuDNN, flash, memory-efficient, math
        return flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled(), flags.math_sdp_enabled()

    before = enabled()
    with attention_backends(torch.device("cuda")):
        assert enabled() == (False, True, True, True)
    with attention_backends(torch.device("cpu")):
        assert enabled() == before
    assert enabled() == before
