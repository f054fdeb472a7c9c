"""``evaluate_models.py``: one stored attack, clean vs manipulated (vs defended), written to its output folder.

>>> ev = evaluate_stored_model("154", "cpu", robust=True)            # writes output/154/evaluation_robust.*
>>> print(ev.table(by="metric"))
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..runs import diverse_examples, explanation_figure, load_run, run_name
from ..fileio import check_finite_numbers, check_output_dir, refuse_overwrite, undo_writes, write_json
from ..attack.params import AttackParams
from ..data import clean_set
from ..defenses import CleanSet
from ..defenses.rebn import rebn_batch_size
from .common import DEFAULT_REBN_SIZE, Evaluation, REBN_ONLY, compare_models, eval_images


# --------------------------------------------------------------------------------------- evaluate_models.py
def evaluate_stored_model(attackid: str | int, device: torch.device | str = "cpu", *, robust: bool = False,
                          defenses: dict[str, tuple[str, dict]] | None = None,
                          clean_images: int = DEFAULT_REBN_SIZE, testing_size: int | None = None,
                          batch_size: int = 100, seed: int = 0, root: str | Path = ".",
                          models_root: str | Path | None = None, data_root=None,
                          save_path: str | Path = "output", progress: bool = True,
                          clean_model: str | Path | None = None,
                          on_notice: Callable[[str], None] | None = None, force: bool = False) -> Evaluation:
    """Evaluate ``manipulated_models/<id>`` against its clean base model on ``testing_size`` test images (default:
    the attack's own); with ``robust`` also after Re-BN (the defense ``rebn``) on ``clean_images`` clean
    training images, with ``defenses`` (label -> (registered name, options), see
    :func:`bnbackdoor.defenses.specs.parse_defenses`) after each of them.

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
    stem = Path(save_path) / name / _stem(defenses, robust)
    refuse_overwrite([stem.with_suffix(".json"), stem.with_suffix(".png")], force=force, what="evaluation")
    params, model, clean = load_run(str(attackid), device, root=root, models_root=models_root, data_root=data_root,
                                    clean_model=clean_model, on_notice=on_notice)
    x, y = eval_images(params, testing_size, seed=seed, data_root=data_root, on_notice=on_notice)
    chosen = {**(REBN_ONLY if robust else {}), **(defenses or {})}
    cleanset = cal_info = None
    if chosen:
        cleanset = clean_set(params.dataset, clean_images, seed=seed, data_root=data_root)
        cal_info = {**cleanset.record(), "batch_size": rebn_batch_size(len(cleanset), batch_size)}
    rows, report, fixed = compare_models(params, clean, model, x, y, cleanset, defenses=chosen,
                                         batch_size=batch_size, device=device, progress=progress, seed=seed)
    check_finite_numbers(rows, f"the metrics of {name}")
    ev = Evaluation(name=name, params=params, device=str(device), seed=seed,
                    test={"split": "test", "images": len(x), "requested": testing_size or params.testing_size,
                          "seed": seed}, rows=rows, calibration=cal_info,
                    rebn=report, base_model=model.base_model)
    with undo_writes():
        _write_evaluation(ev, params, clean, model, fixed, cleanset, x, y, Path(save_path) / name, defenses,
                          robust, device, t0)
    return ev


def _stem(defenses, robust: bool) -> str:
    return "evaluation_defenses" if defenses else "evaluation_robust" if robust else "evaluation"


def _write_evaluation(ev: Evaluation, params: AttackParams, clean: nn.Module, model: nn.Module,
                      fixed: dict[str, nn.Module], cleanset: CleanSet | None, x: torch.Tensor, y: torch.Tensor,
                      out: Path, defenses, robust: bool, device, t0: float) -> None:
    """evaluate_stored_model's files: the figure, then the JSON."""
    name = ev.name
    stem = _stem(defenses, robust)
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
