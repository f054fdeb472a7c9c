#!/usr/bin/env python
"""Regenerate RESULTS.md, the measured tables of the README and docs pages, and the promoted runs' provenance READMEs: python scripts/make_results.py [--check]

Reads only the shipped metrics (manipulated_models/*/metrics.json, and results/*.json when present); the claim and
acceptance rules are in bnbackdoor/report/results.py and bnbackdoor/report/acceptance.py and are printed in RESULTS.md; the
blocks between <!-- generated:NAME --> markers of every page in bnbackdoor.report.readme_blocks.PAGES (README.md, the
docs/findings/ pages, docs/models.md, experimentsettings/README.md) are rendered by bnbackdoor/report/readme_blocks.py.
--check exits 1 when a file on disk differs from what the stored results give (nothing is written).
"""
from __future__ import annotations

import sys
from pathlib import Path

from bnbackdoor.campaigns.catalogue import CATALOGUE_FILE, promoted_readmes
from bnbackdoor.cli import ArgumentParser, existing_dir, output_file
from bnbackdoor.errors import UserError, run_cli
from bnbackdoor.fileio import write_text
from bnbackdoor.report.readme_blocks import PAGES, fill
from bnbackdoor.report.results import StoredResultError, render
from bnbackdoor.stored_json import check_stored_results


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=existing_dir, default=".", help="repository root holding manipulated_models/ (default: .)")
    p.add_argument("--output", type=output_file, default=None, help="where to write RESULTS.md (default: <root>/RESULTS.md)")
    p.add_argument("--readme", type=output_file, default=None, help="README whose generated blocks are filled (default: <root>/README.md)")
    p.add_argument("--check", action="store_true", help="exit 1 if a file is out of date; write nothing")
    a = p.parse_args()
    root = Path(a.root)
    results = Path(a.output) if a.output else root / "RESULTS.md"
    readme = Path(a.readme) if a.readme else root / "README.md"
    check_stored_results(root)  # every stored JSON of the right shape before a table is rendered from it
    try:  # the report layer imports nothing of ours below it: its damaged-file error becomes ours here
        wanted = {results: render(root)}
        # the hand-written pages around the generated blocks; a root without a page (a test's tree) has none to fill
        for page in [readme, *(root / p for p in PAGES if p != "README.md")]:
            if page.exists():
                wanted[page] = fill(page.read_text(), root)
    except StoredResultError as e:
        raise UserError(str(e)) from None
    if (root / CATALOGUE_FILE).is_file():  # each promoted catalogue run's provenance README (its notes may change)
        wanted.update(promoted_readmes(root))
    if a.check:
        stale = [str(f) for f, text in wanted.items() if not f.exists() or f.read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python scripts/make_results.py", file=sys.stderr)
            return 1
        pages = [str(f) for f in wanted if f.name != "README.md" or f.parent.parent.name != "manipulated_models"]
        print(f"up to date: {', '.join(pages)} and {len(wanted) - len(pages)} run READMEs")
        return 0
    for f, text in wanted.items():
        if not f.exists() or f.read_text() != text:
            write_text(f, text)
            print(f"wrote {f}")
        else:
            print(f"{f} is up to date")
    return 0


if __name__ == "__main__":
    run_cli(main)
