"""Evaluating stored attacks: clean vs manipulated vs manipulated + Re-BN, the Re-BN sample-efficiency sweep, and
explanation grids. The library side of ``evaluate_models.py``, ``evaluate_attack_defense_metrics.py`` and
``run_generate_explanations.py`` (those scripts only parse, call one function here and print).

>>> ev = evaluate_stored_model("154", "cpu", robust=True)            # writes output/154/evaluation_robust.*
>>> print(ev.table(by="metric"))
>>> ev = defense_metrics("154", "cpu", datasize=5000, sweep=[32, 128, 512, 2000, 5000])
>>> rep = generate_explanations("272", "cpu", metric="mse")         # clean model only: 272 has no stored model

Where the images come from (the defense must not peek at the evaluation data):

* **Evaluation images**: a deterministic subset of the **test** split, ``load_split(dataset, "test", size, seed)``
  - for the same size and seed exactly the subset the attack's own ``metrics.json`` was measured on.
* **Re-BN calibration images**: a deterministic subset of the clean **training** split
  (:func:`bnbackdoor.rebn.calibration_set`), so it is disjoint from the evaluation images by construction: Re-BN
  never sees a test image. These functions take no other training images; code that does must keep them disjoint
  from the calibration set with ``exclude=`` (see :func:`calibration`).
* **Sweep sizes** are prefixes of one seeded permutation of the training split, so the sets are nested and the
  largest is exactly the single Re-BN set of the same size and seed (same numbers).
* Re-BN batches: at most ``batch_size`` images, split evenly (:func:`rebn_batch_size`): the cumulative average
  gives every batch the same weight, so equal batches make it the plain mean over the set.

Every Re-BN runs on a fresh copy of the manipulated model; the stored model is never changed.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .data import dataset_info, load_split
from .errors import UserError
from .experiment import diverse_examples, explanation_figure, load_run, predicted_maps, write_csv
from .fileio import write_json
from .metrics import evaluate_attack, reference_explanations
from .models import MODEL_ROOT, load_model
from .params import AttackParams, manipulated_dir, resolve_attack
from .plots import bar_chart, curves, image_grid
from .rebn import RebnReport, calibration_set, rebn
from .targets import target_explanation
from .triggers import apply_trigger

__all__ = ["ROW_CLEAN", "ROW_MANIPULATED", "ROW_REBN", "COLUMNS", "DEFAULT_SWEEP", "Evaluation",
           "ExplanationReport", "run_name", "parse_sizes", "eval_images", "calibration", "rebn_batch_size",
           "rebn_copy", "compare_models", "rebn_sweep", "evaluate_stored_model", "defense_metrics",
           "generate_explanations", "format_table"]

ROW_CLEAN = "clean model"
ROW_MANIPULATED = "manipulated model"
ROW_REBN = "manipulated + Re-BN"

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
def run_name(attackid: str | int, root: str | Path = ".") -> str:
    """The name output files carry: the run folder's name (``154``, ``272``; a JSON path's stem).

    A run folder other than ``manipulated_models/<id>`` (say ``output/154``, what ``attack.py`` writes) is another
    model, so it gets another name: ``<folder>@<its parent path, '+'-joined>`` (``154@output``), relative to the
    current folder when inside it. No attack id contains ``@``, so ``154`` and ``output/154`` never share a file.
    """
    folder = Path(str(attackid))
    stored = manipulated_dir(str(attackid), root)
    if folder.is_dir() and folder.resolve() != stored.resolve():  # load_run reads a folder argument the same way
        path = folder.resolve()
        try:
            path = path.relative_to(Path.cwd().resolve())
        except ValueError:
            pass
        parent = [part for part in path.parent.parts if part != path.anchor]
        return f"{path.name}@{'+'.join(parent) or '.'}"
    return stored.name


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


def eval_images(params: AttackParams, size: int | None = None, seed: int = 0,
                data_root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation images: ``size`` (default ``params.testing_size``) images of the TEST split."""
    size = params.testing_size if size is None else size
    _positive(size, "the number of test images")
    return load_split(params.dataset, "test", size=size, seed=seed, data_root=data_root)


def calibration(params: AttackParams, size: int = DEFAULT_REBN_SIZE, seed: int = 0, data_root=None,
                exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Re-BN calibration images from the clean TRAINING split (never the test split) and a record of them.

    ``exclude``: training indices the calibration set must avoid (other training data a caller uses).
    """
    _positive(size, "the Re-BN calibration size")
    x = calibration_set(params.dataset, size=size, seed=seed, data_root=data_root, exclude=exclude)
    info = {"split": "train", "requested": size, "images": len(x), "seed": seed,
            "excluded": 0 if exclude is None else len(exclude)}
    return x, info


def rebn_batch_size(n: int, cap: int) -> int:
    """Largest batch size <= ``cap`` splitting ``n`` images into equal batches up to one image
    (5000 by 100 -> 100; 512 by 100 -> 86: five of 86 and one of 82)."""
    _positive(cap, "the batch size")
    if n <= 0:
        return cap
    k = math.ceil(n / cap)
    return math.ceil(n / k)


def rebn_copy(model: nn.Module, x_cal: torch.Tensor, batch_size: int = 100, device=None,
              progress: bool = True) -> tuple[nn.Module, RebnReport]:
    """A deep copy of ``model`` with Re-BN applied on ``x_cal`` (``model`` itself is untouched)."""
    fresh = copy.deepcopy(model)
    report = rebn(fresh, x_cal, batch_size=rebn_batch_size(len(x_cal), batch_size), device=device,
                  progress=progress)
    return fresh, report


def format_table(rows: dict[str, dict[str, Any]], by: str = "model", columns: dict[str, str] | None = None,
                 metrics: Sequence[str] = METRIC_ROWS) -> str:
    """A tabulate table of result rows: ``by="model"`` one row per model (``columns``: key -> header), or
    ``by="metric"`` one row per metric key with a column per model (the layout of attack.py)."""
    from tabulate import tabulate

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
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)

    def table(self, by: str = "model") -> str:
        return format_table(self.rows, by=by)

    def sweep_table(self) -> str:
        from tabulate import tabulate

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
            "parameters": self.params.to_dict(),
        }
        if self.sweep is not None:
            d["sweep"] = self.sweep
        return d


def clean_reference(params: AttackParams, clean_model: nn.Module, x: torch.Tensor, batch_size: int, device=None,
                    progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean model's explanations and predictions of ``x``: computed once, shared by every evaluated row."""
    return reference_explanations(clean_model, x, params.explanation_methodStr, batch_size=batch_size, device=device,
                                  progress=progress, with_predictions=True)


def compare_models(params: AttackParams, clean_model: nn.Module, model: nn.Module, x: torch.Tensor,
                   y: torch.Tensor, x_cal: torch.Tensor | None = None, *, batch_size: int = 100, device=None,
                   progress: bool = True, reference: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[dict[str, dict[str, Any]], RebnReport | None, nn.Module | None]:
    """Rows clean model / manipulated model [/ manipulated + Re-BN on ``x_cal``] on test images ``x, y``.

    Returns (rows, Re-BN report or None, the re-estimated copy or None). The clean model's explanations of ``x``
    and predictions are computed once (or taken from ``reference``, see :func:`clean_reference`) and shared by
    every row.
    """
    _positive(batch_size, "the batch size")
    ref, pred = reference or clean_reference(params, clean_model, x, batch_size, device, progress)
    kw = dict(batch_size=batch_size, device=device, clean_expl=ref, clean_pred=pred, progress=progress)
    rows = {ROW_CLEAN: evaluate_attack(clean_model, clean_model, params, x, y, **kw),
            ROW_MANIPULATED: evaluate_attack(model, clean_model, params, x, y, **kw)}
    report = fixed = None
    if x_cal is not None:
        fixed, report = rebn_copy(model, x_cal, batch_size=batch_size, device=device, progress=progress)
        rows[ROW_REBN] = evaluate_attack(fixed, clean_model, params, x, y, **kw)
    return rows, report, fixed


def rebn_sweep(params: AttackParams, clean_model: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               sizes: Sequence[int], *, seed: int = 0, data_root=None, batch_size: int = 100, device=None,
               progress: bool = True, reference: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> list[dict[str, Any]]:
    """Re-BN sample efficiency: per calibration size, Re-BN on a fresh copy of ``model`` with that many clean
    training images (:func:`calibration`, nested sets), then every metric on the test images ``x, y``."""
    ref, pred = reference or clean_reference(params, clean_model, x, batch_size, device, progress)
    out = []
    for size in parse_sizes(sizes):
        x_cal, info = calibration(params, size, seed=seed, data_root=data_root)
        fixed, report = rebn_copy(model, x_cal, batch_size=batch_size, device=device, progress=progress)
        m = evaluate_attack(fixed, clean_model, params, x, y, batch_size=batch_size, device=device,
                            clean_expl=ref, clean_pred=pred, progress=progress)
        out.append({"size": size, "calibration_images": info["images"], "rebn_batches": report.batches, **m})
        del fixed
    return out


# --------------------------------------------------------------------------------------- evaluate_models.py
def evaluate_stored_model(attackid: str | int, device: torch.device | str = "cpu", *, robust: bool = False,
                          rebn_size: int = DEFAULT_REBN_SIZE, testing_size: int | None = None,
                          batch_size: int = 100, seed: int = 0, root: str | Path = ".",
                          models_root: str | Path | None = None, data_root=None,
                          save_path: str | Path = "output", progress: bool = True) -> Evaluation:
    """Evaluate ``manipulated_models/<id>`` against its clean base model (and, with ``robust``, after Re-BN on
    ``rebn_size`` clean training images) on ``testing_size`` test images (default: the attack's own).

    Writes ``<save_path>/<id>/evaluation[_robust].json`` (metrics, data records, Re-BN report) and
    ``evaluation[_robust].png`` (test images of different classes: input, clean model's explanation, triggered
    input, the evaluated model's explanation - after Re-BN with ``robust``).
    """
    t0 = time.time()
    device = torch.device(device)
    params, model, clean = load_run(str(attackid), device, root=root, models_root=models_root, data_root=data_root)
    name = run_name(attackid, root)
    x, y = eval_images(params, testing_size, seed=seed, data_root=data_root)
    x_cal, cal_info = (calibration(params, rebn_size, seed=seed, data_root=data_root) if robust else (None, None))
    if cal_info is not None:
        cal_info["batch_size"] = rebn_batch_size(len(x_cal), batch_size)
    rows, report, fixed = compare_models(params, clean, model, x, y, x_cal, batch_size=batch_size, device=device,
                                         progress=progress)
    ev = Evaluation(name=name, params=params, device=str(device), seed=seed,
                    test={"split": "test", "images": len(x), "seed": seed}, rows=rows, calibration=cal_info,
                    rebn=report)
    out = Path(save_path) / name
    stem = "evaluation_robust" if robust else "evaluation"
    shown = fixed if robust else model
    examples = diverse_examples(y, min(6, params.num_classes))
    title = f"attack {name}: {params.explanation_methodStr}" + (f", after Re-BN ({len(x_cal)} images)" if robust
                                                                 else "")
    ev.files.append(explanation_figure(clean, shown, params, x[examples], out / f"{stem}.png", title=title,
                                       device=device))
    ev.seconds = time.time() - t0
    write_json(out / f"{stem}.json", ev.to_dict())
    ev.files.insert(0, out / f"{stem}.json")
    return ev


# ------------------------------------------------------------------------------ evaluate_attack_defense_metrics.py
def defense_metrics(attackid: str | int, device: torch.device | str = "cpu", *, datasize: int | None = None,
                    batch_size: int = 100, rebn_size: int = DEFAULT_REBN_SIZE,
                    sweep: Sequence[int] | None = None, seed: int = 0, root: str | Path = ".",
                    models_root: str | Path | None = None, data_root=None, save_path: str | Path = "output",
                    progress: bool = True) -> Evaluation:
    """Clean model / manipulated model / manipulated + Re-BN on ``datasize`` test images (default: the attack's
    ``testing_size``); Re-BN on ``rebn_size`` clean training images. With ``sweep`` (calibration sizes) also the
    Re-BN sample-efficiency curve.

    Writes ``<save_path>/<id>_defense.{json,csv,png}`` and, with ``sweep``, ``<id>_rebn_sweep.{json,png}``.
    """
    t0 = time.time()
    device = torch.device(device)
    sizes = parse_sizes(sweep) if sweep is not None else None
    params, model, clean = load_run(str(attackid), device, root=root, models_root=models_root, data_root=data_root)
    name = run_name(attackid, root)
    x, y = eval_images(params, datasize, seed=seed, data_root=data_root)
    x_cal, cal_info = calibration(params, rebn_size, seed=seed, data_root=data_root)
    cal_info["batch_size"] = rebn_batch_size(len(x_cal), batch_size)
    ref = clean_reference(params, clean, x, batch_size, device, progress)
    rows, report, fixed = compare_models(params, clean, model, x, y, x_cal, batch_size=batch_size, device=device,
                                         progress=progress, reference=ref)
    del fixed
    ev = Evaluation(name=name, params=params, device=str(device), seed=seed,
                    test={"split": "test", "images": len(x), "seed": seed}, rows=rows, calibration=cal_info,
                    rebn=report)
    out = Path(save_path)
    write_csv(out / f"{name}_defense.csv", [{"model": k, **v} for k, v in rows.items()])
    bar_chart({k: {COLUMNS[c]: v.get(c) for c in COLUMNS} for k, v in rows.items()}, list(COLUMNS.values()),
              out / f"{name}_defense.png",
              title=f"attack {name}: Re-BN on {len(x_cal)} clean training images, {len(x)} test images")
    ev.files += [out / f"{name}_defense.json", out / f"{name}_defense.csv", out / f"{name}_defense.png"]
    if sizes:
        ev.sweep = rebn_sweep(params, clean, model, x, y, sizes, seed=seed, data_root=data_root,
                              batch_size=batch_size, device=device, progress=progress, reference=ref)
        before = rows[ROW_MANIPULATED]
        write_json(out / f"{name}_rebn_sweep.json", {
            "attack": name, "id": params.id, "seed": seed, "device": str(device),
            "test": ev.test, "calibration_split": "train",
            "without_rebn": {k: before.get(k) for k in COLUMNS}, "sweep": ev.sweep})
        xs = [r["calibration_images"] for r in ev.sweep]
        curves(xs, {"attack success": [r["attack_success_rate"] for r in ev.sweep],
                    "clean accuracy": [r["clean_accuracy"] for r in ev.sweep],
                    "attack success, no Re-BN": [before.get("attack_success_rate")] * len(xs),
                    "clean accuracy, no Re-BN": [before.get("clean_accuracy")] * len(xs)},
               out / f"{name}_rebn_sweep.png", xlabel="Re-BN calibration images (clean training split)",
               ylabel=f"rate on {len(x)} test images", title=f"attack {name}: Re-BN sample efficiency")
        ev.files += [out / f"{name}_rebn_sweep.json", out / f"{name}_rebn_sweep.png"]
    ev.seconds = time.time() - t0
    write_json(out / f"{name}_defense.json", ev.to_dict())
    return ev


# ------------------------------------------------------------------------------- run_generate_explanations.py
@dataclass
class ExplanationReport:
    name: str
    params: AttackParams
    metric: str
    rows: dict[str, dict[str, Any]]     # model label -> evaluate_attack dict
    images: int
    notice: str | None = None
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)

    def columns(self) -> dict[str, str]:
        key, label = EXPLANATION_METRICS[self.metric]
        return {f"expl_{key}_to_target": f"{label}: triggered vs target",
                f"expl_{key}_to_clean": f"{label}: clean vs clean model's expl.",
                "clean_accuracy": "clean accuracy", "attack_success_rate": "attack success"}

    def table(self) -> str:
        return format_table(self.rows, columns=self.columns())

    def to_dict(self) -> dict[str, Any]:
        cols = self.columns()
        return {"attack": self.name, "id": self.params.id, "metric": self.metric,
                "metric_meaning": "mean squared error" if self.metric == "mse" else "DSSIM = (1 - SSIM) / 2",
                "images": self.images, "notice": self.notice,
                "table": {m: {cols[k]: r.get(k) for k in cols} for m, r in self.rows.items()},
                "rows": self.rows, "seconds": round(self.seconds, 1), "parameters": self.params.to_dict()}


def explanation_grid(params: AttackParams, clean: nn.Module, model: nn.Module | None, x: torch.Tensor,
                     path: Path, device=None, title: str = "") -> Path:
    """Rows of test images (different classes). Columns: the input and the clean model's explanation [and the
    manipulated model's], then per trigger the triggered input, the clean model's [and the manipulated model's]
    explanation of it, and the target explanation. Captions: predicted labels."""
    classes = dataset_info(params.dataset).classes
    device = device or next(clean.parameters()).device
    p_c, m_c = predicted_maps(clean, x, params, device)
    cols = ["input", "clean model"]
    col_data: list[tuple[torch.Tensor, list[str]]] = [(x, [""] * len(x)), (m_c, [f"pred: {classes[i]}" for i in p_c])]
    if model is not None:
        p_m, m_m = predicted_maps(model, x, params, device)
        cols.append("manipulated")
        col_data.append((m_m, [f"pred: {classes[i]}" for i in p_m]))
    for trig, target in zip(params.triggerStrs, params.targetStrs):
        xt = apply_trigger(trig, x)
        cols.append(f"+ {trig}")
        col_data.append((xt, [""] * len(x)))
        p, m = predicted_maps(clean, xt, params, device)
        cols.append("clean model (trig.)")
        col_data.append((m, [f"pred: {classes[i]}" for i in p]))
        if model is not None:
            p, m = predicted_maps(model, xt, params, device)
            cols.append("manipulated (trig.)")
            col_data.append((m, [f"pred: {classes[i]}" for i in p]))
        goal = target_explanation(target, clean_expl=m_c, size=x.shape[-1]).expand(len(x), -1, -1, -1)
        cols.append(f"target: {target}")
        col_data.append((goal, [""] * len(x)))
    cells = [[(data[i], caps[i]) for data, caps in col_data] for i in range(len(x))]
    return image_grid(cells, cols, path, title=title)


def generate_explanations(attackid: str | int, device: torch.device | str = "cpu", *, metric: str = "mse",
                          batch_size: int = 100, n_images: int | None = None, seed: int = 0,
                          root: str | Path = ".", models_root: str | Path | None = None, data_root=None,
                          save_path: str | Path = "output", grid_rows: int = 6, progress: bool = True,
                          on_notice: Callable[[str], None] | None = None) -> ExplanationReport:
    """Explanations of clean and triggered test images (``n_images``, default ``testing_size``) by the attack's
    clean model and, when ``manipulated_models/<id>/model.pth`` exists, its manipulated model.

    Writes ``<save_path>/<id>_explanations.png`` (grid, :func:`explanation_grid`) and ``<id>_explanations.json``
    (``metric`` - ``mse`` or ``ssim`` = DSSIM - of triggered inputs' explanations to the target explanation and of
    clean inputs' explanations to the clean model's, per model; plus accuracy and attack success). Without a
    stored manipulated model the report's ``notice`` says so (also passed to ``on_notice`` at once, before the
    work starts) and only the clean model is explained.
    """
    if metric not in EXPLANATION_METRICS:
        raise UserError(f"unknown metric '{metric}'; use {' or '.join(EXPLANATION_METRICS)}")
    _positive(batch_size, "the batch size")
    t0 = time.time()
    device = torch.device(device)
    name = run_name(attackid, root)
    folder = manipulated_dir(str(attackid), root)
    notice = None
    if (folder / "model.pth").exists():
        params, model, clean = load_run(str(attackid), device, root=root, models_root=models_root,
                                        data_root=data_root)
    else:
        params, model = resolve_attack(str(attackid), root=root), None
    x, y = eval_images(params, n_images, seed=seed, data_root=data_root)  # missing data: fail before the notice
    if model is None:
        notice = (f"no manipulated model for '{attackid}' ({folder / 'model.pth'} is missing); "
                  f"explaining the clean model only")
        if on_notice is not None:
            on_notice(notice)
        clean = load_model(params.modeltype, params.model_id, device=device,
                           root=models_root or Path(root) / MODEL_ROOT, data_root=data_root)
    ref, pred = clean_reference(params, clean, x, batch_size, device, progress)
    kw = dict(batch_size=batch_size, device=device, clean_expl=ref, clean_pred=pred, progress=progress)
    rows = {ROW_CLEAN: evaluate_attack(clean, clean, params, x, y, **kw)}
    if model is not None:
        rows[ROW_MANIPULATED] = evaluate_attack(model, clean, params, x, y, **kw)
    rep = ExplanationReport(name=name, params=params, metric=metric, rows=rows, images=len(x), notice=notice)
    out = Path(save_path)
    examples = diverse_examples(y, min(grid_rows, params.num_classes))
    title = (f"attack {name}: {params.explanation_methodStr} explanations"
             + ("" if model is not None else " (clean model only)"))
    rep.files.append(explanation_grid(params, clean, model, x[examples], out / f"{name}_explanations.png",
                                      device=device, title=title))
    rep.seconds = time.time() - t0
    write_json(out / f"{name}_explanations.json", rep.to_dict())
    rep.files.append(out / f"{name}_explanations.json")
    return rep
