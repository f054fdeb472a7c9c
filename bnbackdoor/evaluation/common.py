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
  (:func:`bnbackdoor.defenses.rebn.calibration_set`), so it is disjoint from the evaluation images by construction: Re-BN
  never sees a test image. These functions take no other training images; code that does must keep them disjoint
  from the calibration set with ``exclude=`` (see :func:`calibration`).
* **Sweep sizes** are prefixes of one seeded permutation of the training split, so the sets are nested and the
  largest is exactly the single Re-BN set of the same size and seed (same numbers).
* Re-BN batches: at most ``batch_size`` images, split evenly (:func:`rebn_batch_size`): the cumulative average
  gives every batch the same weight, so equal batches make it the plain mean over the set.

Every Re-BN runs on a fresh copy of the manipulated model; the stored model is never changed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
from tabulate import tabulate

from ..data import clean_set as data_clean_set
from ..data import dataset_info, test_images
from ..errors import UserError
from ..runs import diverse_examples, explanation_figure, load_run, predicted_maps, run_folder, run_name, write_csv
from ..fileio import check_finite_numbers, check_output_dir, undo_writes, write_json
from ..metrics import evaluate_attack, model_device, reference_explanations
from ..models import MODEL_ROOT, checkpoint_path, load_model, weights_sha256
from ..attack.params import AttackParams, resolve_attack
from ..defenses.evaluate import evaluate_defenses, evaluate_transductive
from ..defenses import DEFAULT_DEFENSES, CleanSet, DefenseOutcome, apply_defense, defense_label, get_defense
from ..defenses.rebn import RebnReport, calibration_set, rebn_batch_size
from ..plots import bar_chart, composition_plot, curves, image_grid
from ..targets import target_explanation
from ..triggers import apply_trigger
from ..zoo import load_or_train

__all__ = ["ROW_CLEAN", "ROW_MANIPULATED", "ROW_REBN", "COLUMNS", "DEFAULT_SWEEP", "Evaluation",
           "ExplanationReport", "parse_sizes", "eval_images", "calibration", "rebn_batch_size",
           "rebn_copy", "compare_models", "rebn_sweep", "evaluate_stored_model", "defense_metrics",
           "generate_explanations", "format_table", "defense_row", "clean_set", "parse_defenses", "parse_fraction",
           "composition_curves", "DEFAULT_DEFENSES"]

ROW_CLEAN = "clean model"
ROW_MANIPULATED = "manipulated model"


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


def eval_images(params: AttackParams, size: int | None = None, seed: int = 0,
                data_root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation images: ``size`` (default ``params.testing_size``) images of the TEST split."""
    size = params.testing_size if size is None else size
    _positive(size, "the number of test images")
    return test_images(params.dataset, size, seed=seed, data_root=data_root)


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


def clean_set(params: AttackParams, size: int = DEFAULT_REBN_SIZE, seed: int = 0, data_root=None
              ) -> tuple[CleanSet, dict[str, Any]]:
    """The defender's clean set: the images of :func:`calibration` (same subset) with their labels."""
    _positive(size, "the Re-BN calibration size")
    clean = data_clean_set(params.dataset, size, seed=seed, data_root=data_root)
    return clean, {"split": "train", "requested": size, "images": len(clean), "seed": seed, "excluded": 0}


def rebn_copy(model: nn.Module, x_cal: torch.Tensor, batch_size: int = 100, device=None,
              progress: bool = True, seed: int = 0) -> tuple[nn.Module, RebnReport]:
    """A deep copy of ``model`` with Re-BN (the registered defense ``rebn``) applied on ``x_cal``
    (``model`` itself is untouched)."""
    out = apply_defense("rebn", model, CleanSet(x_cal, None, "", seed=seed), device=device, progress=progress,
                        batch_size=batch_size)
    return out.model, RebnReport.from_dict(out.info["report"])


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
               sizes: Sequence[int], *, seed: int = 0, data_root=None, batch_size: int = 100, device=None,
               progress: bool = True, reference: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> list[dict[str, Any]]:
    """Re-BN sample efficiency: per calibration size, Re-BN on a fresh copy of ``model`` with that many clean
    training images (:func:`calibration`, nested sets), then every metric on the test images ``x, y``."""
    ref, pred = reference or reference_explanations(clean_model, x, params.explanation_methodStr, batch_size=batch_size,
                                                    device=device, progress=progress, with_predictions=True)
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
                          defenses: dict[str, tuple[str, dict]] | None = None,
                          rebn_size: int = DEFAULT_REBN_SIZE, testing_size: int | None = None,
                          batch_size: int = 100, seed: int = 0, root: str | Path = ".",
                          models_root: str | Path | None = None, data_root=None,
                          save_path: str | Path = "output", progress: bool = True,
                          clean_model: str | Path | None = None,
                          on_notice: Callable[[str], None] | None = None) -> Evaluation:
    """Evaluate ``manipulated_models/<id>`` against its clean base model on ``testing_size`` test images (default:
    the attack's own); with ``robust`` also after Re-BN (the defense ``rebn``) on ``rebn_size`` clean training
    images, with ``defenses`` (label -> (registered name, options), see :func:`parse_defenses`) after each of them.

    Writes ``<save_path>/<id>/evaluation[_robust|_defenses].json`` (metrics, data records, Re-BN report) and a
    ``.png`` of test images of different classes: input, clean model's explanation, triggered input and the
    evaluated model's explanation (after Re-BN with ``robust``; after the first non-transductive defense with
    ``defenses``).

    The clean model is ``clean_model`` (a path, ``--clean-model``) or the run's ``model_id``, checked against the
    base the run records (:func:`bnbackdoor.runs.check_base`; the JSON's ``base_model``). A failure while
    writing removes what this evaluation wrote (folders included).
    """
    t0 = time.time()
    device = torch.device(device)
    name = run_name(attackid, root)
    check_output_dir(Path(save_path) / name, "evaluation folder")  # before any work, not after minutes of it
    params, model, clean = load_run(str(attackid), device, root=root, models_root=models_root, data_root=data_root,
                                    clean_model=clean_model, on_notice=on_notice)
    x, y = eval_images(params, testing_size, seed=seed, data_root=data_root)
    chosen = {**(REBN_ONLY if robust else {}), **(defenses or {})}
    cleanset = cal_info = None
    if chosen:
        cleanset, cal_info = clean_set(params, rebn_size, seed=seed, data_root=data_root)
        cal_info["batch_size"] = rebn_batch_size(len(cleanset), batch_size)
    rows, report, fixed = compare_models(params, clean, model, x, y, cleanset, defenses=chosen,
                                         batch_size=batch_size, device=device, progress=progress, seed=seed)
    check_finite_numbers(rows, f"the metrics of {name}")
    ev = Evaluation(name=name, params=params, device=str(device), seed=seed,
                    test={"split": "test", "images": len(x), "seed": seed}, rows=rows, calibration=cal_info,
                    rebn=report, base_model=model.base_model)
    with undo_writes():
        _write_evaluation(ev, params, clean, model, fixed, cleanset, x, y, Path(save_path) / name, defenses,
                          robust, device, t0)
    return ev


def _write_evaluation(ev: Evaluation, params: AttackParams, clean: nn.Module, model: nn.Module,
                      fixed: dict[str, nn.Module], cleanset: CleanSet | None, x: torch.Tensor, y: torch.Tensor,
                      out: Path, defenses, robust: bool, device, t0: float) -> None:
    """evaluate_stored_model's files: the figure, then the JSON."""
    name = ev.name
    stem = "evaluation_defenses" if defenses else "evaluation_robust" if robust else "evaluation"
    shown_label = next(iter(fixed), None)
    shown = fixed[shown_label] if shown_label else model
    column = f"after {'Re-BN' if shown_label == 'rebn' else shown_label}" if shown_label else "manipulated"
    examples = diverse_examples(y, min(6, params.num_classes))
    title = f"attack {name}: {params.explanation_methodStr}"
    if shown_label:
        title += f", {column} ({len(cleanset)} clean training images)"
    ev.files.append(explanation_figure(clean, shown, params, x[examples], out / f"{stem}.png", title=title,
                                       device=device, model_label=column))
    ev.seconds = time.time() - t0
    write_json(out / f"{stem}.json", ev.to_dict())
    ev.files.insert(0, out / f"{stem}.json")


def parse_defenses(names: str, *, augment: bool | None = None, test_batch: int | None = None,
                   trigger_fraction: float | str | None = None) -> dict[str, tuple[str, dict]]:
    """``--defense rebn,batchstats`` with ``--augment``, ``--test-batch``, ``--trigger-fraction`` -> label ->
    (name, options). Each option goes to the chosen defenses that have it; an option no chosen defense has is an
    error. ``trigger_fraction`` may be ``"1/B"`` (one triggered image per test batch)."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    if not chosen:
        raise UserError("--defense takes registered defense names separated by commas, e.g. rebn,batchstats")
    given = {k: v for k, v in (("augment", augment), ("test_batch", test_batch),
                               ("trigger_fraction", trigger_fraction)) if v is not None}
    out: dict[str, tuple[str, dict]] = {}
    used: set[str] = set()
    for n in chosen:
        d = get_defense(n)
        opts = {k: v for k, v in given.items() if k in d.defaults}
        used |= set(opts)
        if opts.get("trigger_fraction") is not None:
            opts["trigger_fraction"] = parse_fraction(opts["trigger_fraction"],
                                                      opts.get("test_batch", d.defaults.get("test_batch")))
        out[defense_label(n, opts)] = (n, opts)
    unused = sorted(set(given) - used)
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise UserError(f"{flags} applies to none of the chosen defenses ({', '.join(chosen)})")
    return out


def parse_fraction(text: float | str, test_batch: int) -> float:
    """``0.25``, ``"0.25"``, ``"1/B"`` (one image per batch of ``test_batch``) or ``"1/64"`` -> a float in (0, 1]."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        t = str(text).strip()
        try:
            if "/" in t:
                num, den = t.split("/", 1)
                value = float(num) / (test_batch if den.strip().upper() == "B" else float(den))
            else:
                value = float(t)
        except (ValueError, ZeroDivisionError):
            raise UserError(f"--trigger-fraction takes a number in (0, 1], 1/B or a fraction like 1/64; got '{text}'") \
                from None
    if not 0 < value <= 1:
        raise UserError(f"--trigger-fraction must be in (0, 1], got {text}")
    return value


# ------------------------------------------------------------------------------ evaluate_attack_defense_metrics.py
def defense_metrics(attackid: str | int, device: torch.device | str = "cpu", *, datasize: int | None = None,
                    batch_size: int = 100, rebn_size: int = DEFAULT_REBN_SIZE,
                    defenses: dict[str, tuple[str, dict]] | None = None,
                    sweep: Sequence[int] | None = None, composition: bool = False,
                    composition_images: int | None = 256, seed: int = 0, root: str | Path = ".",
                    models_root: str | Path | None = None, data_root=None, save_path: str | Path = "output",
                    progress: bool = True, clean_model: str | Path | None = None,
                    on_notice: Callable[[str], None] | None = None) -> Evaluation:
    """Clean model / manipulated model / ``+`` each defense (default :data:`DEFAULT_DEFENSES`) on ``datasize``
    test images (default: the attack's ``testing_size``); the defender's clean set is ``rebn_size`` clean
    training images. With ``sweep`` (calibration sizes) also the Re-BN sample-efficiency curve; with
    ``composition`` the ``batchstats`` composition curves (:func:`composition_curves`, at most
    ``composition_images`` triggered test images per point).

    Writes ``<save_path>/<id>_defense.{json,csv,png}``, with ``sweep`` ``<id>_rebn_sweep.{json,png}``, with
    ``composition`` ``<id>_composition.{json,png}``. The clean model: as in :func:`evaluate_stored_model`
    (``clean_model``, the base check, the JSON's ``base_model``); a failed write removes what this call wrote.
    """
    t0 = time.time()
    device = torch.device(device)
    sizes = parse_sizes(sweep) if sweep is not None else None
    defenses = DEFAULT_DEFENSES if defenses is None else defenses
    params, model, clean = load_run(str(attackid), device, root=root, models_root=models_root, data_root=data_root,
                                    clean_model=clean_model, on_notice=on_notice)
    name = run_name(attackid, root)
    x, y = eval_images(params, datasize, seed=seed, data_root=data_root)
    cleanset, cal_info = clean_set(params, rebn_size, seed=seed, data_root=data_root)
    cal_info["batch_size"] = rebn_batch_size(len(cleanset), batch_size)
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
        _defense_files(ev, params, clean, model, cleanset, x, y, ref, Path(save_path), sizes, composition,
                       composition_images, seed, data_root, batch_size, device, progress, t0)
    return ev


def _defense_files(ev: Evaluation, params: AttackParams, clean: nn.Module, model: nn.Module, cleanset: CleanSet,
                   x: torch.Tensor, y: torch.Tensor, ref, out: Path, sizes, composition: bool,
                   composition_images, seed: int, data_root, batch_size: int, device, progress: bool,
                   t0: float) -> None:
    """defense_metrics' files (and the sweep and composition measurements that write as they go)."""
    name, rows = ev.name, ev.rows
    write_csv(out / f"{name}_defense.csv", [{"model": k, **{c: v for c, v in r.items() if c != "options"}}
                                            for k, r in rows.items()])
    bar_chart({k: {COLUMNS[c]: v.get(c) for c in COLUMNS} for k, v in rows.items()}, list(COLUMNS.values()),
              out / f"{name}_defense.png",
              title=f"attack {name}: defenses (clean set: {len(cleanset)} training images), {len(x)} test images")
    ev.files += [out / f"{name}_defense.json", out / f"{name}_defense.csv", out / f"{name}_defense.png"]
    before = rows[ROW_MANIPULATED]
    if sizes:
        ev.sweep = rebn_sweep(params, clean, model, x, y, sizes, seed=seed, data_root=data_root,
                              batch_size=batch_size, device=device, progress=progress, reference=ref)
        write_json(out / f"{name}_rebn_sweep.json", {
            "attack": name, "id": params.id, "seed": seed, "device": str(device),
            "test": ev.test, "calibration_split": "train",
            "without_rebn": {k: before.get(k) for k in COLUMNS}, "sweep": ev.sweep})
        xs = [r["calibration_images"] for r in ev.sweep]
        curves(xs, {"attack success": [r["attack_success_rate"] for r in ev.sweep],
                    "clean accuracy": [r["clean_accuracy"] for r in ev.sweep]},
               out / f"{name}_rebn_sweep.png", xlabel="Re-BN calibration images (clean training split)",
               ylabel=f"rate on {len(x)} test images", title=f"attack {name}: Re-BN sample efficiency",
               references={"attack success, no defense": before.get("attack_success_rate"),
                           "clean accuracy, no defense": before.get("clean_accuracy")})
        ev.files += [out / f"{name}_rebn_sweep.json", out / f"{name}_rebn_sweep.png"]
    if composition:
        ev.composition = composition_curves(params, clean, model, x, y, name=name, out=out, seed=seed,
                                            device=device, reference=ref, max_triggered=composition_images,
                                            baseline=before, progress=progress)
        ev.files += [out / f"{name}_composition.json", out / f"{name}_composition.png"]
    ev.seconds = time.time() - t0
    write_json(out / f"{name}_defense.json", ev.to_dict())


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
                "attack_success_rate", "untriggered_target_rate", "triggered_accuracy")}})
    write_json(out / f"{name}_composition.json", {
        "attack": name, "id": params.id, "seed": seed, "device": str(device), "test_images": len(x),
        "max_triggered": max_triggered, "defense": "batchstats",
        "no_defense": None if baseline is None else {k: baseline.get(k) for k in ("clean_accuracy",
                                                                                  "attack_success_rate")},
        "points": points})
    composition_plot(points, out / f"{name}_composition.png", baseline=baseline,
                     title=f"attack {name}: test-batch BatchNorm vs the batch's triggered fraction")
    return points



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
    base_model: dict[str, Any] | None = None  # the clean model explained / compared with (experiment.check_base)

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
                "rows": self.rows, "seconds": round(self.seconds, 1), "parameters": self.params.to_dict(),
                "base_model": self.base_model}


def explanation_grid(params: AttackParams, clean: nn.Module, model: nn.Module | None, x: torch.Tensor,
                     path: Path, device=None, title: str = "") -> Path:
    """Rows of test images (different classes). Columns: the input and the clean model's explanation [and the
    manipulated model's], then per trigger the triggered input, the clean model's [and the manipulated model's]
    explanation of it, and the target explanation. Captions: predicted labels."""
    classes = dataset_info(params.dataset).classes
    device = model_device(clean, device)
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
                          on_notice: Callable[[str], None] | None = None,
                          clean_model: str | Path | None = None) -> ExplanationReport:
    """Explanations of clean and triggered test images (``n_images``, default ``testing_size``) by the attack's
    clean model and, when the run has a ``model.pth`` (``manipulated_models/<id>/``, a run folder, or beside a
    ``parameters.json``), its manipulated model.

    Writes ``<save_path>/<id>_explanations.png`` (grid, :func:`explanation_grid`) and ``<id>_explanations.json``
    (``metric`` - ``mse`` or ``ssim`` = DSSIM - of triggered inputs' explanations to the target explanation and of
    clean inputs' explanations to the clean model's, per model; plus accuracy and attack success). Without a
    stored manipulated model the report's ``notice`` says so (also passed to ``on_notice`` at once, before the
    work starts) and only the clean model is explained. The clean model is ``clean_model`` (a path) or the
    attack's ``model_id``; with a manipulated model it is checked against the recorded base (JSON ``base_model``).
    """
    if metric not in EXPLANATION_METRICS:
        raise UserError(f"unknown metric '{metric}'; use {' or '.join(EXPLANATION_METRICS)}")
    _positive(batch_size, "the batch size")
    t0 = time.time()
    device = torch.device(device)
    name = run_name(attackid, root)
    folder = run_folder(attackid, root)
    notice = None
    base = None
    if (folder / "model.pth").exists():
        params, model, clean = load_run(str(attackid), device, root=root, models_root=models_root,
                                        data_root=data_root, clean_model=clean_model, on_notice=on_notice)
        base = model.base_model
    else:
        params, model = resolve_attack(str(attackid), root=root), None
    x, y = eval_images(params, n_images, seed=seed, data_root=data_root)  # missing data: fail before the notice
    if model is None:
        notice = (f"no manipulated model for '{attackid}' ({folder / 'model.pth'} is missing); "
                  f"explaining the clean model only")
        if on_notice is not None:
            on_notice(notice)
        if clean_model is not None:
            clean = load_model(params.modeltype, path=clean_model, device=device,
                               fix="give a clean model's checkpoint with --clean-model")
            path, source = Path(clean_model), "--clean-model"
        else:
            models_root = models_root or Path(root) / MODEL_ROOT
            clean = load_or_train(params.modeltype, params.model_id, device=device, root=models_root,
                                  data_root=data_root)
            path, source = checkpoint_path(params.modeltype, params.model_id, models_root), "model_id"
        base = {"path": str(path), "sha256": weights_sha256(clean), "recorded_sha256": None, "verified": None,
                "source": source}  # nothing to verify: no manipulated model
    ref, pred = reference_explanations(clean, x, params.explanation_methodStr, batch_size=batch_size,
                                       device=device, progress=progress, with_predictions=True)
    kw = dict(batch_size=batch_size, device=device, clean_expl=ref, clean_pred=pred, progress=progress)
    rows = {ROW_CLEAN: evaluate_attack(clean, clean, params, x, y, **kw)}
    if model is not None:
        rows[ROW_MANIPULATED] = evaluate_attack(model, clean, params, x, y, **kw)
    check_finite_numbers(rows, f"the explanation metrics of {name}")
    rep = ExplanationReport(name=name, params=params, metric=metric, rows=rows, images=len(x), notice=notice,
                            base_model=base)
    out = Path(save_path)
    examples = diverse_examples(y, min(grid_rows, params.num_classes))
    title = (f"attack {name}: {params.explanation_methodStr} explanations"
             + ("" if model is not None else " (clean model only)"))
    with undo_writes():
        rep.files.append(explanation_grid(params, clean, model, x[examples], out / f"{name}_explanations.png",
                                          device=device, title=title))
        rep.seconds = time.time() - t0
        write_json(out / f"{name}_explanations.json", rep.to_dict())
    rep.files.append(out / f"{name}_explanations.json")
    return rep
