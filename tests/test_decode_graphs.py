"""Slot passes (decode_graphs): a decode step or short scoring pass over fixed slots, as CUDA graphs
replay it, gives what a plain pass gives. Run eagerly here on CPU (capture=False); tests/test_gpu.py
replays the graphs."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tiny import make_tokenizer, tiny_deepseek, tiny_gemma3, tiny_llama, tiny_phi3_longrope

from wsd_llms.attention import WSD_SDPA, SlotLayout
from wsd_llms import decode_graphs
from wsd_llms.decode_graphs import MAX_SLOT_BYTES, MAX_WIDTH, MIN_CAPACITY, bucket
from wsd_llms.model_runner import ModelRunner
from wsd_llms.output_head import HeadRows
from wsd_llms.runtime import WSDRuntime

MODELS = {
    "llama": lambda: tiny_llama(make_tokenizer(300), 0),
    "gemma3": lambda: tiny_gemma3(make_tokenizer(420), 1),  # sliding windows of 16: the rows below cross them
    "deepseek": lambda: tiny_deepseek(make_tokenizer(300), 2),  # keys and values of different sizes
}


def on_slots(runner: ModelRunner) -> ModelRunner:
    """The runner with its decode steps and scoring passes on slot passes, run eagerly (no CUDA here)."""
    runner.ragged = False
    runner.model.set_attn_implementation(WSD_SDPA)
    runner.graphs = runner._new_graphs(capture=False)
    return runner


def slot_runner(loaded) -> ModelRunner:
    return on_slots(ModelRunner(loaded))


def _ids(seed: int, n: int, vocab: int = 280) -> list[int]:
    return torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rows(plain: ModelRunner, slots: ModelRunner, lengths: tuple[int, ...] | list[int]) -> dict[str, list]:
    """Caches of these lengths, holding the same ids, on both runners: {"plain": [...], "slots": [...]}."""
    caches = {}
    for name, runner in (("plain", plain), ("slots", slots)):
        caches[name] = [runner.new_cache() for _ in lengths]
        for i, (kv, n) in enumerate(zip(caches[name], lengths)):
            runner.extend(kv, _ids(i, n))
    return caches


def _pass(plain: ModelRunner, slots: ModelRunner, caches: dict, rows: list[int], new: list[list[int]], keeps: list[int] | None = None) -> list:
    """One batched pass over `rows` on both runners: the slot runner's logits equal the plain one's.
    Returns the slot runner's."""
    keeps = keeps or [0] * len(rows)
    expected = plain.extend_batch([caches["plain"][i] for i in rows], new, keeps)
    got = slots.extend_batch([caches["slots"][i] for i in rows], new, keeps)
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    return got


def decode_and_compare(plain: ModelRunner, slots: ModelRunner) -> None:
    """Three rows of different lengths through 8 batched decode steps, then one row alone (lazily),
    then scoring passes of rows padded to their pass's width, alone and batched: the slot runner's
    logits equal the plain runner's throughout."""
    lengths = [5, 30, MIN_CAPACITY - 6]  # the last row outgrows the first capacity: the slots are reallocated
    caches = _rows(plain, slots, lengths)
    for step in range(8):
        _pass(plain, slots, caches, [0, 1, 2], [[i] for i in _ids(50 + step, len(lengths))], [step % 2, 0, 1])
    assert slots.graphs is not None, "the slot passes fell back to plain ones"
    assert slots.graphs.buffers is not None and slots.graphs.buffers.capacity == 2 * MIN_CAPACITY
    assert set(slots.graphs.passes) == {(4, 1, 2 * MIN_CAPACITY)}  # the passes over the old buffers are gone

    # One row alone (a batch of one), lazily: the same rows.
    expected = plain.extend(caches["plain"][1], [7], keep=1)
    lazy = slots.extend(caches["slots"][1], [7], keep=1, lazy=True)
    assert isinstance(lazy, HeadRows)
    assert set(slots.graphs.passes) == {(4, 1, 2 * MIN_CAPACITY), (1, 1, MIN_CAPACITY)}  # its own capacity, in the slots as they are
    with torch.inference_mode():  # as the engine projects lazy rows (the head's weights require grad)
        torch.testing.assert_close(lazy.head.logits(lazy.hidden), expected, atol=1e-4, rtol=1e-4)

    # Scoring passes: one row of 3 ids (width 8), then rows of 1, 10 and 3 ids (width 32), each
    # keeping some of its rows (a decode step's last row, 0, among them).
    passes = [([1], [[3, 4, 5]], [3]), ([0, 1, 2], [[6], _ids(7, 10), [8, 9, 10]], [0, 2, 3])]
    for rows, new, keeps in passes:
        _pass(plain, slots, caches, rows, new, keeps)
    assert {(1, 8, MIN_CAPACITY), (4, 32, 2 * MIN_CAPACITY)} <= set(slots.graphs.passes)

    # The rows' own caches took the slot passes' states: plain passes over them agree too.
    graphs, slots.graphs = slots.graphs, None
    for a, b in zip(caches["plain"], caches["slots"]):
        assert a.ids == b.ids
        torch.testing.assert_close(slots.extend(b, [3, 4, 5], keep=3), plain.extend(a, [3, 4, 5], keep=3), atol=1e-4, rtol=1e-4)
    slots.graphs = graphs


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_slot_decode_steps_equal_plain_passes(kind):
    decode_and_compare(ModelRunner(MODELS[kind]()), slot_runner(MODELS[kind]()))


@pytest.mark.filterwarnings("error")
def test_a_model_whose_attention_reads_the_cached_states_keeps_plain_passes(caplog):
    """DeepSeek-V3's attention reads the shape of the states the cache hands it; the first slot pass
    fails, and its decode steps stay plain, with the same logits, after one logged warning (logged:
    it comes from the worker thread, where a warnings filter of "error" would end the worker)."""
    plain, slots = ModelRunner(MODELS["deepseek"]()), slot_runner(MODELS["deepseek"]())
    a, b = plain.new_cache(), slots.new_cache()
    plain.extend(a, [5, 6, 7])
    slots.extend(b, [5, 6, 7])
    with caplog.at_level(logging.WARNING, logger="wsd_llms"):
        got = slots.extend(b, [8])
        assert slots.graphs is None
        torch.testing.assert_close(got, plain.extend(a, [8]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(slots.extend(b, [9]), plain.extend(a, [9]), atol=1e-4, rtol=1e-4)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("wsd_llms")]
    assert len(said) == 1 and said[0].startswith("tiny-deepseek: passes run without CUDA graphs")  # no second one


def test_which_passes_take_slot_passes():
    runner = slot_runner(MODELS["llama"]())
    kv = runner.new_cache()
    assert not runner.graphs.takes([kv], [[5]], [0])  # no cache yet to shape the slots after
    runner.extend(kv, [5, 6, 7])
    assert runner.graphs.passes == {}
    assert runner.graphs.takes([kv], [[5]], [1])
    assert runner.graphs.takes([kv, kv], [[5, 6], [7]], [2, 0])  # a scoring pass beside a decode step
    assert runner.graphs.takes([kv], [[5] * MAX_WIDTH], [MAX_WIDTH])
    assert not runner.graphs.takes([kv], [[5] * (MAX_WIDTH + 1)], [0])  # longer: a prompt's prefill
    assert not runner.graphs.takes([kv], [[5]], [2])
    runner.graphs.max_positions = len(kv) + 8
    assert runner.graphs.takes([kv], [[5, 6]], [0]) and not runner.graphs.takes([kv], [[5] * 9], [0])  # padding past the context window
    runner.graphs.max_positions = runner.loaded.context_window
    many = [kv] * (MAX_SLOT_BYTES // (runner.graphs.buffers.position_bytes * MIN_CAPACITY) + 1)  # more than the slots may hold
    assert not runner.graphs.takes(many, [[5]] * len(many), [0] * len(many))
    runner.head = runner.head.identity()  # a model that keeps its own head: decode steps only
    decode_only = runner._new_graphs(capture=False)
    assert decode_only.max_width == 1 and not decode_only.takes([kv], [[5, 6]], [0]) and decode_only.takes([kv], [[5]], [0])


def test_a_step_takes_slots_by_its_own_shape_whatever_came_before(monkeypatch):
    """Slots kept from a long row alone do not keep a batch of short rows off them: where both
    shapes together would pass MAX_SLOT_BYTES, the slots are remade to the step's own shape."""
    plain, slots = ModelRunner(MODELS["llama"]()), slot_runner(MODELS["llama"]())
    caches = _rows(plain, slots, (600, 10, 20, 300))
    assert slots.graphs.takes(caches["slots"][:1], [[3]], [0])  # which shapes the slots after the rows' caches
    monkeypatch.setattr(decode_graphs, "MAX_SLOT_BYTES", slots.graphs.buffers.position_bytes * 1024)
    steps = [  # (rows, the slots' shape after the step, the passes made over them)
        ([0], (1, 1024), {(1, 1, 1024)}),
        ([1, 2], (2, 256), {(2, 1, 256)}),  # with the last slots, 2 x 1024: over the limit
        ([3], (2, 512), {(1, 1, 512)}),  # with the last slots, 2 x 512: allowed, and kept
        ([1, 2], (2, 512), {(1, 1, 512), (2, 1, 256)}),
    ]
    for rows, shape, made in steps:
        _pass(plain, slots, caches, rows, [[i + 3] for i in rows])
        assert (slots.graphs.buffers.slots, slots.graphs.buffers.capacity) == shape and set(slots.graphs.passes) == made


def test_what_an_earlier_row_left_in_a_slot_cannot_reach_the_next():
    """A non-finite state left past a row's length by the slot's earlier occupant (an overflow in
    another request) is masked out and zeroed before the next row reads the slot."""
    plain, slots = ModelRunner(MODELS["llama"]()), slot_runner(MODELS["llama"]())
    caches = _rows(plain, slots, (100, 10))
    slots.extend(caches["slots"][0], [3])  # the long row takes slot 0
    plain.extend(caches["plain"][0], [3])
    with torch.inference_mode():  # as if its states had overflowed there
        slots.graphs.buffers.keys[:, 0, :, 50:101] = float("nan")
        slots.graphs.buffers.values[:, 0, :, 50:101] = float("inf")
    got = slots.extend(caches["slots"][1], [4])  # the short row takes slot 0 next
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, plain.extend(caches["plain"][1], [4]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_padding_cannot_reach_the_rows_it_pads(kind):
    """A row padded to its pass's width, and the spare rows of a batch bucket, feed id 0, whose states
    need not be finite (here its embedding is NaN; plain passes never feed it): they write zeros, so
    the rows' own logits stay those of plain passes, in that pass and in later ones over the slots."""
    plain, slots = ModelRunner(MODELS[kind]()), slot_runner(MODELS[kind]())
    for runner in (plain, slots):
        with torch.no_grad():
            runner.model.get_input_embeddings().weight[0] = float("nan")
    caches = _rows(plain, slots, (20, 21, 22))
    passes = [  # (rows, new ids, keeps, the slot pass's shape): 1 row, then 3 (one spare slot), widths 8, 8 and 1
        ([0], [[11, 12, 13]], [3], (1, 8, MIN_CAPACITY)),
        ([0, 1, 2], [[14], [15, 16], [17]], [0, 2, 1], (4, 8, MIN_CAPACITY)),
        ([2, 0, 1], [[18], [19], [20]], [0, 0, 0], (4, 1, MIN_CAPACITY)),
    ]
    for rows, new, keeps, shape in passes:
        got = _pass(plain, slots, caches, rows, new, keeps)
        assert shape in slots.graphs.passes
        assert all(torch.isfinite(g).all() for g in got)


def test_rows_stay_in_their_slots_until_their_caches_change():
    stay_and_compare(ModelRunner(MODELS["llama"]()), slot_runner(MODELS["llama"]()))


def stay_and_compare(plain: ModelRunner, slots: ModelRunner) -> None:
    """A row whose slot holds its cache as it is keeps that slot without a copy, in any order among
    other rows; a crop or a plain pass makes the slot copy it again; and a spare slot's padding,
    written over a row left out of the pass, makes that row's slot copy again. Throughout, the slot
    runner's logits equal the plain runner's."""
    caches = _rows(plain, slots, (20, 30, MIN_CAPACITY - 6, 40))
    _pass(plain, slots, caches, [0, 1], [[5], [6]])
    _pass(plain, slots, caches, [0, 1], [[21, 22], [23]], [2, 0])  # each pass shape made (which runs it once) before the test
    taken = {i: slots.graphs.resident.index(next(e for e in slots.graphs.resident if e and e[0]() is caches["slots"][i])) for i in (0, 1)}
    # The rows' own caches are not read again while their slots hold them: spoil them (slots only).
    own = [caches["slots"][i].store.buffers for i in (0, 1)]
    saved = [(k[..., : len(caches["slots"][i]), :].clone(), v[..., : len(caches["slots"][i]), :].clone()) for i, (k, v) in enumerate(own)]
    with torch.inference_mode():
        for k, v in own:
            k.fill_(float("nan"))
            v.fill_(float("nan"))
    _pass(plain, slots, caches, [1, 0], [[7], [8]])  # the other order: the same slots
    _pass(plain, slots, caches, [0, 1], [[9, 10, 11], [12]], [3, 0])  # a scoring pass beside a decode step
    with torch.inference_mode():
        for (k, v), (k0, v0) in zip(own, saved):  # their states back, and the new ones from the slots
            n = k0.shape[-2]
            k[..., :n, :], v[..., :n, :] = k0, v0
    for i in (0, 1):
        assert slots.graphs._holds(taken[i], caches["slots"][i])
    # A crop only shortens a cache: its slot still holds it. A plain pass (a prompt piece of 40 ids) writes to it.
    for name, runner in (("plain", plain), ("slots", slots)):
        caches[name][0].crop(18)
        runner.extend(caches[name][1], _ids(5, 40))
    assert slots.graphs._holds(taken[0], caches["slots"][0]) and not slots.graphs._holds(taken[1], caches["slots"][1])
    _pass(plain, slots, caches, [0, 1], [[13], [14]])
    # A row left out of a pass: the spare slot's padding goes past its states, where there is room.
    _pass(plain, slots, caches, [0, 1, 2, 3], [[15], [16], [17], [18]])  # four slots of 256 positions
    _pass(plain, slots, caches, [0, 1, 3], [[19, 20], [21], [22]], [2, 0, 0])  # its shape made
    _pass(plain, slots, caches, [0, 1, 2, 3], [[23], [24], [25], [26]])  # every row in its slot again
    held = [next(s for s in range(4) if slots.graphs._holds(s, kv)) for kv in caches["slots"]]
    _pass(plain, slots, caches, [1, 2, 3], [[35], [36], [37]])  # row 0's slot spare, with room past it
    assert slots.graphs._holds(held[0], caches["slots"][0])
    _pass(plain, slots, caches, [0, 1, 3], [[27, 28], [29], [30]], [2, 0, 0])  # width 8: the long row's slot spare, with no room
    assert not slots.graphs._holds(held[2], caches["slots"][2])
    _pass(plain, slots, caches, [2, 0, 1, 3], [[31], [32], [33], [34]])


def test_no_position_fed_passes_the_context_window():
    """Padding, a spare slot's too, stays within the model's context window even where the slots are
    longer (a table of learned positions has no row past it)."""
    slots = slot_runner(MODELS["llama"]())
    kvs = [slots.new_cache() for _ in range(4)]
    for i, kv in enumerate(kvs):
        slots.extend(kv, _ids(i, (20, 195, 30, 40)[i]))
    slots.graphs.max_positions = 200
    slots.extend_batch(kvs, [[1], [2], [3], [4]], [0] * 4)  # slots of 256 positions
    slots.extend_batch([kvs[0], kvs[2], kvs[3]], [[5, 6], [7], [8]], [0] * 3)  # width 8: the long row's slot spare, without room
    assert slots.graphs.passes
    for slot_pass in slots.graphs.passes.values():
        assert int(slot_pass.inputs[1].max()) < 200


def test_a_longrope_row_on_slots_gets_its_own_frequencies_whatever_pads_it():
    """A decode row 60 positions in (a tiny Phi-3's bound is 64) batched with a 9-id scoring row:
    padded to the bucket of 32, its slot reached position 91, and the whole pass took the long
    frequencies. Padding stays below the bound, so that pass runs plain, and the row gets what
    it gets alone."""
    loaded = tiny_phi3_longrope(make_tokenizer(300), 0)
    plain, slots = ModelRunner(loaded), slot_runner(loaded)
    plain.ragged = False
    vocab = loaded.model.config.vocab_size

    def decode_step(runner, beside):
        kvs = [runner.new_cache(), runner.new_cache()]
        runner.extend_batch(kvs, [_ids(0, 60, vocab), _ids(1, 10, vocab)], [0, 0])
        return runner.extend_batch(kvs[: 1 + bool(beside)], [[5], beside][: 1 + bool(beside)], [1, len(beside)][: 1 + bool(beside)])[0]

    alone = decode_step(plain, [])
    assert torch.allclose(decode_step(slots, _ids(2, 9, vocab)), alone, atol=1e-5)
    assert torch.allclose(decode_step(slots, [7]), alone, atol=1e-5) and slots.graphs.passes  # unpadded: on slots


def test_passes_over_old_slots_are_freed_with_them():
    """Remaking the slots drops the passes captured over the old ones, and with them the last
    references to the old buffers, at once (not at the next garbage collection)."""
    import gc
    import weakref

    slots = slot_runner(MODELS["llama"]())
    kv = slots.new_cache()
    slots.extend(kv, _ids(0, 10))
    slots.extend(kv, [5])
    old = weakref.ref(next(iter(slots.graphs.passes.values())))
    gc.disable()
    try:
        slots.extend(kv, _ids(1, 250))  # a prompt piece: plain
        slots.extend(kv, [6])  # past the first capacity: the slots are remade
        assert slots.graphs.buffers.capacity == 2 * MIN_CAPACITY and old() is None
    finally:
        gc.enable()


def test_slots_that_cannot_be_made_leave_that_step_plain_and_are_made_again(monkeypatch):
    """Out of memory while the slots are remade: that step runs plain, the slots are left empty
    rather than claiming a size they lack, and RETRY_AFTER steps on they are made again."""
    monkeypatch.setattr(decode_graphs, "RETRY_AFTER", 2)
    plain, slots = ModelRunner(MODELS["llama"]()), slot_runner(MODELS["llama"]())
    a, b = plain.new_cache(), slots.new_cache()
    plain.extend(a, _ids(0, 5))
    slots.extend(b, _ids(0, 5))
    new_zeros = torch.Tensor.new_zeros

    def out_of_memory(*args, **kwargs):
        monkeypatch.setattr(torch.Tensor, "new_zeros", new_zeros)  # once
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch.Tensor, "new_zeros", out_of_memory)
    torch.testing.assert_close(slots.extend(b, [8]), plain.extend(a, [8]), atol=1e-4, rtol=1e-4)
    assert slots.graphs is not None and slots.graphs.buffers.slots == 0 and not slots.graphs.passes
    torch.testing.assert_close(slots.extend(b, [9]), plain.extend(a, [9]), atol=1e-4, rtol=1e-4)
    assert slots.graphs.buffers.slots == 0  # the step after: plain
    torch.testing.assert_close(slots.extend(b, [10]), plain.extend(a, [10]), atol=1e-4, rtol=1e-4)
    assert slots.graphs.buffers.slots == 1 and set(slots.graphs.passes) == {(1, 1, MIN_CAPACITY)}
    assert b.ids == a.ids


@pytest.mark.parametrize("where", ["pass", "hand_back"])
def test_running_out_of_memory_in_a_slot_pass_backs_off_its_shape(monkeypatch, where):
    """Out of memory in a pass over slots that were made and captured (in the forward, or making room
    in the rows' caches for the new states): that step runs plain, with every cache as it was, and
    so does its shape for RETRY_AFTER steps instead of failing again each step; then it runs on slots."""
    monkeypatch.setattr(decode_graphs, "RETRY_AFTER", 2)
    plain, slots = ModelRunner(MODELS["llama"]()), slot_runner(MODELS["llama"]())
    a, b = plain.new_cache(), slots.new_cache()
    plain.extend(a, _ids(0, 5))
    slots.extend(b, _ids(0, 5))
    torch.testing.assert_close(slots.extend(b, [7]), plain.extend(a, [7]), atol=1e-4, rtol=1e-4)  # the pass is made
    slot_pass = slots.graphs.passes[(1, 1, MIN_CAPACITY)]
    run, append, tried = slot_pass.run, decode_graphs.append_states, []

    def failing(real):
        def attempt(*args, **kwargs):
            tried.append(len(b))
            if len(b) == 6:  # the first step below
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(*args, **kwargs)

        return attempt

    if where == "pass":
        monkeypatch.setattr(slot_pass, "run", failing(run))
    else:
        monkeypatch.setattr(decode_graphs, "append_states", failing(append))
    for step in (8, 9, 10):
        torch.testing.assert_close(slots.extend(b, [step]), plain.extend(a, [step]), atol=1e-4, rtol=1e-4)
        assert b.ids == a.ids
    assert tried == [6, 8]  # the step after the failure ran plain without trying the slots; the next, on them


def test_running_out_of_memory_while_capturing_runs_that_step_plain(monkeypatch):
    """Out of memory while a pass is first captured is no reason to give up graphs: that step runs
    plain (and its shape keeps to plain steps for RETRY_AFTER steps), then it is captured again."""
    monkeypatch.setattr(decode_graphs, "RETRY_AFTER", 2)
    plain, slots = ModelRunner(MODELS["llama"]()), slot_runner(MODELS["llama"]())
    a, b = plain.new_cache(), slots.new_cache()
    plain.extend(a, _ids(0, 5))
    slots.extend(b, _ids(0, 5))
    forward, failures = slots.graphs.forward, []

    def out_of_memory_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            try:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            except torch.OutOfMemoryError as error:
                raise RuntimeError("capture failed") from error  # as a capture ended by the error may say
        return forward(*args, **kwargs)

    slots.graphs.forward = out_of_memory_once
    for step, captured in ((8, False), (9, False), (10, True)):
        torch.testing.assert_close(slots.extend(b, [step]), plain.extend(a, [step]), atol=1e-4, rtol=1e-4)
        assert slots.graphs is not None and bool(slots.graphs.passes) == captured
    assert b.ids == a.ids and set(slots.graphs.passes) == {(1, 1, MIN_CAPACITY)}


def test_a_step_over_slots_is_checked_against_a_plain_step_before_graphs_are_used(monkeypatch):
    """At load on CUDA, eager passes over slots (a decode step, a padded scoring pass) must give plain passes' logits: Llama and Gemma 3
    do; DeepSeek-V3 (its attention reads the states' shape) and broken slot attention do not."""
    for kind in ("llama", "gemma3"):
        assert ModelRunner(MODELS[kind]())._slots_match()
    assert not ModelRunner(MODELS["deepseek"]())._slots_match()
    runner = ModelRunner(MODELS["llama"]())
    monkeypatch.setattr(SlotLayout, "mask", lambda self, window, groups=1: torch.ones(len(self.positions), 1, groups * self.positions.shape[1], self.capacity, dtype=torch.bool))
    assert not runner._slots_match()  # every slot position seen, written or not


def test_graphs_are_for_cuda_unless_turned_off(monkeypatch):
    assert not decode_graphs.enabled(torch.device("cpu"))
    assert decode_graphs.enabled(torch.device("cuda"))
    monkeypatch.setenv("WSD_LLMS_CUDA_GRAPHS", "0")
    assert not decode_graphs.enabled(torch.device("cuda"))
    assert ModelRunner(MODELS["llama"]()).graphs is None  # on CPU, ragged passes


def test_buckets_are_powers_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 9, 16, 17)] == [1, 2, 4, 4, 8, 16, 16, 32]
    assert bucket(3, MIN_CAPACITY) == MIN_CAPACITY and bucket(MIN_CAPACITY + 1, MIN_CAPACITY) == 2 * MIN_CAPACITY


def _slotted(rt: WSDRuntime) -> WSDRuntime:
    """The runtime with both models' decode steps and scoring passes on eager slot passes, as on CUDA without capture."""
    for runner in rt.load().runners.values():
        on_slots(runner)
    return rt


@pytest.mark.parametrize("lookup", [0, 4])
@pytest.mark.parametrize("base", ["same-weights", "gemma3"])
def test_the_engine_on_slot_passes(draft_tokenizer, base, lookup):
    """The whole engine on slot passes: 8 concurrent greedy requests reply as they do one at a time,
    online as staged, and as on the CPU's own passes; decode steps and scoring passes took slots
    (with the same-weights base, which agrees with the draft, replies switch and the base's decode
    steps take slots too). With prompt lookup (engine.LOOKUP_TOKENS) a decode step that feeds
    guessed ids takes a pass 8 ids wide."""
    draft = lambda: tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0)  # noqa: E731
    bases = {
        "same-weights": lambda: tiny_llama(draft_tokenizer, 0, "tiny-base", sharpen=3.0),
        "gemma3": lambda: tiny_gemma3(make_tokenizer(420), 1, "tiny-gemma3", sharpen=3.0),
    }
    slotted = _slotted(WSDRuntime.from_models(draft(), bases[base](), lookup_tokens=lookup))
    plain = WSDRuntime.from_models(draft(), bases[base](), lookup_tokens=lookup)
    step = 1 if lookup == 0 else 8  # a decode step's width: one id, or one and its guesses
    try:
        jobs = [[{"role": "user", "content": f"Tell me about topic {i}. " * (1 + i % 3)}] for i in range(8)]
        budget = {"max_tokens": 32, "max_draft_tokens": 48}  # staged drafts past the budget, not to 512
        alone = [slotted.generate(m, **budget) for m in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda m: slotted.generate(m, **budget), jobs))
        assert [r.text for r in together] == [r.text for r in alone]
        assert [r.text for r in alone] == [slotted.generate(m, **budget, mode="staged").text for m in jobs]
        assert [r.text for r in alone] == [plain.generate(m, **budget).text for m in jobs]
        assert slotted.stats().peaks["draft_batch"] > 1
        widths = {name: {shape[1] for shape in runner.graphs.passes} for name, runner in slotted.engine.runners.items() if runner.graphs is not None}
        assert step in widths["draft"] and max(widths["base"]) > 1  # decode steps, and the base's scoring passes
        assert (slotted.stats().prompt_lookup["fed"] > 0) == (lookup > 0)
        if base == "same-weights":
            assert any(r.switch_point is not None for r in alone) and step in widths["base"]
    finally:
        slotted.close()
        plain.close()
