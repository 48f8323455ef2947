"""The `wsd-llms` command and `python -m wsd_llms`: the CLI imported under a guard, so that a Ctrl-C
while its modules import (a fraction of a second) exits with status 130, as one later does, not
with Python's traceback."""

from __future__ import annotations

import sys


def main() -> int:
    """Run the command line (`wsd_llms.cli.main`) on sys.argv."""
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
