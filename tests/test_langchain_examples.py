"""The LangChain examples run on the embedded default models, as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.mark.embedded
def test_rag_example_streams_an_answer():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "langchain_rag.py"), "How much is a monthly bus pass?", "--max-tokens", "32"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Sources: buses.md" in proc.stdout
    answer = proc.stdout.split("Answer: ", 1)[1]
    assert answer.strip(), proc.stdout


@pytest.mark.embedded
def test_agent_example_calls_both_tools():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "langchain_agent.py"), "--max-tokens", "40"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Tool call [lookup]" in proc.stdout and "Tool call [calculator]" in proc.stdout, proc.stdout
    assert "Tool result [calculator]" in proc.stdout and "Tool result [lookup]" in proc.stdout, proc.stdout
    answer = proc.stdout.split("Answer: ", 1)[1] if "Answer: " in proc.stdout else ""
    assert answer.strip() and "<tool_call>" not in answer, proc.stdout
