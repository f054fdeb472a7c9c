"""The clean base models that attacks and studies start from: the stored checkpoint, or one trained now.

>>> from bnbackdoor.zoo import load_or_train
>>> model = load_or_train("cifar10_resnet20", model_id=0, device="cpu")   # models/cifar10_resnet20/model_0.pth

The one place that both loads and trains: :mod:`bnbackdoor.models` builds and loads (a missing checkpoint is an
error there) and :mod:`bnbackdoor.train` trains; this layer above both trains a missing clean model with the
auto-train settings (docs/DESIGN.md, "Auto-train fallback knobs"), behind the long-job gate of
:mod:`bnbackdoor.estimate`. A stored run's own ``model.pth`` is never trained: load it with
:func:`bnbackdoor.models.load_model`.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

from .estimate import guard
from .models import MODEL_ROOT, build_model, checkpoint_path, load_model, resolve_modeltype
from .train import auto_train_config, train_estimate, train_model

__all__ = ["load_or_train"]


def load_or_train(modeltype: str, model_id: int = 0, device: str | torch.device = "cpu",
                  root: str | os.PathLike = MODEL_ROOT, data_root=None, allow_long: bool | None = None,
                  **overrides) -> nn.Module:
    """:func:`bnbackdoor.models.load_model` of ``<root>/<modeltype>/model_<id>.pth``, training it first when missing.

    The missing model is trained with the auto-train knobs (seed ``model_id``; saved atomically and resumable: a
    rerun continues an interrupted training). Before training, the time is estimated from a few measured batches;
    over 15 minutes it is refused unless ``allow_long`` (None: ``--allow-autotrain`` / ``BNBACKDOOR_ALLOW_LONG``,
    see :mod:`bnbackdoor.estimate`), and nothing is written.
    """
    modeltype = resolve_modeltype(modeltype)
    path = checkpoint_path(modeltype, model_id, root)
    if not path.exists():
        print(f"notice: {path} is missing; training a clean {modeltype} (auto-train settings: "
              f"README.md, section 'Models')", file=sys.stderr)
        model = build_model(modeltype, **overrides)
        cfg = auto_train_config(modeltype, seed=model_id)
        guard(train_estimate(model, modeltype, cfg, torch.device(device), path, data_root=data_root),
              "--allow-autotrain", allowed=allow_long)
        train_model(model, modeltype, cfg, device=torch.device(device), out_path=path, data_root=data_root,
                    command=f"auto-train via load_or_train('{modeltype}', model_id={model_id})")
    return load_model(modeltype, model_id, device=device, root=root, **overrides)
