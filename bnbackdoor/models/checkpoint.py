"""Checkpoints: ``{"state_dict": ..., "meta": {...}}`` written atomically, read with ``weights_only=True``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..divergence import require_finite
from ..errors import UserError
from ..fileio import torch_save


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save({"state_dict": state, "meta": dict(meta)}, path)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta). Accepts our format, a bare state dict, ``{"state_dict": ...}`` from public
    checkpoints, and ``module.``-prefixed keys saved from ``DataParallel``."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails anywhere in zipfile or the unpickler (even IndexError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({first[:120]}); "
                        "delete it to retrain, or restore it") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, meta = obj["state_dict"], obj.get("meta") or {}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, meta = obj, {}
    else:
        raise UserError(f"checkpoint {path} holds no state dict; expected {{'state_dict': ..., 'meta': ...}}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, dict(meta)


def _legacy_bn_counters(model: nn.Module) -> set[str]:
    """``<bn>.num_batches_tracked`` keys: PyTorch < 0.4.1 had no such buffer, and its BatchNorm loader fills it in
    for such checkpoints (public CIFAR ResNet20 weights are of that age). Only these may be missing."""
    return {f"{name}.num_batches_tracked" if name else "num_batches_tracked"
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> nn.Module:
    """``load_state_dict(strict=True)`` with a one-line error naming the file and the mismatch.

    Checkpoints lacking only BatchNorm's ``num_batches_tracked`` counters load (the counters start at 0, as torch
    does for old checkpoints; nothing in eval mode reads them). Non-finite weights (a diverged run) are refused."""
    own = model.state_dict()
    legacy = _legacy_bn_counters(model)
    state = dict(state)
    for k in legacy:
        if k not in state:
            state[k] = torch.zeros_like(own[k])
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[0]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise UserError(f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(parts)} "
                        "(wrong model type or number of classes?)")
    require_finite(state, f"checkpoint {path}", "it comes from a diverged run: rerun that attack or training with "
                   "a lower learning rate")
    model.load_state_dict(state)
    return model
