"""The LlamaIndex examples run on the embedded default models, offline (in this process: see the
`run_example` fixture)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from llama_index.core import Settings

pytestmark = pytest.mark.embedded


@pytest.fixture
def settings_restored() -> Iterator[None]:
    """The RAG example sets LlamaIndex's global `Settings`, as a script does; other tests see them as they were."""
    llm, embed_model = Settings._llm, Settings._embed_model  # the fields: the properties would resolve defaults (OpenAI's)
    yield
    Settings._llm, Settings._embed_model = llm, embed_model


def test_rag_example_answers_from_its_documents(run_example: Callable[..., dict], capsys: pytest.CaptureFixture[str], settings_restored: None) -> None:
    run_example("llamaindex_rag.py")
    out = capsys.readouterr().out
    query_part, chat_part = out.split("[condense_plus_context chat engine]")
    assert "(retrieved: quillmere_festival.md)" in query_part
    # The mascot's name is made up and written only in examples/data/llamaindex_docs/quillmere_festival.md.
    assert "Biscuit" in query_part.split("[streaming query engine]")[1], out
    assert "Biscuit" in chat_part, out


async def test_agent_example_calls_its_tools(run_example: Callable[..., dict], capsys: pytest.CaptureFixture[str]) -> None:
    """Its `main` awaited on the tests' event loop (run as a script, it would start a loop of its own)."""
    await run_example("llamaindex_agent.py", run_name="example")["main"]()
    out = capsys.readouterr().out
    function_part, react_part = out.split("[ReActAgent] Q:")
    for part in (function_part, react_part):
        assert "[tool] add(" in part and "[tool] multiply(" in part, out
    assert "[ReActAgent] A:" in react_part, out
