"""The LlamaIndex examples run on the embedded default models, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.embedded
def test_rag_example_answers_from_its_documents() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "llamaindex_rag.py")], capture_output=True, text=True, env=env, timeout=480
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    query_part, chat_part = proc.stdout.split("[condense_plus_context chat engine]")
    assert "(retrieved: quillmere_festival.md)" in query_part
    # The mascot's name is made up and written only in examples/data/llamaindex_docs/quillmere_festival.md.
    assert "Biscuit" in query_part.split("[streaming query engine]")[1], proc.stdout
    assert "Biscuit" in chat_part, proc.stdout


@pytest.mark.embedded
def test_agent_example_calls_its_tools() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "llamaindex_agent.py")], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    function_part, react_part = proc.stdout.split("[ReActAgent] Q:")
    for part in (function_part, react_part):
        assert "[tool] add(" in part and "[tool] multiply(" in part, proc.stdout
    assert "[ReActAgent] A:" in react_part, proc.stdout
