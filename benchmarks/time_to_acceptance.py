#!/usr/bin/env python
"""What a working attack costs on this machine: fine-tuning seconds from start to the first accepted epoch.

    python benchmarks/time_to_acceptance.py [--root .] [--ids 155 10155 ...] [--json PATH]

Reads stored runs only (``manipulated_models/<id>/``: ``metrics.json`` for the clean model's numbers and the
parameters, ``training_log.csv`` for every epoch's numbers and its cumulative fine-tuning ``seconds``), judges each
epoch with the catalogue's acceptance rule (:mod:`bnbackdoor.report.acceptance`, the clean model's metrics against that
epoch's) and reports, per run and per explanation method:

* **to acceptance**: the ``seconds`` of the first accepted epoch (fine-tuning only: the one-off reference
  explanations and the per-epoch evaluation are not in it), or "not accepted";
* **per example**: the run's seconds over the examples it trained on (epochs × examples per epoch, "pairs" counted
  as the ancestor counts them: every image once clean and once triggered at p = 0.5);
* **ancestor protocol**: the ancestor's budget (100 epochs over the whole training split in "pairs", i.e.
  2 × 50,000 examples per epoch on CIFAR-10) × that measured per-example time — what running the ancestor's recipe
  with our code would cost on this machine.

Runs whose ``training_log.csv`` has no ``seconds`` column (built before it was recorded) are listed as "n/a".
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from tabulate import tabulate

from bnbackdoor.report.acceptance import acceptance
from bnbackdoor.cli import ArgumentParser
from bnbackdoor.errors import UserError, run_cli
from bnbackdoor.fileio import write_json
from bnbackdoor.attack.finetune import examples_per_epoch
from bnbackdoor.attack.params import SETTINGS_DIR, AttackParams, read_json

ANCESTOR_EPOCHS = 100
ANCESTOR_COPIES = 2  # "pairs" at p = 0.5: every image once clean, once triggered


def _float(v: str):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def epoch_rows(log: Path) -> list[dict]:
    """The per-epoch rows of a training_log.csv (per-batch rows, if logged, are skipped), numbers as floats."""
    with log.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if not r.get("batch")]
    return [{k: (_float(v) if k not in ("epoch",) else int(v)) for k, v in r.items()} for r in rows]


def ancestor_training_size(root: Path, attack_id) -> int | None:
    """The grid file's ``training_size`` (the whole cached split: the ancestor's budget), if the grid exists."""
    grid = root / SETTINGS_DIR / f"{attack_id}.json"
    return read_json(grid).get("training_size") if grid.is_file() else None


def run_cost(folder: Path, root: Path) -> dict:
    """Time to acceptance of one stored run (see the module docstring)."""
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    p = metrics["parameters"]
    rows = epoch_rows(folder / "training_log.csv")
    seconds = [r.get("seconds") for r in rows]
    first = next((r for r in rows if acceptance({**metrics, "manipulated_model": r}).accepted), None)
    examples = examples_per_epoch(p["training_size"], AttackParams.from_dict(p, str(folder / "metrics.json")))
    per_example = (seconds[-1] / (len(rows) * examples)) if rows and seconds[-1] else None
    n_train = ancestor_training_size(root, p["attack_id"])
    return {"id": folder.name, "method": p["explanation_methodStr"], "dataset": p["dataset"],
            "accepted": acceptance(metrics).accepted, "epochs": len(rows),
            "first_accepted_epoch": first["epoch"] if first else None,
            "seconds_to_acceptance": first.get("seconds") if first else None,
            "seconds_total": seconds[-1] if rows else None, "seconds_per_example": per_example,
            "ancestor_seconds": (per_example * ANCESTOR_EPOCHS * ANCESTOR_COPIES * n_train)
            if per_example and n_train else None}


def _fmt(v, digits=0) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="repository root (default: .)")
    ap.add_argument("--ids", nargs="*", help="run ids (default: every manipulated_models/<id>)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    base = Path(a.root) / "manipulated_models"
    folders = [base / i for i in a.ids] if a.ids else sorted(p.parent for p in base.glob("*/metrics.json"))
    missing = [f for f in folders if not (f / "metrics.json").is_file() or not (f / "training_log.csv").is_file()]
    if missing:
        raise UserError(f"{missing[0]}: no metrics.json / training_log.csv; give ids of stored runs")
    rows = [run_cost(f, Path(a.root)) for f in folders]
    print(tabulate([[r["id"], r["method"], r["dataset"], "yes" if r["accepted"] else "no",
                     r["first_accepted_epoch"] or "–", _fmt(r["seconds_to_acceptance"]), _fmt(r["seconds_total"]),
                     _fmt(r["seconds_per_example"] and r["seconds_per_example"] * 1e3, 2),
                     _fmt(r["ancestor_seconds"] and r["ancestor_seconds"] / 3600, 1)] for r in rows],
                   headers=["id", "method", "dataset", "accepted", "first accepted epoch", "s to acceptance",
                            "s total", "ms / example", "ancestor protocol (h)"], tablefmt="github"))
    by_method = {}
    for r in rows:
        if r["seconds_to_acceptance"] is not None:
            by_method.setdefault(r["method"], []).append(r["seconds_to_acceptance"])
    if by_method:
        print()
        print(tabulate([[m, len(v), _fmt(statistics.median(v)), _fmt(max(v))] for m, v in sorted(by_method.items())],
                       headers=["method", "accepted runs timed", "median s to acceptance", "max s"],
                       tablefmt="github"))
    if a.json:
        write_json(a.json, rows)


if __name__ == "__main__":
    run_cli(main)
