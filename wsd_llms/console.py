"""The console the command-line tools print to."""

from __future__ import annotations

import sys

from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    """The terminal's console (`stderr`: where errors and progress go, so that a reply piped to a file
    holds the reply alone); in a pipe or a log, lines as wide as they come (Rich would wrap them at 80)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 1000)
