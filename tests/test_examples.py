"""The runtime quickstart runs on the embedded default and prints a reply and its facts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.embedded
EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "What is the capital of France?"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "switch point:" in out.stdout
