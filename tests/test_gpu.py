"""CUDA checks (skipped without a GPU): bf16 placement, parity and batching on the device."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from wsd_llms import get_runtime
from wsd_llms.model_runner import ModelRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in detail.",
    "Write a Python function that reverses a string.",
    "How do I make a bomb at home?",
]


@pytest.fixture(scope="module")
def cuda_runtime():
    return get_runtime(device="cuda", dtype="auto")


def test_one_runtime_for_the_current_cuda_device_however_named(cuda_runtime):
    """"auto", "cuda" and "cuda:N" for the current device share one runtime (one copy of the weights)."""
    current = f"cuda:{torch.cuda.current_device()}"
    assert get_runtime(device="auto") is get_runtime(device=current) is cuda_runtime


def test_models_are_on_cuda_in_bfloat16(cuda_runtime):
    engine = cuda_runtime.load()
    for loaded in (engine.draft, engine.base):
        param = next(loaded.model.parameters())
        assert param.device.type == "cuda" and param.dtype == torch.bfloat16


def test_online_equals_staged_on_cuda(cuda_runtime):
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        staged = cuda_runtime.generate(messages, mode="staged", max_tokens=64, max_draft_tokens=128)
        online = cuda_runtime.generate(messages, max_tokens=64, max_draft_tokens=128)
        assert online.text == staged.text and online.switch_point == staged.switch_point
    # Both models' decode steps have captured CUDA graphs (decode_graphs), never turned off.
    for runner in cuda_runtime.load().runners.values():
        assert runner.graphs is not None and runner.graphs.passes
        assert all(p.graph is not None for p in runner.graphs.passes.values())


@pytest.mark.parametrize("check", ["decode_and_compare", "stay_and_compare"])
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_passes_replay_cuda_graphs(kind, check, monkeypatch):
    """Captured graphs give the plain passes' logits (float32, tiny models): decode steps through
    batches, a reallocation of the slots and a lazy row, then padded scoring passes; and rows kept in
    their slots between passes until their caches change (tests/test_decode_graphs.py)."""
    import test_decode_graphs

    def on_cuda() -> object:
        loaded = test_decode_graphs.MODELS[kind]()
        loaded.model.to("cuda")
        return dataclasses.replace(loaded, device=torch.device("cuda"))

    graphed = ModelRunner(on_cuda())
    monkeypatch.setenv("WSD_LLMS_CUDA_GRAPHS", "0")
    plain = ModelRunner(on_cuda())
    assert graphed.graphs is not None and plain.graphs is None
    getattr(test_decode_graphs, check)(plain, graphed)
    assert graphed.graphs.passes and all(p.graph is not None for p in graphed.graphs.passes.values())


def test_batched_equals_sequential_on_cuda_in_float32():
    """Exact in float32. In bfloat16 a batched pass rounds differently from a lone one (the GPU's
    matrix kernels depend on the shapes), so greedy replies part at near-ties: on an H200, 4 and
    5 of 8 replies differed from the sequential ones in two runs, and 4 of 8 in a third
    (benchmarks/results/parity_cuda.md)."""
    runtime = get_runtime(device="cuda", dtype="float32")
    jobs = [[{"role": "user", "content": p}] for p in PROMPTS * 2]
    sequential = [runtime.generate(m, max_tokens=48) for m in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        batched = list(pool.map(lambda m: runtime.generate(m, max_tokens=48), jobs))
    assert [r.text for r in batched] == [r.text for r in sequential]
    assert [r.switch_point for r in batched] == [r.switch_point for r in sequential]
    assert runtime.stats().peaks["draft_batch"] > 1


def test_passes_on_cuda_do_not_use_cudnn_attention(cuda_runtime):
    """On an H200 each cuDNN attention call cost about 1 ms of CPU, most of a pass; the runner leaves it out."""
    from torch.profiler import ProfilerActivity, profile

    engine = cuda_runtime.load()
    runner = engine.runners["base"]
    kv = runner.new_cache()
    ids = engine.base.tokenizer.encode("The capital of France is")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.extend(kv, ids)
        runner.extend(kv, [ids[-1]])
        runner.extend_batch([kv, runner.new_cache()], [[ids[0]], ids], [0, 0])
    names = {event.key for event in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in names
    assert not any("cudnn_attention" in name for name in names)
