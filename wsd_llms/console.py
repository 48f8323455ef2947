"""The console the command-line tools print to."""

from __future__ import annotations

import sys

from rich.console import Console


def make_console() -> Console:
    """The terminal's console; in a pipe or a log, lines as wide as they come (Rich would wrap them at 80)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 1000)
