"""Child processes that get a Ctrl-C (SIGINT) as from a terminal, for tests of what it interrupts."""

from __future__ import annotations

import signal
import subprocess
import sys


def python_child(code: str, *args: str) -> subprocess.Popen[str]:
    """`python -c code args` with text pipes, whose SIGINT raises KeyboardInterrupt: a run started in
    the background of a shell without job control (nohup make test &) ignores SIGINT, and a child
    would inherit that and never see the Ctrl-C."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
