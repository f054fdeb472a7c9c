"""Input-level detectors on stored attacks: detection rate at a fixed clean FPR, localisation IoU, purification.

The library side of ``scripts/compare_detectors.py``. Per stored attack (:func:`bnbackdoor.runs.load_run`)
and per model - the manipulated one, and its clean base model as the control - every detector of
:mod:`bnbackdoor.detectors`:

* **Defender's data**: ``clean_images`` images of the TRAINING split (a seeded subset); each detector's ``fit``
  uses the first half as its reference images and scores the second half to set its threshold at the clean
  false-positive rate :data:`~bnbackdoor.detectors.FPR` (5 %). It never sees a test image, the trigger or the target.
* **Evaluation images**: the attack's test images (:func:`bnbackdoor.evaluation.common.eval_images`, ``testing_size``
  of them, the same seeded subset as the attack's own metrics), clean and with each of its triggers.

Row keys (one row per model × detector × trigger):

``detection_rate``              flagged share of the triggered test images whose true label is not the target
                                class (the images attack success counts)
``detection_rate_successful``   the same among those the model actually sends to the target
``fpr``                         flagged share of the clean test images (measured; the threshold was fixed on
                                training images)
``iou``                         localisers: mean IoU of the located region with :func:`bnbackdoor.triggers.
                                trigger_mask` over the triggered images counted above (1 for full-image triggers
                                would need a full-image region: there it only measures size)
``attack_success`` / ``clean_accuracy``              before any detector
``attack_success_after`` / ``clean_accuracy_after``  purifiers (Februus): after restoration

Februus has no threshold (``calibrated`` false): its flag is "restoration changed the prediction" and its ``fpr``
is as measured. Deterministic for a seed on one device.

>>> cmp = compare_detectors("154", "cpu", testing_size=500)   # writes output/detectors_154.json
>>> print(cmp.table())
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tabulate import tabulate

from ..attack.params import AttackParams
from ..data import clean_set
from ..detectors import DETECTORS, FPR, detector_label, fit_detector, iou, parse_detectors, parse_detector_spec
from ..errors import UserError
from ..fileio import refuse_overwrite, write_json
from ..report.labels import CLEAN_BASE, MANIPULATED
from ..runs import load_run, run_name, same_base
from ..stored_json import read_detectors
from ..triggers import apply_trigger, trigger_mask
from .common import eval_images

__all__ = ["DEFAULT_CLEAN_IMAGES", "COLUMNS", "DetectorComparison", "detector_rows", "merged_detector_rows", "compare_detectors"]

DEFAULT_CLEAN_IMAGES = 500  # 250 reference + 250 held-out: the 5 % quantile rests on about 12 images beyond it
MODEL_MANIPULATED, MODEL_CLEAN = MANIPULATED, CLEAN_BASE
COLUMNS: dict[str, str] = {
    "attack_success": "attack success",
    "detection_rate": "detection rate",
    "detection_rate_successful": "det. rate (successful)",
    "fpr": "FPR (clean test)",
    "iou": "IoU",
    "attack_success_after": "attack success after",
    "clean_accuracy": "clean acc.",
    "clean_accuracy_after": "clean acc. after",
}


def _share(flags: torch.Tensor, where: torch.Tensor | None = None) -> float | None:
    flags = flags if where is None else flags[where]
    return float(flags.float().mean()) if len(flags) else None


def detector_rows(model: torch.nn.Module, params: AttackParams, x: torch.Tensor, y: torch.Tensor,
                  clean_x: torch.Tensor, detectors: Sequence[str], *, device: torch.device | str = "cpu",
                  batch_size: int = 100, seed: int = 0, progress: bool = True, label: str = MODEL_MANIPULATED
                  ) -> list[dict[str, Any]]:
    """One row per detector × trigger of ``params`` for ``model`` (see the module docstring for the keys)."""
    rows = []
    triggered = {t: apply_trigger(t, x) for t in params.triggerStrs}
    for spec in detectors:
        t0 = time.time()
        name, opts = parse_detector_spec(spec)
        det = fit_detector(name, model, clean_x, device=device, seed=seed, **opts)
        clean_out = det.score(x, batch_size, progress, desc=f"{label}: {name} clean")
        for trigger, tc in zip(params.triggerStrs, params.target_classes):
            out = det.score(triggered[trigger], batch_size, progress, desc=f"{label}: {name} {trigger}")
            eligible = torch.ones_like(y, dtype=torch.bool) if tc is None else y != int(tc)
            success = eligible & (out.pred == int(tc)) if tc is not None else None
            row = {"model": label, "detector": detector_label(name, opts), "trigger": trigger, "target_class": tc,
                   "calibrated": det.detector.calibrated, "triggered_images": int(eligible.sum()),
                   "attack_success": _share(out.pred == int(tc), eligible) if tc is not None else None,
                   "detection_rate": _share(out.flagged, eligible),
                   "detection_rate_successful": _share(out.flagged, success) if success is not None else None,
                   "fpr": _share(clean_out.flagged),
                   "clean_accuracy": _share(clean_out.pred == y)}
            if out.region is not None:
                mask = trigger_mask(trigger, *x.shape[-2:])
                row["iou"] = float(iou(out.region[eligible], mask).mean()) if eligible.any() else None
                row["region_pixels"] = float(out.region.flatten(1).sum(1).double().mean())
            if out.restored_pred is not None:
                row["attack_success_after"] = (_share(out.restored_pred == int(tc), eligible)
                                               if tc is not None else None)
                row["clean_accuracy_after"] = _share(clean_out.restored_pred == y)
            for k, v in out.extra.items():  # per-input values as means (triggered vs clean)
                row[f"{k}_triggered"] = float(v[eligible].double().mean()) if eligible.any() else None
                row[f"{k}_clean"] = float(v.double().mean())
            row["info"] = det.info()
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
    return rows


@dataclass
class DetectorComparison:
    name: str
    params: AttackParams
    device: str
    seed: int
    test: dict[str, Any]
    defender_data: dict[str, Any]
    rows: list[dict[str, Any]]
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)
    base_model: dict[str, Any] | None = None

    def table(self) -> str:
        cols = {k: v for k, v in COLUMNS.items() if any(r.get(k) is not None for r in self.rows)}
        body = [[r["model"], r["detector"], r["trigger"]] + [r.get(k) for k in cols] for r in self.rows]
        return tabulate(body, headers=["model", "detector", "trigger", *cols.values()], floatfmt=".3f",
                        missingval="-")

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.name, "id": self.params.id, "attack_id": self.params.attack_id,
                "device": self.device, "seed": self.seed, "fpr_target": FPR, "test": self.test,
                "defender_data": self.defender_data,
                "detectors": {r["detector"]: _described(r) for r in self.rows if _described(r) is not None},
                "rows": self.rows, "seconds": round(self.seconds, 1), "parameters": self.params.to_dict(),
                "base_model": self.base_model}


def _described(row: dict[str, Any]) -> dict[str, Any] | None:
    """What a row's detector is (summary, the options it ran with); None for one no longer registered."""
    info = row.get("info") if isinstance(row.get("info"), dict) else {}
    d = DETECTORS.get(info.get("detector", row["detector"]))
    return None if d is None else {"summary": d.summary, "options": dict(info.get("options", d.defaults)),
                                   "calibrated": d.calibrated}


def merged_detector_rows(path: Path, old: dict[str, Any], rows: list[dict[str, Any]], *, seed: int, images: int,
                         base_model: dict | None) -> list[dict[str, Any]]:
    """The stored comparison ``old`` with ``rows`` in place of the (model, detector, trigger) rows they recompute,
    new rows after; one measured on other test images, seed or base model is an error, not a silent mix."""
    same = (old.get("seed") == seed and (old.get("test") or {}).get("images") == images
            and same_base(old.get("base_model"), base_model))
    if not same:
        raise UserError(f"--merge: {path} was measured on other test images, seed or base model; pass --force "
                        "instead of --merge to replace it")
    key = lambda r: (r["model"], r["detector"], r["trigger"])  # noqa: E731
    new = {key(r): r for r in rows}
    kept = [new.pop(key(r), r) for r in old["rows"]]
    return kept + list(new.values())


def compare_detectors(attackid: str | int, device: torch.device | str = "cpu", *,
                      detectors: str | Sequence[str] | None = None, clean_images: int = DEFAULT_CLEAN_IMAGES,
                      testing_size: int | None = None, batch_size: int = 100, seed: int = 0,
                      root: str | Path = ".", models_root: str | Path | None = None, data_root=None,
                      save_path: str | Path = "output", progress: bool = True,
                      clean_model: str | Path | None = None, merge: bool = False,
                      force: bool = False) -> DetectorComparison:
    """Every detector on one stored attack and on its clean base model; writes ``<save_path>/detectors_<id>.json``.
    An existing file there is kept unless ``merge`` (keep its rows this call does not recompute) or ``force``."""
    t0 = time.time()
    device = torch.device(device)
    names = parse_detectors(detectors)
    for value, what in ((clean_images, "--clean-images"), (batch_size, "the batch size")):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"{what} must be a positive integer, got {value!r}")
    name = run_name(attackid, root)
    out = Path(save_path) / f"detectors_{name}.json"
    refuse_overwrite([out], merge=merge, force=force, what="detector comparison")
    stored = read_detectors(out) if merge and out.exists() else None  # a damaged one: before any work
    params, model, clean = load_run(str(attackid), device, root=root, models_root=models_root, data_root=data_root,
                                    clean_model=clean_model)
    x, y = eval_images(params, testing_size, seed=seed, data_root=data_root)
    clean_x = clean_set(params.dataset, clean_images, seed=seed, data_root=data_root, option="--clean-images").x
    kw = dict(device=device, batch_size=batch_size, seed=seed, progress=progress)
    rows = (detector_rows(model, params, x, y, clean_x, names, label=MODEL_MANIPULATED, **kw)
            + detector_rows(clean, params, x, y, clean_x, names, label=MODEL_CLEAN, **kw))
    if stored is not None:
        rows = merged_detector_rows(out, stored, rows, seed=seed, images=len(x), base_model=model.base_model)
    cmp = DetectorComparison(name=name, params=params, device=str(device), seed=seed,
                             test={"split": "test", "images": len(x), "seed": seed},
                             defender_data={"split": "train", "images": len(clean_x), "requested": clean_images,
                                            "seed": seed,
                                            "use": "first half reference images, second half held out for the "
                                                   f"threshold at FPR {FPR}"},
                             rows=rows, base_model=model.base_model)
    cmp.seconds = time.time() - t0
    cmp.files = [out]
    write_json(out, cmp.to_dict())
    return cmp
