"""The "scratch" regime: a model trained from scratch on a poisoned training set (classic data poisoning).

The counterpart of :func:`bnbackdoor.attack.finetune.finetune` for ``regime`` "scratch": the network starts from a fresh,
seeded initialisation and is trained with the clean-model recipe (:mod:`bnbackdoor.train`: SGD + Nesterov,
one-cycle learning rate peaking at ``learning_rate``, ``max_epochs`` epochs of ``batch_size``, crops and flips,
label smoothing, weight decay) on the training set poisoned by :func:`bnbackdoor.poisoning.poison_training_set`
(``percentage_trigger`` of it, trigger ``triggerStrs[0]``, target ``target_classes[0]``). BatchNorm is in train mode
throughout, so its running statistics are estimated from the poisoned data - the regime in which "backdoors hide in
BatchNorm" can hold at all. The run's clean model (``models/<modeltype>/model_<model_id>.pth``, the same recipe
on the clean set) is the reference every metric is compared with.

Resumable like clean training (``<run_dir>/resume.pt`` after every epoch and every 2 minutes inside one); a state
of a run with other parameters or seed is refused.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..data import load_split
from ..estimate import Estimate
from ..fileio import read_state
from .finetune import FinetuneResult
from .gradlog import GradLogger
from ..metrics import evaluate_attack
from ..models import build_model
from .params import AttackParams
from ..poisoning import poison_training_set
from ..train import PARTIAL_KEYS, TrainConfig, auto_train_config, train_estimate, train_model


def scratch_config(params: AttackParams, seed: int) -> TrainConfig:
    """The clean-model recipe of ``params.modeltype`` with the run's epochs, peak learning rate, batch and seed."""
    cfg = auto_train_config(params.modeltype, seed=seed)
    return dataclasses.replace(cfg, epochs=params.max_epochs, lr=params.learning_rate, batch_size=params.batch_size,
                               precision=params.precision)


def fresh_model(params: AttackParams, seed: int) -> nn.Module:
    """The untrained network, initialised from ``seed``."""
    torch.manual_seed(seed)
    return build_model(params.modeltype)


def scratch_estimate(params: AttackParams, device, run_dir: Path, data_root=None, seed: int = 0) -> Estimate:
    """The remaining training time, from a few measured SGD steps (the resumable state counts what is done)."""
    return train_estimate(fresh_model(params, seed), params.modeltype, scratch_config(params, seed),
                          torch.device(device), run_dir / "model.pth", data_root=data_root,
                          train_size=params.training_size, partial_path=run_dir / "resume.pt",
                          what=f"attack {params.id}: training a poisoned {params.canonical_modeltype} from scratch")


def train_poisoned(clean_model: nn.Module, params: AttackParams, *, device: torch.device, run_dir: Path,
                   data_root=None, seed: int = 0, grad_layer: int | str | None = None,
                   grad_csv: Callable[[int], Path] | None = None,
                   test_data: tuple[torch.Tensor, torch.Tensor], test_ref: tuple[torch.Tensor, torch.Tensor],
                   progress: bool = True, eval_batch_size: int = 200, stop_after: int | None = None) -> FinetuneResult:
    """Train a fresh model on the poisoned set (module docstring); the last history row holds its metrics."""
    device = torch.device(device)
    x, y = load_split(params.dataset, "train", size=params.training_size, seed=seed, data_root=data_root,
                      as_uint8=True)
    poisoned = poison_training_set(x, y, params.triggerStrs[0], params.target_classes[0],
                                   params.percentage_trigger, seed=seed)
    model = fresh_model(params, seed)
    partial = run_dir / "resume.pt"
    seconds_before = read_state(partial, PARTIAL_KEYS)["elapsed"] if partial.exists() else 0.0

    logger = GradLogger(model, grad_layer) if grad_layer is not None else None
    meta = train_model(model, params.modeltype, scratch_config(params, seed), device, run_dir / "model.pth",
                       data_root=data_root, dataset=params.dataset,
                       train_data=(poisoned.x.to(device), poisoned.y.to(device)), partial_path=partial,
                       save=False, resume_check=lambda state: params.check_resume(state, seed, partial),
                       extra_state={"params": params.to_dict(), "seed": seed},
                       grad_logger=logger, grad_csv=grad_csv, progress=progress, stop_after=stop_after)
    model.eval()
    x_test, y_test = test_data
    metrics = evaluate_attack(model, clean_model, params, x_test, y_test, batch_size=eval_batch_size,
                              device=device, clean_expl=test_ref[0], clean_pred=test_ref[1], progress=False)
    history = [dict(row) for row in meta["history"]]
    history[-1].update({"seconds": meta["train_seconds"], **poisoned.record(),  # what was done, and what was asked
                        "poisoned_share_asked": params.percentage_trigger, **metrics})
    seconds = meta["train_seconds"]
    return FinetuneResult(model, history, seconds, max(0.0, seconds - seconds_before), meta["precision"])
