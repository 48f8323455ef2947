"""A Ctrl-C while other threads wait on requests: the KeyboardInterrupt reaches only the main thread,
and a thread pool's executor (LangChain's batch and RunnableParallel, a LangGraph step's parallel
nodes, a caller's own pool) waited for every reply to its last token before it reached the caller.
Each way runs in a child process, which gets the SIGINT as from a terminal."""

from __future__ import annotations

import json
import signal
import time

from terminal import python_child

CHILD = """
import json, threading, time
from concurrent.futures import ThreadPoolExecutor
from typing import TypedDict

from langchain_core.runnables import RunnableParallel
from langgraph.graph import END, START, StateGraph

from langchain_wsd import WSDChatModel

llm = WSDChatModel(max_tokens=1000)
runtime = llm.wsd_runtime()
runtime.load()
QUESTIONS = [f"Write a long story about a dragon named {name}." for name in ("Ash", "Brim", "Cinder", "Drake")]


class Stories(TypedDict, total=False):
    a: str
    b: str


graph = StateGraph(Stories)
graph.add_node("a", lambda state: {"a": llm.invoke(QUESTIONS[0]).text})
graph.add_node("b", lambda state: {"b": llm.invoke(QUESTIONS[1]).text})
for edge in [(START, "a"), (START, "b"), ("a", END), ("b", END)]:
    graph.add_edge(*edge)
stories = graph.compile()


def in_a_pool() -> None:
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda q: runtime.generate([{"role": "user", "content": q}], max_tokens=1000), QUESTIONS))


WAYS = {  # each call, and how many of its requests run at once
    "a pool of runtime.generate": (in_a_pool, 4),
    "batch, 2 at a time": (lambda: llm.batch(QUESTIONS, {"max_concurrency": 2}), 2),
    "batch_as_completed": (lambda: list(llm.batch_as_completed(QUESTIONS)), 4),
    "RunnableParallel": (lambda: RunnableParallel(a=llm, b=llm).invoke(QUESTIONS[0]), 2),
    "LangGraph's parallel nodes": (lambda: stories.invoke({}), 2),
}
for way, (call, running) in WAYS.items():
    before = runtime.stats()

    def announce(running=running) -> None:
        while runtime.stats().running < running:
            time.sleep(0.01)
        print("running", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    try:
        call()
        print("returned", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    while runtime.stats().running:
        time.sleep(0.01)
    after = runtime.stats()
    counts = {key: getattr(after, key) - getattr(before, key) for key in ("cancelled", "finished", "failed")}
    print(json.dumps({"way": way, **counts, "cached_tokens": after.cached_tokens}), flush=True)
"""

WAYS = [("a pool of runtime.generate", 4), ("batch, 2 at a time", 2), ("batch_as_completed", 4), ("RunnableParallel", 2), ("LangGraph's parallel nodes", 2)]


def test_ctrl_c_ends_the_requests_other_threads_wait_on() -> None:
    """Each way's requests are cancelled within a step (their replies have up to 1000 tokens to go,
    a minute or more), and a batch's inputs still waiting in LangChain's executor send nothing."""
    proc = python_child(CHILD)
    try:
        assert proc.stdout is not None
        for way, running in WAYS:
            assert proc.stdout.readline() == "running\n", way
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            assert (proc.stdout.readline(), way) == ("interrupted\n", way)
            assert time.monotonic() - sent < 5, way
            assert json.loads(proc.stdout.readline()) == {"way": way, "cancelled": running, "finished": 0, "failed": 0, "cached_tokens": 0}
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.communicate()
