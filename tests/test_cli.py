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
    """stdout holds the reply alone (no legend, marker or facts: a reply piped to a file is the reply);
    stderr the legend and the line of facts."""
    out = _run("What is the capital of France?", "--max-tokens", "24")
    assert out.returncode == 0, out.stderr
    assert "draft model  ▸ switch  base model" in out.stderr and "▸" not in out.stdout
    assert "Paris" in out.stdout and len(out.stdout.strip().splitlines()) == 1
    assert "| reply " in out.stderr and "tok/s" in out.stderr


def test_interactive_keeps_history():
    out = _run("--max-tokens", "16", stdin="My name is Ada.\nWhat is my name?\n\n")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("| reply ") == 2


def test_bad_model_settings_are_reported():
    out = _run("hi", "--dtype", "int8")
    assert out.returncode == 2 and "error:" in out.stderr and "error:" not in out.stdout and "Traceback" not in out.stderr  # stdout: replies only


def test_a_pipe_gets_whole_lines():
    """Rich wraps at 80 columns when stdout is not a terminal; the stats line must stay one line."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run(
        [sys.executable, "-m", "wsd_llms.cli", "chat", "What is the capital of France?", "--max-tokens", "24"],
        capture_output=True, text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    stats = [line for line in out.stderr.splitlines() if "| reply " in line]
    assert len(stats) == 1 and "tok/s" in stats[0] and len(stats[0]) > 80


def test_bad_option_is_reported():
    out = _run("hi", "--threshold", "2")
    assert out.returncode == 2
    assert "error: --threshold: invalid switch_threshold=2.0" in out.stderr and not out.stdout  # before the models load


def test_a_failing_turn_is_reported_and_the_chat_goes_on():
    """A question past the draft's 8192-token window fails that turn only; the next one is answered."""
    out = _run("--max-tokens", "8", stdin="word " * 9000 + "\nWhat is the capital of France?\n\n")
    assert out.returncode == 0, out.stderr
    assert "error:" in out.stderr and "context window" in out.stderr and "this turn is dropped" in out.stderr
    assert out.stderr.count("| reply ") == 1


def test_interactive_mode_refuses_a_bad_option_before_loading():
    out = _run("--window", "0", stdin="hi\n\n")
    assert out.returncode == 2 and "switch_window" in out.stderr and "you>" not in out.stdout


@pytest.mark.parametrize("mode", ["base", "draft"])
def test_one_model_alone(mode):
    out = _run("What is the capital of France?", "--max-tokens", "12", "--mode", mode)
    assert out.returncode == 0, out.stderr
    assert f"{mode} model alone | reply " in out.stderr and "(draft " not in out.stderr  # no switch or split to report
