"""The runtime quickstart runs on the embedded default and prints a reply and its facts."""

import pytest

pytestmark = pytest.mark.embedded


def test_quickstart(run_example, capsys):
    run_example("quickstart.py", "What is the capital of France?")
    out = capsys.readouterr().out
    assert "Paris" in out and "switch point:" in out
