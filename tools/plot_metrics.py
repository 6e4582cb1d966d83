"""Plots the loss and AP curves of one or several runs to a PNG: `detframe plot` as a script.

Usage: python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] --output curves.png
[--keys total_loss bbox/AP ...] [--window 20]
"""

from __future__ import annotations

import sys

from detframe.cli import main as detframe_main


def main(argv: list[str] | None = None) -> int:
    """`detframe plot` with `argv` (default: this script's arguments); returns the status."""
    return detframe_main(["plot", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
