"""Re-BN among the baselines: every registered defense × clean-set size on stored attacks, one table per model.

The library side of ``scripts/compare_defenses.py``. Per stored attack (:func:`bnbackdoor.runs.load_run`):

* **Evaluation images**: the attack's test images (``load_split(dataset, "test", testing_size, seed)``), the same
  subset its own metrics were measured on; every row is measured there by
  :func:`bnbackdoor.metrics.evaluate_attack` (the clean model's explanations computed once and shared).
* **Defender's data**: a labelled subset of the **training** split per size - prefixes of one seeded permutation, so
  the sets are nested (the 100 images are among the 500, which are among the 2,000). A defense never sees a test
  image, the trigger or the target.
* Every defense runs on a fresh copy of the manipulated model (:func:`bnbackdoor.defenses.apply_defense`) with its
  registered, fixed options; ``seconds`` is its wall-clock time (evaluation excluded).

Rows: ``clean model`` and ``no defense`` (references), then ``<defense>`` × clean-set size. Transductive defenses
(``batchstats``) make no fixed model and are evaluated elsewhere with a stated batch composition.
A defense that cannot act on the model (``bnp``, ``anp``, ``bn_finetune`` on a model without BatchNorm) gets no
row; ``not_applicable`` in the JSON names it and why.

>>> cmp = compare_defenses("154", "cpu", clean_images=[100, 500, 2000])   # writes output/defenses_154.{json,csv,png}
>>> print(cmp.table())
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tabulate import tabulate

from ..data import clean_set
from ..defenses import DEFENSES
from ..defenses.common import not_applicable
from ..defenses.evaluate import evaluate_defenses
from ..defenses.specs import default_defenses, parse_defenses
from ..errors import UserError
from .common import eval_images, parse_sizes
from ..runs import load_run, run_name, same_base, write_csv
from ..fileio import atomic_unit, check_finite_numbers, refuse_overwrite, write_json
from ..metrics import evaluate_attack, reference_explanations
from ..attack.params import AttackParams
from ..plots import defense_scatter
from ..report.labels import CLEAN_MODEL, NO_DEFENSE
from ..stored_json import read_comparison

__all__ = ["ROW_CLEAN", "ROW_NONE", "COLUMNS", "DEFAULT_SIZES", "parse_clean_images", "DefenseComparison",
           "compare_defenses"]

ROW_CLEAN, ROW_NONE = CLEAN_MODEL, NO_DEFENSE
DEFAULT_SIZES = (100, 500, 2000)
# Row key -> column header, in table order. ``untriggered_target_rate`` shows where evaluate_attack reports it.
COLUMNS: dict[str, str] = {
    "clean_accuracy": "clean accuracy",
    "attack_success_rate": "attack success",
    "untriggered_target_rate": "untriggered target rate",
    "expl_dssim_to_target": "DSSIM to target",
    "expl_dssim_to_clean": "DSSIM to clean expl.",
    "seconds": "seconds",
}


def parse_clean_images(text: str | Iterable[int]) -> list[int]:
    """``"100,500,2000"`` (or a list) -> ascending, distinct positive sizes."""
    try:
        return parse_sizes(text)
    except UserError:
        raise UserError(f"--clean-images takes comma-separated positive integers such as 100,500,2000; "
                        f"got '{text}'") from None


def diverged_as_none(metrics: dict[str, Any], what: str) -> dict[str, Any]:
    """A defended model whose numbers are not finite (it diverged: a result, not a failure of the comparison) keeps
    its row: the non-finite numbers become None and ``diverged`` is True, with a notice - nothing non-finite is
    stored, and the other rows are not lost."""
    bad = [k for k, v in metrics.items() if finite_or_none(v) != v]  # NaN != None, [nan] != [None]
    if not bad:
        return metrics
    print(f"notice: {what}: the defended model diverged ({', '.join(bad[:3])} not finite); its row records "
          "diverged: true", file=sys.stderr)
    return {**finite_or_none(metrics), "diverged": True}


def finite_or_none(obj: Any) -> Any:
    """``obj`` (numbers, nested dicts and lists) with every NaN or infinity replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def comparison_files(save_path: str | Path, name: str) -> list[Path]:
    """``<save_path>/defenses_<name>.{json,csv,png}``: the files one comparison writes, as one unit."""
    return [Path(save_path) / f"defenses_{name}.{ext}" for ext in ("json", "csv", "png")]


def merged_rows(path: Path, rows: list[dict[str, Any]], *, seed: int, images: int,
                base_model: dict | None) -> list[dict[str, Any]]:
    """The stored comparison at ``path`` (read through :func:`bnbackdoor.stored_json.read_comparison`: a file of
    the wrong shape is one line) with ``rows`` in place of the (defense, clean_images) pairs they recompute;
    references and new rows from ``rows``. A stored file measured otherwise is an error, not a silent mix."""
    if not path.exists():
        return rows
    old = read_comparison(path)
    same = (old.get("seed") == seed and (old.get("test") or {}).get("images") == images
            and same_base(old.get("base_model"), base_model))
    if not same:
        raise UserError(f"--merge: {path} was measured on other test images, seed or base model; pass --force "
                        "instead of --merge to replace it")
    new = {(r["defense"], r.get("clean_images")): r for r in rows}
    refs = [r for r in rows if r["defense"] in (ROW_CLEAN, ROW_NONE)]
    kept = [new.pop((r["defense"], r.get("clean_images")), r) for r in old.get("rows", [])
            if r["defense"] not in (ROW_CLEAN, ROW_NONE)]
    return refs + kept + [r for k, r in new.items() if k[0] not in (ROW_CLEAN, ROW_NONE)]


@dataclass
class DefenseComparison:
    name: str
    params: AttackParams
    device: str
    seed: int
    test: dict[str, Any]
    rows: list[dict[str, Any]]       # defense, clean_images, seconds, evaluate_attack's keys, info
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)
    base_model: dict[str, Any] | None = None  # the clean model compared with (experiment.check_base)
    not_applicable: dict[str, str] = field(default_factory=dict)  # defense -> why it was not run on this model

    def columns(self) -> dict[str, str]:
        cols = dict(COLUMNS)
        if all(r.get("untriggered_target_rate") is None for r in self.rows):
            cols.pop("untriggered_target_rate")
        return cols

    def table(self) -> str:
        cols = self.columns()
        body = [[r["defense"], r.get("clean_images")] + [r.get(k) for k in cols] for r in self.rows]
        return tabulate(body, headers=["defense", "clean images", *cols.values()], floatfmt=".4f",
                        missingval="-")

    def defense_records(self) -> dict[str, Any]:
        """Row label -> the registered defense, its summary and the full options it ran with."""
        out = {}
        for r in self.rows:
            info = r.get("info") or {}
            name = info.get("defense", r["defense"])
            if r["defense"] in out or name not in DEFENSES:
                continue
            out[r["defense"]] = {"defense": name, "summary": DEFENSES[name].summary,
                                 "options": info.get("options", dict(DEFENSES[name].defaults))}
        return out

    def flat_rows(self) -> list[dict[str, Any]]:
        """CSV rows: scalar metrics only (per-trigger keys included), no defense info."""
        return [{k: v for k, v in r.items() if k != "info"} for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.name, "id": self.params.id, "attack_id": self.params.attack_id,
                "device": self.device, "seed": self.seed, "test": self.test,
                "defender_data": "labelled subsets of the TRAINING split, nested, same seed",
                "defenses": self.defense_records(),
                "rows": self.rows, "not_applicable": self.not_applicable,
                "seconds": round(self.seconds, 1), "parameters": self.params.to_dict(),
                "base_model": self.base_model}


def compare_defenses(attackid: str | int, device: torch.device | str = "cpu", *,
                     clean_images: Sequence[int] = DEFAULT_SIZES,
                     defenses: str | Sequence[str] | None = None,
                     testing_size: int | None = None, batch_size: int = 100, seed: int = 0, root: str | Path = ".",
                     models_root: str | Path | None = None, data_root=None, save_path: str | Path = "output",
                     progress: bool = True, clean_model: str | Path | None = None,
                     merge: bool = False, force: bool = False) -> DefenseComparison:
    """Every defense × clean-set size on one stored attack; writes ``<save_path>/defenses_<id>.{json,csv,png}``
    as one unit (all three or none). An existing comparison there is kept unless ``merge`` (keep its rows that
    this call does not recompute - same test images, seed and base model - so that a new defense is added without
    rerunning the others) or ``force`` (replace it). ``defenses``: specs (None: every fixed defense)."""
    t0 = time.time()
    device = torch.device(device)
    chosen = parse_defenses(default_defenses() if defenses is None else defenses, option="--defenses",
                            fixed_only="compare_defenses")  # the study's rule: fixed models only
    clean_images = parse_clean_images(clean_images)
    out_files = comparison_files(save_path, run_name(attackid, root))
    refuse_overwrite(out_files, merge=merge, force=force, what="defense comparison")
    if merge and out_files[0].exists():
        read_comparison(out_files[0])  # a damaged or misshapen file: one line before any work
    base = clean_model
    params, model, clean_model = load_run(str(attackid), device, root=root, models_root=models_root,
                                          data_root=data_root, clean_model=base)
    name = run_name(attackid, root)
    x, y = eval_images(params, testing_size, seed=seed, data_root=data_root)
    sets = {n: clean_set(params.dataset, n, seed=seed, data_root=data_root, option="--clean-images")
            for n in clean_images}  # nested: prefixes of one seeded permutation
    ref, pred = reference_explanations(clean_model, x, params.explanation_methodStr, batch_size=batch_size,
                                       device=device, progress=progress, with_predictions=True)
    kw = dict(batch_size=batch_size, device=device, clean_expl=ref, clean_pred=pred, progress=progress)
    rows = [{"defense": ROW_CLEAN, "clean_images": None, "seconds": None,
             **evaluate_attack(clean_model, clean_model, params, x, y, **kw)},
            {"defense": ROW_NONE, "clean_images": None, "seconds": None,
             **evaluate_attack(model, clean_model, params, x, y, **kw)}]
    skipped: dict[str, str] = {}
    for label, (d, opts) in chosen.items():  # label: "finetune freeze_bn_stats=True"; a plain name stays itself
        if (why := not_applicable(d, model)) is not None:  # e.g. bnp on the BN-free ResNet20: no row, a reason
            skipped[label] = why
            print(f"notice: {name}: {label} not run: {why}", file=sys.stderr)
            continue
        for asked_n, clean in sets.items():
            infos: dict[str, Any] = {}
            rec = evaluate_defenses(params, clean_model, model, x, y, clean=clean, defenses={label: (d, opts)},
                                    batch_size=batch_size, device=device, reference=(ref, pred), progress=progress,
                                    on_outcome=lambda _, out: infos.update(out.info), share_batch_size=False)[label]
            metrics = {k: v for k, v in rec.items() if k not in ("defense", "options", "seconds", "clean_images")}
            asked = {} if rec["clean_images"] == asked_n else {"clean_images_requested": asked_n}  # split had fewer
            rows.append({"defense": label, "clean_images": rec["clean_images"], **asked, "seconds": rec["seconds"],
                         **diverged_as_none(metrics, f"{label} on {len(clean)} clean images"),
                         "info": finite_or_none(infos)})  # e.g. the training losses of a diverged fine-tuning
    if merge:
        rows = merged_rows(out_files[0], rows, seed=seed, images=len(x), base_model=model.base_model)
    cmp = DefenseComparison(name=name, params=params, device=str(device), seed=seed,
                            test={"split": "test", "images": len(x), "seed": seed}, rows=rows,
                            base_model=model.base_model, not_applicable=skipped)
    check_finite_numbers(cmp.to_dict(), f"the comparison of {name}")  # before any file: nothing half-written
    points = [{"group": r["defense"], "size": r["clean_images"], **r} for r in rows]
    with atomic_unit(out_files) as (json_tmp, csv_tmp, png_tmp):  # all three files or none of them
        write_csv(csv_tmp, cmp.flat_rows())
        defense_scatter(points, png_tmp,
                        title=f"attack {name}: defenses on clean training images ({len(x)} test images)")
        cmp.seconds = time.time() - t0
        cmp.files = out_files
        write_json(json_tmp, cmp.to_dict())
    return cmp
