"""``evaluate_attack_defense_metrics.py``: the defense table, the Re-BN sweep and the test-batch composition curves.

>>> ev = defense_metrics("154", "cpu", datasize=5000, sweep=[32, 128, 512, 2000, 5000])
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..runs import load_run, run_name, write_csv
from ..fileio import atomic_unit, check_finite_numbers, refuse_overwrite, undo_writes, write_json
from ..metrics import reference_explanations
from ..attack.params import AttackParams
from ..defenses.evaluate import evaluate_transductive
from ..data import clean_set
from ..defenses import DEFAULT_DEFENSES, CleanSet, apply_defense
from ..defenses.rebn import rebn_batch_size
from ..defenses.specs import parse_fraction
from ..plots import bar_chart, composition_plot, curves
from .common import (COLUMNS, COMPOSITION_BATCHES, COMPOSITION_FRACTIONS, DEFAULT_REBN_SIZE, Evaluation,
                     ROW_MANIPULATED, compare_models, eval_images, parse_sizes, rebn_sweep)


# ------------------------------------------------------------------------------ evaluate_attack_defense_metrics.py
def defense_metrics(attackid: str | int, device: torch.device | str = "cpu", *, datasize: int | None = None,
                    batch_size: int = 100, clean_images: int = DEFAULT_REBN_SIZE,
                    defenses: dict[str, tuple[str, dict]] | None = None,
                    sweep: Sequence[int] | None = None, composition: bool = False,
                    composition_images: int | None = 256, seed: int = 0, root: str | Path = ".",
                    models_root: str | Path | None = None, data_root=None, save_path: str | Path = "output",
                    progress: bool = True, clean_model: str | Path | None = None,
                    on_notice: Callable[[str], None] | None = None, force: bool = False) -> Evaluation:
    """Clean model / manipulated model / ``+`` each defense (default :data:`DEFAULT_DEFENSES`) on ``datasize``
    test images (default: the attack's ``testing_size``); the defender's clean set is ``clean_images`` clean
    training images. With ``sweep`` (calibration sizes) also the Re-BN sample-efficiency curve; with
    ``composition`` the ``batchstats`` composition curves (:func:`composition_curves`, at most
    ``composition_images`` triggered test images per point).

    Writes ``<save_path>/<id>_defense.{json,csv,png}``, with ``sweep`` ``<id>_rebn_sweep.{json,png}``, with
    ``composition`` ``<id>_composition.{json,png}``. The clean model: as in :func:`evaluate_stored_model`
    (``clean_model``, the base check, the JSON's ``base_model``); a failed write removes what this call wrote.
    """
    t0 = time.time()
    device = torch.device(device)
    sweep = parse_sizes(sweep) if sweep is not None else None
    defenses = DEFAULT_DEFENSES if defenses is None else defenses
    stem = Path(save_path) / run_name(attackid, root)  # the table's files: checked before any work
    refuse_overwrite([Path(f"{stem}_defense.{k}") for k in ("json", "csv", "png")], force=force,
                     what="defense table")
    params, model, clean = load_run(str(attackid), device, root=root, models_root=models_root, data_root=data_root,
                                    clean_model=clean_model, on_notice=on_notice)
    name = run_name(attackid, root)
    x, y = eval_images(params, datasize, seed=seed, data_root=data_root)
    cleanset = clean_set(params.dataset, clean_images, seed=seed, data_root=data_root)
    cal_info = {**cleanset.record(), "batch_size": rebn_batch_size(len(cleanset), batch_size)}
    ref = reference_explanations(clean, x, params.explanation_methodStr, batch_size=batch_size,
                                 device=device, progress=progress, with_predictions=True)
    rows, report, fixed = compare_models(params, clean, model, x, y, cleanset, defenses=defenses,
                                         batch_size=batch_size, device=device, progress=progress, reference=ref,
                                         seed=seed)
    del fixed
    check_finite_numbers(rows, f"the metrics of {name}")
    ev = Evaluation(name=name, params=params, device=str(device), seed=seed,
                    test={"split": "test", "images": len(x), "seed": seed}, rows=rows, calibration=cal_info,
                    rebn=report, base_model=model.base_model)
    with undo_writes():
        _defense_files(ev, params, clean, model, cleanset, x, y, ref, Path(save_path), sweep, composition,
                       composition_images, seed, data_root, batch_size, device, progress, t0)
    return ev


def _defense_files(ev: Evaluation, params: AttackParams, clean: nn.Module, model: nn.Module, cleanset: CleanSet,
                   x: torch.Tensor, y: torch.Tensor, ref, out: Path, sweep, composition: bool,
                   composition_images, seed: int, data_root, batch_size: int, device, progress: bool,
                   t0: float) -> None:
    """defense_metrics' files (and the sweep and composition measurements that write as they go)."""
    name, rows = ev.name, ev.rows
    main = [out / f"{name}_defense.json", out / f"{name}_defense.csv", out / f"{name}_defense.png"]
    ev.files += main
    before = rows[ROW_MANIPULATED]
    if sweep:
        ev.sweep = rebn_sweep(params, clean, model, x, y, sweep, seed=seed, data_root=data_root,
                              batch_size=batch_size, device=device, progress=progress, reference=ref)
        sweep_files = [out / f"{name}_rebn_sweep.json", out / f"{name}_rebn_sweep.png"]
        with atomic_unit(sweep_files) as (json_tmp, png_tmp):  # both or neither
            write_json(json_tmp, {
                "attack": name, "id": params.id, "seed": seed, "device": str(device),
                "test": ev.test, "calibration_split": "train",
                "without_rebn": {k: before.get(k) for k in COLUMNS}, "sweep": ev.sweep})
            xs = [r["calibration_images"] for r in ev.sweep]
            curves(xs, {"attack success": [r["attack_success_rate"] for r in ev.sweep],
                        "clean accuracy": [r["clean_accuracy"] for r in ev.sweep]},
                   png_tmp, xlabel="Re-BN calibration images (clean training split)",
                   ylabel=f"rate on {len(x)} test images", title=f"attack {name}: Re-BN sample efficiency",
                   references={"attack success, no defense": before.get("attack_success_rate"),
                               "clean accuracy, no defense": before.get("clean_accuracy")})
        ev.files += sweep_files
    if composition:
        ev.composition = composition_curves(params, clean, model, x, y, name=name, out=out, seed=seed,
                                            device=device, reference=ref, max_triggered=composition_images,
                                            baseline=before, progress=progress)
        ev.files += [out / f"{name}_composition.json", out / f"{name}_composition.png"]
    ev.seconds = time.time() - t0
    with atomic_unit(main) as (json_tmp, csv_tmp, png_tmp):  # the table's three files: all of them or none
        write_csv(csv_tmp, [{"model": k, **{c: v for c, v in r.items() if c != "options"}} for k, r in rows.items()])
        bar_chart({k: {COLUMNS[c]: v.get(c) for c in COLUMNS} for k, v in rows.items()}, list(COLUMNS.values()),
                  png_tmp, title=f"attack {name}: defenses (clean set: {len(cleanset)} training images), "
                                 f"{len(x)} test images")
        write_json(json_tmp, ev.to_dict())


def composition_curves(params: AttackParams, clean_model: nn.Module, model: nn.Module, x: torch.Tensor,
                       y: torch.Tensor, *, name: str, out: Path, batches: Sequence[int] = COMPOSITION_BATCHES,
                       fractions: Sequence[float | str] = COMPOSITION_FRACTIONS, seed: int = 0, device=None,
                       reference: tuple[torch.Tensor, torch.Tensor] | None = None,
                       max_triggered: int | None = 256, baseline: dict[str, Any] | None = None,
                       progress: bool = True) -> list[dict[str, Any]]:
    """``batchstats`` attack success and clean accuracy against the triggered fraction f of each test batch, for
    each test batch size B. Writes ``<out>/<name>_composition.{json,png}``; returns the points."""
    ref = reference or reference_explanations(clean_model, x, params.explanation_methodStr, batch_size=100,
                                              device=device, progress=progress, with_predictions=True)
    defended = apply_defense("batchstats", model, CleanSet(x[:0], None, params.dataset, seed=seed), device=device,
                             progress=progress).model
    points = []
    for b in batches:
        for f in fractions:
            value = parse_fraction(f, b)
            m = evaluate_transductive(defended, clean_model, params, x, y, test_batch=b, trigger_fraction=value,
                                      max_triggered=max_triggered, seed=seed, device=device, clean_expl=ref[0],
                                      clean_pred=ref[1], explain=False, progress=progress)
            points.append({"test_batch": b, "fraction": str(f), **{k: m[k] for k in (
                "trigger_fraction", "triggered_per_batch", "triggered_images", "test_batches", "clean_accuracy",
                "attack_success_rate", "untriggered_target_rate", "triggered_accuracy", "batches_repeating_images")}})
    files = [out / f"{name}_composition.json", out / f"{name}_composition.png"]
    with atomic_unit(files) as (json_tmp, png_tmp):  # both files or neither
        _write_composition(json_tmp, png_tmp, name, params, seed, device, x, max_triggered, baseline, points)
    return points


def _write_composition(json_path: Path, png_path: Path, name: str, params, seed: int, device, x: torch.Tensor,
                       max_triggered: int | None, baseline: dict[str, Any] | None, points: list[dict]) -> None:
    write_json(json_path, {
        "attack": name, "id": params.id, "seed": seed, "device": str(device), "test_images": len(x),
        "max_triggered": max_triggered, "defense": "batchstats",
        "no_defense": None if baseline is None else {k: baseline.get(k) for k in ("clean_accuracy",
                                                                                  "attack_success_rate")},
        "points": points})
    composition_plot(points, png_path, baseline=baseline,
                     title=f"attack {name}: test-batch BatchNorm vs the batch's triggered fraction")
