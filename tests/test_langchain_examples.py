"""The LangChain examples run on the embedded default models, as a user would run them (in this
process: see the `run_example` fixture)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.embedded


def test_rag_example_streams_an_answer(run_example, capsys):
    run_example("langchain_rag.py", "How much is a monthly bus pass?", "--max-tokens", "32")
    out = capsys.readouterr().out
    assert "Sources: buses.md" in out
    answer = out.split("Answer: ", 1)[1]
    assert answer.strip(), out


def test_agent_example_calls_both_tools(run_example, capsys):
    run_example("langchain_agent.py", "--max-tokens", "40")
    out = capsys.readouterr().out
    assert "Tool call [lookup]" in out and "Tool call [calculator]" in out, out
    assert re.search(r"Tool call \[lookup\]: \{'topic': '[^']+'\}", out) and re.search(r"Tool call \[calculator\]: \{'expression': '[^']+'\}", out), out  # its arguments, whole
    assert "Tool result [calculator]" in out and "Tool result [lookup]" in out, out
    answer = out.split("Answer: ", 1)[1] if "Answer: " in out else ""
    assert answer.strip() and "<tool_call>" not in answer, out
