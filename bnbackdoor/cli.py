"""Argument helpers shared by the thin scripts (one place for the common options of DESIGN.md)."""
from __future__ import annotations

import argparse
import shlex
import sys


class _AllowLong(argparse.Action):
    """``--allow-autotrain``: allow jobs estimated over 15 minutes for this process (see bnbackdoor.estimate)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=False, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from .estimate import allow_long_jobs
        allow_long_jobs(True)
        setattr(namespace, self.dest, True)


def common_options(p: argparse.ArgumentParser, save_path: bool = True) -> argparse.ArgumentParser:
    p.add_argument("--data-root", default=None, help="dataset cache folder (default: $BNBACKDOOR_DATA, else ./datasets)")
    if save_path:
        p.add_argument("--save_path", "--save-path", dest="save_path", default="output", help="output folder (default: output/)")
    p.add_argument("--seed", type=int, default=0, help="seed for data subsets and shuffling (default: 0)")
    p.add_argument("--allow-autotrain", "--allow-long", dest="allow_autotrain", action=_AllowLong,
                   help="start a job estimated over 15 minutes (training a missing clean model, a large attack); "
                        "without it such a job prints its estimate and stops (env BNBACKDOOR_ALLOW_LONG=1 too)")
    return p


def command_line() -> str:
    """The command that is running, for provenance records."""
    return "python " + shlex.join(sys.argv)
