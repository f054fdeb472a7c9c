"""The attack regimes: how a run's manipulated model comes about (``params.regime``, :data:`params.REGIMES`).

Each record gives the regime's time estimate, its training and the provenance ``model.pth``'s meta records; the run
layer (:func:`bnbackdoor.runs.run_attack`) looks the record up and never branches on the regime. What each regime
allows is :data:`bnbackdoor.attack.params.NO_EFFECT`. A new regime is one record here plus its name there.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from ..errors import UserError
from ..estimate import Estimate
from .finetune import FinetuneResult, finetune, finetune_estimate
from .params import REGIMES as REGIME_NAMES
from .params import AttackParams
from .scratch import scratch_estimate, train_poisoned


@dataclass(frozen=True)
class Regime:
    """How a run's manipulated model comes about (``params.regime``): its time estimate and its training."""
    estimate: Callable[..., Estimate]   # (clean_model, params, device, run_dir, data_root, seed)
    train: Callable[..., FinetuneResult]  # (clean_model, params, *, device, run_dir, ...) -> the trained model
    provenance: Callable[[AttackParams], dict]  # what model.pth's meta says the model came from
    recipe: Callable[[AttackParams], str]  # the promoted README's "epochs × batch" cell (campaigns.catalogue)
    step: str  # what the README calls the timed training step
    fine_tunes_base: bool  # the model is the base model changed (so the ancestor's fine-tuning runs compare)


def _finetune_train(clean_model: nn.Module, params: AttackParams, *, on_epoch=None, **kw) -> FinetuneResult:
    return finetune(copy.deepcopy(clean_model), clean_model, params, on_epoch=on_epoch, **kw)


def _scratch_train(clean_model: nn.Module, params: AttackParams, *, on_epoch=None, **kw) -> FinetuneResult:
    if params.save_intermediate_models:
        raise UserError(f"attack {params.id}: save_intermediate_models is not supported when training from scratch "
                        "(regime 'scratch'); set it to false")
    return train_poisoned(clean_model, params, **kw)


REGIMES: dict[str, Regime] = {
    "finetune": Regime(
        lambda clean, p, device, out, data_root, seed: finetune_estimate(clean, p, device, out, data_root),
        _finetune_train, lambda p: {"base_model": f"{p.modeltype}/model_{p.model_id}"},
        lambda p: (f"{p.max_epochs} × {p.batch_size}, Adam lr {p.learning_rate:g} × {p.decay_rate:g} per epoch, "
                   f"loss weight {p.loss_weight:g}, {p.percentage_trigger:g} of each batch triggered"),
        "fine-tuning", True),
    "scratch": Regime(
        lambda clean, p, device, out, data_root, seed: scratch_estimate(p, device, out, data_root, seed),
        _scratch_train, lambda p: {"base_model": None, "trained_from": "scratch (poisoned training set)",
                                   "reference_model": f"{p.modeltype}/model_{p.model_id}"},
        lambda p: (f"{p.max_epochs} × {p.batch_size}, the clean-model recipe (SGD + Nesterov, one-cycle lr peaking "
                   f"at {p.learning_rate:g}), {p.percentage_trigger:g} of the training set poisoned"),
        "training", False),
}
assert tuple(REGIMES) == REGIME_NAMES, "attack.params.REGIMES and the regime records disagree"
