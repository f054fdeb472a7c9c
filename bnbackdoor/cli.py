"""Argument helpers shared by the thin scripts (one place for the common options of DESIGN.md)."""
from __future__ import annotations

import argparse
import shlex
import sys


def common_options(p: argparse.ArgumentParser, save_path: bool = True) -> argparse.ArgumentParser:
    p.add_argument("--data-root", default=None, help="dataset cache folder (default: $BNBACKDOOR_DATA, else ./datasets)")
    if save_path:
        p.add_argument("--save_path", "--save-path", dest="save_path", default="output", help="output folder (default: output/)")
    p.add_argument("--seed", type=int, default=0, help="seed for data subsets and shuffling (default: 0)")
    return p


def command_line() -> str:
    """The command that is running, for provenance records."""
    return "python " + shlex.join(sys.argv)
