"""What the three ancestor-named evaluation scripts share: the row labels, the image sets, the result type
(:class:`Evaluation`), clean vs manipulated vs defended rows (:func:`compare_models`), the Re-BN sample-efficiency
sweep. Each script's back end is its own module: :mod:`.stored`
(``evaluate_models.py``), :mod:`.defense_table` (``evaluate_attack_defense_metrics.py``), :mod:`.explanations`
(``run_generate_explanations.py``).

Where the images come from (the defense must not peek at the evaluation data):

* **Evaluation images**: a deterministic subset of the **test** split, ``load_split(dataset, "test", size, seed)``
  - for the same size and seed exactly the subset the attack's own ``metrics.json`` was measured on.
* **Re-BN calibration images**: a deterministic subset of the clean **training** split
  (:func:`bnbackdoor.data.clean_set`), so it is disjoint from the evaluation images by construction: Re-BN never
  sees a test image. These functions take no other training images; code that does must keep them disjoint from
  the calibration set with ``exclude=``.
* **Sweep sizes** are prefixes of one seeded permutation of the training split, so the sets are nested and the
  largest is exactly the single Re-BN set of the same size and seed (same numbers).
* Re-BN batches: at most ``batch_size`` images, split evenly (:func:`rebn_batch_size`): the cumulative average
  gives every batch the same weight, so equal batches make it the plain mean over the set.

Every Re-BN runs on a fresh copy of the manipulated model; the stored model is never changed.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
from tabulate import tabulate

from ..data import clean_set, load_cache, test_images
from ..errors import UserError
from ..metrics import evaluate_attack, reference_explanations
from ..attack.params import AttackParams
from ..defenses.evaluate import evaluate_defenses
from ..defenses import DEFAULT_DEFENSES, CleanSet, DefenseOutcome, get_defense
from ..defenses.rebn import RebnReport, rebn_batch_size
from ..report.labels import CLEAN_MODEL, MANIPULATED_MODEL

__all__ = ["ROW_CLEAN", "ROW_MANIPULATED", "ROW_REBN", "COLUMNS", "DEFAULT_SWEEP", "Evaluation", "parse_sizes",
           "eval_images", "rebn_batch_size", "compare_models", "rebn_sweep", "format_table", "defense_row",
           "DEFAULT_DEFENSES"]

ROW_CLEAN, ROW_MANIPULATED = CLEAN_MODEL, MANIPULATED_MODEL


def defense_row(label: str) -> str:
    """Row label of a defended model: ``+ <defense label>`` (``+ rebn``, ``+ batchstats B=100 f=1/B``)."""
    return f"+ {label}"


ROW_REBN = defense_row("rebn")          # what --robust adds (the same row as --defense rebn)
REBN_ONLY = {"rebn": ("rebn", {})}
COMPOSITION_BATCHES = (16, 64, 256)
COMPOSITION_FRACTIONS = ("1/B", 0.1, 0.25, 0.5, 1.0)

# evaluate_attack key -> column header, in the order of the tables.
COLUMNS: dict[str, str] = {
    "clean_accuracy": "clean accuracy",
    "attack_success_rate": "attack success",
    "expl_mse_to_target": "MSE to target",
    "expl_dssim_to_target": "DSSIM to target",
    "expl_mse_to_clean": "MSE to clean expl.",
    "expl_dssim_to_clean": "DSSIM to clean expl.",
}
METRIC_ROWS = ("clean_accuracy", "fidelity", "attack_success_rate", "triggered_accuracy", "expl_mse_to_target",
               "expl_dssim_to_target", "expl_mse_to_clean", "expl_dssim_to_clean")
DEFAULT_SWEEP = (32, 128, 512, 2000, 5000)
DEFAULT_REBN_SIZE = 5000
EXPLANATION_METRICS = {"mse": ("mse", "MSE"), "ssim": ("dssim", "DSSIM")}  # --metric -> (metrics key, label)


# ------------------------------------------------------------------------------------------------- helpers
def _positive(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise UserError(f"{what} must be a positive integer, got {value!r}")


def parse_sizes(text: str | Iterable[int]) -> list[int]:
    """``"32,128,512"`` (or a list) -> ``[32, 128, 512]``: positive, distinct, ascending."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise UserError(f"--sweep takes comma-separated positive integers such as 32,128,512; got '{text}'") \
                from None
    else:
        sizes = [int(s) for s in text]
    if not sizes or any(s <= 0 for s in sizes):
        raise UserError(f"--sweep takes comma-separated positive integers such as 32,128,512; got '{text}'")
    return sorted(set(sizes))


def eval_images(params: AttackParams, size: int | None = None, seed: int = 0, data_root=None,
                on_notice=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation images: ``size`` (default ``params.testing_size``) images of the TEST split. More than the
    split holds: all of it, with a notice (``on_notice``, default one stderr line) saying so - the caller records
    ``len(y)``, the number really used."""
    what = "the attack's testing_size" if size is None else "--testing-size"
    size = params.testing_size if size is None else size
    _positive(size, "the number of test images")
    n = len(load_cache(params.dataset, data_root)["y_test"])
    if size > n:
        line = (f"{what} {size} is above the {params.dataset} test split ({n} images); evaluating on all {n} "
                f"(the JSON records \"images\": {n}, \"requested\": {size})")
        (on_notice or (lambda text: print(f"notice: {text}", file=sys.stderr)))(line)
    return test_images(params.dataset, size, seed=seed, data_root=data_root)


def format_table(rows: dict[str, dict[str, Any]], by: str = "model", columns: dict[str, str] | None = None,
                 metrics: Sequence[str] = METRIC_ROWS) -> str:
    """A tabulate table of result rows: ``by="model"`` one row per model (``columns``: key -> header), or
    ``by="metric"`` one row per metric key with a column per model (the layout of attack.py)."""
    if by == "metric":
        body = [[k] + [r.get(k) for r in rows.values()] for k in metrics]
        return tabulate(body, headers=["metric", *rows], floatfmt=".4f", missingval="n/a")
    columns = columns or COLUMNS
    body = [[name] + [r.get(k) for k in columns] for name, r in rows.items()]
    return tabulate(body, headers=["model", *columns.values()], floatfmt=".4f", missingval="n/a")


# ------------------------------------------------------------------------------------------------- results
@dataclass
class Evaluation:
    """What an evaluation measured; ``rows``: row label -> :func:`~bnbackdoor.metrics.evaluate_attack` dict."""
    name: str
    params: AttackParams
    device: str
    seed: int
    test: dict[str, Any]
    rows: dict[str, dict[str, Any]]
    calibration: dict[str, Any] | None = None
    rebn: RebnReport | None = None
    sweep: list[dict[str, Any]] | None = None
    composition: list[dict[str, Any]] | None = None
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)
    base_model: dict[str, Any] | None = None  # the clean model compared with, checked (experiment.check_base)

    def table(self, by: str = "model") -> str:
        return format_table(self.rows, by=by)

    def composition_table(self) -> str:
        if not self.composition:
            return ""
        body = [[p["test_batch"], p["fraction"], p["triggered_per_batch"], p["triggered_images"],
                 p["attack_success_rate"], p["untriggered_target_rate"], p["clean_accuracy"]]
                for p in self.composition]
        return tabulate(body, headers=["B", "f", "triggered per batch", "triggered images", "attack success",
                                       "untriggered target rate", "clean accuracy"], floatfmt=".4f",
                        missingval="n/a")

    def sweep_table(self) -> str:
        if not self.sweep:
            return ""
        keys = ("size", "calibration_images", "clean_accuracy", "attack_success_rate", "expl_mse_to_target",
                "expl_dssim_to_target")
        body = [[r[k] for k in keys] for r in self.sweep]
        return tabulate(body, headers=["calibration size", "calibration images", "clean accuracy", "attack success",
                                       "MSE to target", "DSSIM to target"], floatfmt=".4f", missingval="n/a")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "attack": self.name, "id": self.params.id, "attack_id": self.params.attack_id, "device": self.device,
            "seed": self.seed, "test": self.test, "calibration": self.calibration, "rows": self.rows,
            "rebn": None if self.rebn is None else self.rebn.to_dict(), "seconds": round(self.seconds, 1),
            "parameters": self.params.to_dict(), "base_model": self.base_model,
        }
        if self.sweep is not None:
            d["sweep"] = self.sweep
        if self.composition is not None:
            d["composition"] = self.composition
        return d


def compare_models(params: AttackParams, clean_model: nn.Module, model: nn.Module, x: torch.Tensor,
                   y: torch.Tensor, clean: CleanSet | torch.Tensor | None = None, *,
                   defenses: dict[str, tuple[str, dict]] | None = None, batch_size: int = 100, device=None,
                   progress: bool = True, reference: tuple[torch.Tensor, torch.Tensor] | None = None,
                   seed: int = 0) -> tuple[dict[str, dict[str, Any]], RebnReport | None, dict[str, nn.Module]]:
    """Rows clean model / manipulated model / ``+ <label>`` per defense on test images ``x, y``.

    ``clean``: the defender's clean training set (a :class:`CleanSet`, or bare images); with it and no
    ``defenses``, the single defense is Re-BN (``--robust``). Returns (rows, the first Re-BN report or None,
    label -> defended model for the non-transductive defenses). The clean model's explanations of ``x`` and
    predictions are computed once (or taken from ``reference``, see
    :func:`bnbackdoor.metrics.reference_explanations`) and shared by every row.
    """
    _positive(batch_size, "the batch size")
    ref, pred = reference or reference_explanations(clean_model, x, params.explanation_methodStr, batch_size=batch_size,
                                                    device=device, progress=progress, with_predictions=True)
    kw = dict(batch_size=batch_size, device=device, clean_expl=ref, clean_pred=pred, progress=progress)
    rows = {ROW_CLEAN: evaluate_attack(clean_model, clean_model, params, x, y, **kw),
            ROW_MANIPULATED: evaluate_attack(model, clean_model, params, x, y, **kw)}
    if isinstance(clean, torch.Tensor):
        clean = CleanSet(clean, None, params.dataset, seed=seed)
    if defenses is None:
        defenses = REBN_ONLY if clean is not None else {}
    if defenses and clean is None:
        clean = CleanSet(x[:0], None, params.dataset, seed=seed)   # transductive defenses need no clean data
    reports: list[RebnReport] = []
    fixed: dict[str, nn.Module] = {}

    def keep(label: str, out: DefenseOutcome) -> None:
        if "report" in out.info and out.info.get("defense") == "rebn":
            reports.append(RebnReport.from_dict(out.info["report"]))
        if not get_defense(out.info["defense"]).transductive:
            fixed[label] = out.model

    records = evaluate_defenses(params, clean_model, model, x, y, clean=clean, defenses=defenses,
                                batch_size=batch_size, seed=seed, device=device, reference=(ref, pred),
                                progress=progress, on_outcome=keep)
    rows.update({defense_row(label): r for label, r in records.items()})
    return rows, (reports[0] if reports else None), fixed


def rebn_sweep(params: AttackParams, clean_model: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               clean_images: Sequence[int], *, seed: int = 0, data_root=None, batch_size: int = 100, device=None,
               progress: bool = True, reference: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> list[dict[str, Any]]:
    """Re-BN sample efficiency: per calibration size, Re-BN on a fresh copy of ``model`` with that many clean
    training images (:func:`bnbackdoor.data.clean_set`, nested sets), then every metric on the test images ``x, y``."""
    ref, pred = reference or reference_explanations(clean_model, x, params.explanation_methodStr, batch_size=batch_size,
                                                    device=device, progress=progress, with_predictions=True)
    out = []
    for size in parse_sizes(clean_images):  # the one defense loop, once per calibration size
        cal = clean_set(params.dataset, size, seed=seed, data_root=data_root)
        reports: list[RebnReport] = []
        rec = evaluate_defenses(params, clean_model, model, x, y, clean=cal, defenses=REBN_ONLY, batch_size=batch_size, seed=seed, device=device,
                                reference=(ref, pred), progress=progress,
                                on_outcome=lambda _, o: reports.append(RebnReport.from_dict(o.info["report"])))["rebn"]
        m = {k: v for k, v in rec.items() if k not in ("defense", "options", "seconds", "clean_images")}
        out.append({"size": size, "calibration_images": len(cal), "rebn_batches": reports[0].batches, **m})
    return out
