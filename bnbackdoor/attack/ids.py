"""The attack catalogue: every attack id with what it does and what is on disk (``python attack.py --list``).

One row per id of :func:`bnbackdoor.attack.params.known_attack_ids` (stored runs in ``manipulated_models/`` and grids in
``experimentsettings/``), resolved exactly as ``attack.py`` resolves it (a stored run wins over its grid; a grid
shows grid point 0 and its number of points).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tabulate import tabulate

from ..errors import UserError
from ..models import MODEL_ROOT, checkpoint_path
from .params import (MANIPULATED_DIR, SETTINGS_DIR, expand_grid, is_grid, known_attack_ids, read_json,
                     resolve_attack)

COLUMNS = ("id", "dataset", "model", "kind", "method", "loss", "trigger(s)", "target expl.", "target class",
           "grid points", "stored model", "base model")


def _classes(target_classes: list) -> str:
    """One entry per trigger; ``keep label`` for null (the explanation is fooled, the prediction is not)."""
    names = ["keep label" if c is None else str(c) for c in target_classes]
    if len(names) > 1 and len(set(names)) == 1:
        return f"{names[0]} (each)"
    return ", ".join(names)


def catalogue(root: str | Path = ".", models_root: str | Path | None = None) -> list[dict[str, Any]]:
    """One dict per attack id (keys :data:`COLUMNS`), in id order. A file that does not load gives a row whose
    ``kind`` is the one-line error, so one broken file does not hide the rest."""
    root = Path(root)
    models_root = Path(models_root) if models_root is not None else root / MODEL_ROOT
    rows = []
    for name in known_attack_ids(root):
        stored = root / MANIPULATED_DIR / name / "model.pth"
        row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
        row.update({"id": name, "stored model": "yes" if stored.is_file() else "no"})
        try:
            p = resolve_attack(name, root=root)
            grid_file = root / SETTINGS_DIR / f"{name}.json"
            grid = read_json(grid_file) if grid_file.is_file() else None
            points = len(expand_grid(grid, str(grid_file))) if is_grid(grid) else 1
        except UserError as e:
            row["kind"] = f"error: {e}"
            rows.append(row)
            continue
        row.update({
            "dataset": p.dataset, "model": p.canonical_modeltype, "kind": p.attack_name,
            "method": p.explanation_methodStr, "loss": "dssim" if p.lossStr == "ssim" else p.lossStr,
            "trigger(s)": ", ".join(p.triggerStrs), "target expl.": ", ".join(p.targetStrs),
            "target class": _classes(p.target_classes), "grid points": points,
            "base model": "yes" if checkpoint_path(p.modeltype, p.model_id, models_root).is_file() else "no",
        })
        rows.append(row)
    return rows


def catalogue_table(rows: list[dict[str, Any]], fmt: str = "simple") -> str:
    return tabulate([[r[c] for c in COLUMNS] for r in rows], headers=list(COLUMNS), tablefmt=fmt)
