"""Shared fixtures: tiny random model pairs (unit tests) and the embedded default pair (integration)."""

from __future__ import annotations

import runpy
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tokenizer, tiny_gemma3, tiny_llama  # noqa: E402

from wsd_llms.runtime import WSDRuntime, get_runtime  # noqa: E402


@pytest.fixture(scope="session")
def draft_tokenizer():
    return make_tokenizer(300)


@pytest.fixture(scope="session")
def shared_runtime(draft_tokenizer):
    """Draft and base share one tokenizer; the base has the draft's weights, so it agrees often."""
    rt = WSDRuntime.from_models(
        tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0), tiny_llama(draft_tokenizer, 0, "tiny-base", sharpen=3.0)
    )
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def differ_runtime(draft_tokenizer):
    """Different tokenizers (hand-off in text) and a Gemma 3 base with sliding windows and soft-capping."""
    rt = WSDRuntime.from_models(
        tiny_llama(draft_tokenizer, 0, "tiny-draft", sharpen=3.0), tiny_gemma3(make_tokenizer(420), 1, "tiny-gemma3")
    )
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def embedded():
    """The embedded default pair through the process-wide registry (converted once, then cached)."""
    return get_runtime()


@pytest.fixture
def run_example(monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict]:
    """Run `python examples/NAME ARGS` in this process, where the embedded models resolve to the
    runtime the other tests load once (a process of its own costs ~13 s of imports and loading, ~30 s
    on a slow machine). Returns the script's globals; capsys holds what it printed."""

    def run(name: str, *argv: str, run_name: str = "__main__") -> dict:
        path = Path(__file__).parents[1] / "examples" / name
        monkeypatch.setattr(sys, "argv", [str(path), *argv])
        return runpy.run_path(str(path), run_name=run_name)

    return run


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """A test may leave behind only the workers of runtimes that are still open, tqdm's monitor, and
    the SQLite thread of a LlamaIndex chat engine's memory (its in-memory store, kept open by the
    store's connection pool: the RAG example's chat engine makes one). A thread on its way out gets
    two seconds: transformers shuts its weight-loading pool without waiting for it, so a test that
    ends right after a load saw its threads still there, now and then."""
    before = set(threading.enumerate())
    yield
    open_workers = {rt.worker for rt in list(WSDRuntime.instances) if not rt._closed}

    def leaked() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t not in before and t not in open_workers and t.is_alive()
            and t.name != "tqdm_monitor" and not t.name.endswith("(_connection_worker_thread)")
        ]

    deadline = time.monotonic() + 2.0
    for thread in leaked():
        thread.join(max(deadline - time.monotonic(), 0))
    assert not leaked(), f"threads leaked: {leaked()}"
