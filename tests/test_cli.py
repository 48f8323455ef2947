"""`wsd-llms chat` streams a reply with the draft and base parts marked and ends with a stats line."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.embedded


def _run(*args, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "wsd_llms.cli", "chat", *args],
        input=stdin, capture_output=True, text=True, timeout=300, env=env,
    )


def test_one_question():
    out = _run("What is the capital of France?", "--max-tokens", "24")
    assert out.returncode == 0, out.stderr
    assert "draft model  ▸ switch  base model" in out.stdout
    assert "Paris" in out.stdout
    assert "| reply " in out.stdout and "tok/s" in out.stdout


def test_interactive_keeps_history():
    out = _run("--max-tokens", "16", stdin="My name is Ada.\nWhat is my name?\n\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("| reply ") == 2


def test_bad_option_is_reported():
    out = _run("hi", "--threshold", "2")
    assert out.returncode == 2
    assert "invalid switch_threshold=2.0" in out.stdout
