#!/usr/bin/env python
"""Record the base model of runs made before base-model provenance: python scripts/record_base_models.py
[FOLDER ...] [--verify] [--check]

Adds "base_model" ({"path", "sha256"}: the clean model the run's parameters name, models/<modeltype>/
model_<model_id>.pth, and its weights' checksum) to each run folder's metrics.json (default: every
manipulated_models/*/ run); no number changes. --verify first re-measures that model's clean accuracy on the run's
own test images against what the run recorded; --check writes nothing and exits 1 when a run lacks the record.
"""
from __future__ import annotations

import sys
from pathlib import Path

from bnbackdoor.cli import ArgumentParser, existing_dir
from bnbackdoor.errors import run_cli
from bnbackdoor.runs import record_base_model
from bnbackdoor.models import MODEL_ROOT


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="*", type=existing_dir, metavar="FOLDER",
                   help="run folders (default: every manipulated_models/*/ with a metrics.json)")
    p.add_argument("--models-root", type=existing_dir, default=str(MODEL_ROOT), help="clean base models (default: models)")
    p.add_argument("--data-root", type=existing_dir, default=None, help="data for --verify (default: ./datasets)")
    p.add_argument("--verify", action="store_true", help="re-measure each base's clean accuracy first")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a run lacks its base record")
    a = p.parse_args()
    folders = [Path(f) for f in a.folders] or sorted(f.parent for f in Path("manipulated_models").glob("*/metrics.json"))
    missing = 0
    for folder in folders:
        line = record_base_model(folder, models_root=a.models_root, data_root=a.data_root, verify=a.verify,
                                 write=not a.check)
        missing += "would record" in line
        print(line)
    if a.check and missing:
        print(f"{missing} run(s) lack their base record; run python scripts/record_base_models.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
