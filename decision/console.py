"""The console the reporting commands (demo, bench, sim) print tables to."""

from __future__ import annotations

import sys

from rich.console import Console

PIPED_WIDTH = 240  # wide enough for every table these commands print


def report_console() -> Console:
    """A terminal's own width; piped or logged, a wide fixed one, so tables keep their numbers whole
    (rich would otherwise cut every column to fit 80 characters)."""
    return Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)
