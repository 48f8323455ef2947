"""The console the command-line tools print to."""

from __future__ import annotations

import sys

from rich.console import Console


def make_console() -> Console:
    """The terminal's console; in a pipe or a log, lines as wide as they come (Rich would wrap them at 80)."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 1000)


def error_console() -> Console:
    """Where errors and progress go: stderr, so that a reply piped to a file holds the reply alone."""
    return Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 1000)
