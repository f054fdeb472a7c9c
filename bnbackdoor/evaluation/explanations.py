"""``run_generate_explanations.py``: explanation grids and distances of the clean and the manipulated model.

>>> rep = generate_explanations("272", "cpu", metric="mse")         # clean model only: 272 has no stored model
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..data import dataset_info
from ..errors import UserError
from ..stored_json import repo_relative
from ..runs import diverse_examples, load_run, predicted_maps, run_folder, run_name
from ..fileio import check_finite_numbers, refuse_overwrite, undo_writes, write_json
from ..metrics import evaluate_attack, model_device, reference_explanations
from ..models import MODEL_ROOT, checkpoint_path, load_model, weights_sha256
from ..attack.params import AttackParams, resolve_attack
from ..plots import image_grid
from ..targets import target_explanation
from ..triggers import apply_trigger
from ..zoo import load_or_train
from .common import EXPLANATION_METRICS, ROW_CLEAN, ROW_MANIPULATED, _positive, eval_images, format_table


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
                          clean_model: str | Path | None = None, force: bool = False) -> ExplanationReport:
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
    refuse_overwrite([Path(save_path) / f"{name}_explanations.{k}" for k in ("json", "png")], force=force,
                     what="explanation report")  # before any work
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
        base = {"path": repo_relative(path), "sha256": weights_sha256(clean), "recorded_sha256": None, "verified": None,
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
