"""Prompt prefixes kept across requests: restored pieces equal fed ones, within a bounded store."""

from __future__ import annotations

import torch
from tiny import make_tokenizer, tiny_gemma3

from wsd_llms.model_runner import ModelRunner
from wsd_llms.prefix_cache import PrefixCache
from wsd_llms.scheduler import piece_end


def _fed(runner: ModelRunner, ids: list[int], chunk: int, store: PrefixCache | None = None) -> tuple[object, torch.Tensor]:
    """A cache fed `ids` in pieces of `chunk` (each whole piece stored), and the last position's logits."""
    kv = runner.new_cache()
    start = 0
    while len(ids) - start > chunk:
        runner.extend(kv, ids[start : start + chunk], lazy=True)
        if store is not None:
            store.store(kv, start, chunk)
        start += chunk
    return kv, runner.extend(kv, ids[start:])


def test_restored_pieces_give_the_bits_feeding_them_gives():
    """Across Gemma 3's 16-position sliding window, and for a prompt that goes on differently."""
    runner = ModelRunner(tiny_gemma3(make_tokenizer(420), 1))
    ids = torch.randint(10, runner.model.config.vocab_size, (45,), generator=torch.Generator().manual_seed(0)).tolist()
    store = PrefixCache(max_tokens=64)
    _fed(runner, ids, 8, store)
    assert store.tokens() == 40
    # The same prompt; one that goes on differently; one whose last piece, always fed, was stored.
    for prompt, whole in ((ids, 40), (ids[:33] + [7, 8, 9], 32), (ids[:40], 32)):
        expected_kv, expected = _fed(runner, prompt, 8)
        kv = runner.new_cache()
        held = store.restore(kv, prompt, keep=0, chunk=8, num_layers=runner.num_layers)
        assert held == whole and kv.ids == prompt[:held]
        assert torch.equal(runner.extend(kv, prompt[held:]), expected)
        for ours, theirs in zip(kv.store.buffers, expected_kv.store.buffers):
            assert torch.equal(ours[..., : len(prompt), :], theirs[..., : len(prompt), :])
    assert (store.hits, store.reused_tokens) == (3, 104)


def test_the_store_keeps_its_bound_and_only_whole_runs_from_the_start():
    runner = ModelRunner(tiny_gemma3(make_tokenizer(420), 1))
    ids = list(range(20, 60))
    store = PrefixCache(max_tokens=16)
    _fed(runner, ids, 8, store)  # stores 4 pieces in turn; keeps the first 2, which the next request can take
    assert store.tokens() == 16
    again = runner.new_cache()
    assert store.restore(again, ids, keep=0, chunk=8, num_layers=runner.num_layers) == 16 and again.cuts == [8, 16]
    assert store.restore(runner.new_cache(), ids, keep=0, chunk=16, num_layers=runner.num_layers) == 0  # other cut points
    store.resize(0)
    assert store.tokens() == 0
    _fed(runner, ids, 8, store)
    assert store.tokens() == 0


def test_the_store_drops_the_least_recently_used_piece_that_no_piece_continues():
    """Two prompts on one start (a shared document): a piece that another continues stays while
    that one does; of the pieces nothing continues, the least recently used goes first."""
    runner = ModelRunner(tiny_gemma3(make_tokenizer(420), 1))
    shared, first, second = list(range(20, 28)), list(range(30, 46)), list(range(50, 58))
    store = PrefixCache(max_tokens=24)
    _fed(runner, shared + first + [1], 8, store)  # the shared piece and two of its own: 24 positions
    _fed(runner, shared + second + [1], 8, store)  # one more: the first prompt's last piece goes
    assert store.tokens() == 24

    def taken(ids: list[int]) -> int:
        return store.restore(runner.new_cache(), ids, keep=0, chunk=8, num_layers=runner.num_layers)

    assert taken(shared + first + [1]) == 16 and taken(shared + second + [1]) == 16
    store.resize(8)  # the two continuations go; the shared piece, continued no more, stays alone
    assert store.tokens() == 8 and taken(shared + second + [1]) == 8


def test_only_pieces_that_follow_whole_pieces_are_stored_or_taken():
    """States fed otherwise (a token at a time, or after a crop into a piece) round differently, so
    a piece that follows them is neither stored nor continued from the store."""
    runner = ModelRunner(tiny_gemma3(make_tokenizer(420), 1))
    ids = list(range(20, 45))
    store = PrefixCache(max_tokens=64)
    stepped = runner.new_cache()
    for token in ids[:8]:
        runner.extend(stepped, [token])
    runner.extend(stepped, ids[8:16], lazy=True)
    store.store(stepped, 8, 8)
    assert store.tokens() == 0 and stepped.pieces == 0
    _fed(runner, ids, 8, store)
    assert store.tokens() == 24
    assert store.restore(stepped, ids[16:], keep=0, chunk=8, num_layers=runner.num_layers) == 0
    whole = runner.new_cache()
    assert store.restore(whole, ids, keep=0, chunk=8, num_layers=runner.num_layers) == 24 and whole.pieces == 24
    whole.crop(12)
    assert whole.pieces == 8  # the piece cropped into is no longer whole
    runner.extend(whole, ids[12:16])
    assert store.restore(whole, ids[16:], keep=0, chunk=8, num_layers=runner.num_layers) == 0  # 16 is not where whole pieces end


def test_pieces_cut_at_another_size_are_neither_stored_nor_continued():
    """A cache fed in pieces of 8 holds other bits than one fed in pieces of 16 (prefill_chunk changed
    while it was fed), so no piece of 16 is stored after it or restored into it."""
    runner = ModelRunner(tiny_gemma3(make_tokenizer(420), 1))
    ids = list(range(20, 70))
    by_16 = PrefixCache(max_tokens=64)
    _fed(runner, ids, 16, by_16)
    assert by_16.tokens() == 48
    by_8 = runner.new_cache()
    runner.extend(by_8, ids[:8], lazy=True)
    by_16.store(by_8, 0, 8)  # kept as pieces of 8, and by_8 is known to be cut in 8s
    runner.extend(by_8, ids[8:16], lazy=True)
    by_16.store(by_8, 8, 8)
    assert by_8.pieces == 16
    assert by_16.restore(by_8, ids[16:], keep=0, chunk=16, num_layers=runner.num_layers) == 0
    runner.extend(by_8, ids[16:32], lazy=True)
    other = PrefixCache(max_tokens=64)
    other.store(by_8, 16, 16)
    assert other.tokens() == 0


def test_pieces_cut_where_messages_end_are_restored_bit_for_bit():
    """Pieces of other sizes (a mark cuts one short of the chunk) are stored and restored as fed,
    and a prompt whose marks cut it elsewhere takes none of them."""
    runner = ModelRunner(tiny_gemma3(make_tokenizer(420), 1))
    ids = torch.randint(10, runner.model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    marks = (35, 100, 140, 170)  # with chunk 64, cuts at 35, 100, 140, 192 (64 and 128 are too close to 35 and 100, 170 to 140)

    def fed(prompt: list[int], marks: tuple[int, ...], store: PrefixCache | None = None) -> tuple[object, torch.Tensor]:
        kv, start = runner.new_cache(), 0
        while len(prompt) - (end := piece_end(start, marks, 64)) >= 1:
            runner.extend(kv, prompt[start:end], lazy=True)
            if store is not None:
                store.store(kv, start, 64, marks)
            start = end
        return kv, runner.extend(kv, prompt[start:])

    store = PrefixCache(max_tokens=256)
    fed(ids, marks, store)
    assert store.tokens() == 192
    other = runner.new_cache()  # cut at 50 first: not the pieces stored
    assert store.restore(other, ids, keep=0, chunk=64, num_layers=runner.num_layers, marks=(50,)) == 0
    for prompt, its_marks, whole in ((ids, marks, 192), (ids[:120] + [7, 8], marks[:2], 100)):
        expected_kv, expected = fed(prompt, its_marks)
        kv = runner.new_cache()
        assert store.restore(kv, prompt, keep=0, chunk=64, num_layers=runner.num_layers, marks=its_marks) == whole
        assert kv.cuts == [c for c in (35, 100, 140, 192) if c <= whole]
        assert torch.equal(runner.extend(kv, prompt[whole:]), expected)
        for ours, theirs in zip(kv.store.buffers, expected_kv.store.buffers):
            assert torch.equal(ours[..., : len(prompt), :], theirs[..., : len(prompt), :])


def test_marks_fall_where_messages_start_and_the_prompt_ends_and_grow_with_the_conversation():
    """Both prompts mark where each message's text starts (the tools block's too) and where the
    prompt ends; the next turn's prompt, which starts with this whole prompt, has the same marks
    there, and one more at this prompt's end, where the reply it holds starts."""
    from wsd_llms.messages import normalize_messages
    from wsd_llms.prompts import build_prompts

    draft, base = make_tokenizer(300), make_tokenizer(420)
    turn = [
        {"role": "system", "content": "You answer questions about the list below, briefly."},
        {"role": "user", "content": "Which item is 5? Read the list first."},
    ]
    later = [*turn, {"role": "assistant", "content": "Item 5 is 9."}, {"role": "user", "content": "And item 6?"}]
    tools = [{"name": "look", "description": "Look an item up", "parameters": {"type": "object", "properties": {}}}]
    for template, with_tools in (("plain", ()), ("plain", tools), ("chat", ())):
        first = build_prompts(draft, base, normalize_messages(turn), template, with_tools)
        second = build_prompts(draft, base, normalize_messages(later), template, with_tools)
        for model, tok, ids, more_ids in (("draft", draft, first.draft_ids, second.draft_ids), ("base", base, first.base_ids, second.base_ids)):
            marks, more = first.marks[model], second.marks[model]
            assert len(marks) == 3 + (1 if with_tools and model == "base" else 0), (template, model, marks)
            assert marks[-1] == len(ids) and more_ids[: len(ids)] == ids  # this prompt starts the next one
            assert tok.decode(ids[marks[-3] : marks[-2]]).startswith("You answer")  # (the base's tools block is marked before it)
            assert tok.decode(ids[marks[-2] :]).startswith("Which item is 5?")
            assert len(more) == len(marks) + 2 and more[: len(marks)] == marks
            assert tok.decode(more_ids[more[-3] : more[-2]]).startswith("Item 5 is 9.") and tok.decode(more_ids[more[-2] :]).startswith("And item 6?")


def test_the_default_store_holds_a_fixed_number_of_bytes_of_both_models():
    """prefix_cache_tokens=None keeps as many positions per model as both models' keys and values
    hold in PREFIX_CACHE_BYTES, each model's bytes a position read from its config as its caches
    hold them; a number given is kept as it is."""
    from tiny import tiny_llama

    from wsd_llms.engine import PREFIX_CACHE_BYTES, Engine

    draft, base = tiny_llama(make_tokenizer(420), 0), tiny_gemma3(make_tokenizer(420), 1)
    engine = Engine(draft, base)
    for runner in engine.runners.values():
        kv = runner.new_cache()
        runner.extend(kv, [5, 6, 7])
        assert runner.position_bytes == sum(buffer[..., :1, :].numel() * buffer.element_size() for buffer in kv.store.buffers)
    per_position = sum(runner.position_bytes for runner in engine.runners.values())
    assert engine.prefix_cache_tokens == PREFIX_CACHE_BYTES // per_position
    assert {prefixes.max_tokens for prefixes in engine.prefixes.values()} == {engine.prefix_cache_tokens}
    assert Engine(draft, base, prefix_cache_tokens=100).prefixes["base"].max_tokens == 100
