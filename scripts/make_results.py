#!/usr/bin/env python
"""Regenerate RESULTS.md from manipulated_models/*/metrics.json: python scripts/make_results.py [--check]

Reads only the shipped metrics (and results/defenses_<id>.json when present); the claim and acceptance rules are in
bnbackdoor/results.py and bnbackdoor/acceptance.py and are printed in RESULTS.md. --check exits 1 when the file on
disk differs from what the metrics give (nothing is written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnbackdoor.errors import run_cli  # noqa: E402
from bnbackdoor.fileio import write_text  # noqa: E402
from bnbackdoor.results import render  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=".", help="repository root holding manipulated_models/ (default: .)")
    p.add_argument("--output", default=None, help="where to write (default: <root>/RESULTS.md)")
    p.add_argument("--check", action="store_true", help="exit 1 if the file is out of date; write nothing")
    a = p.parse_args()
    out = Path(a.output) if a.output else Path(a.root) / "RESULTS.md"
    text = render(a.root)
    if a.check:
        current = out.read_text() if out.exists() else None
        if current != text:
            print(f"{out} is out of date; run python scripts/make_results.py", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    write_text(out, text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
