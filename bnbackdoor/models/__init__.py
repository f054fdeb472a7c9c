"""Model registry: ``<dataset>_<arch>`` -> builder, in the spirit of torchvision's builders and timm's registry.

>>> from bnbackdoor.models import load_model
>>> model = load_model("cifar10_resnet20", model_id=0, device="cpu")   # models/cifar10_resnet20/model_0.pth

The registry builds models and loads checkpoints; it never trains (a missing clean model is trained by
:mod:`bnbackdoor.zoo`, one layer up). Every model takes images in [0, 1] (normalisation is its first module) and
its ReLUs can be switched to Softplus(beta) with :func:`set_softplus` / :func:`softplus`. The environment knobs of
docs/DESIGN.md ("Auto-train fallback knobs") are read here and nowhere else.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..data import DATASETS, dataset_info
from ..errors import UserError
from .checkpoint import CLEAN_MODEL_FIX, load_into, read_checkpoint, save_checkpoint, weights_sha256
from .layers import Act, Normalize, set_softplus, softplus
from .registry import ARCHS, ModelSpec, register_arch
# Importing an architecture module registers it (its facts sit next to its builder).
from . import resnet, vgg, wideresnet, torchvision_models  # noqa: F401,I001  (registration, in this order)

__all__ = ["ARCHS", "MODELS", "ModelSpec", "register_arch", "arch_of", "build_model", "load_model", "model_spec", "resolve_modeltype",
           "checkpoint_path", "get_submodule", "cam_layer", "set_softplus", "softplus", "Act", "Normalize",
           "save_checkpoint", "read_checkpoint", "knobs", "MODEL_ROOT", "weights_sha256", "CLEAN_MODEL_FIX"]

MODEL_ROOT = Path("models")


def _env(env: Mapping[str, str], name: str, cast, default, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, hi_open: bool = False):
    """Knob ``name`` from ``env`` (``default`` when unset), cast and range-checked where it is read: a bad value is
    a one-line UserError naming the variable, its value and what is allowed."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if cast is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    kind = "an integer" if cast is int else "a number"
    try:
        value = cast(raw.strip())
    except ValueError:
        raise UserError(f"environment variable {name}={raw[:40]!r} is not {kind}; unset it or give {kind}") from None
    low = lo is not None and (value <= lo if lo_open else value < lo)
    high = hi is not None and (value >= hi if hi_open else value > hi)
    if (cast is float and not math.isfinite(value)) or low or high:
        if hi is None:
            allowed = f"{kind} {'>' if lo_open else '>='} {lo}"
        else:
            allowed = f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise UserError(f"environment variable {name}={raw[:40]} is out of range; allowed: {allowed} "
                        f"(unset it for the default {default})")
    return value


def _epochs(env, name, default):
    return _env(env, name, int, default, lo=1)


def _lr(env, name, default):
    return _env(env, name, float, default, lo=0, lo_open=True)


def _bs(env, name, default):
    return _env(env, name, int, default, lo=1)


def knobs(env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Every environment knob, per architecture: build settings and auto-train settings (range-checked)."""
    env = os.environ if env is None else env
    depth = _env(env, "WRN_DEPTH", int, 28, lo=10)
    if (depth - 4) % 6:
        raise UserError(f"environment variable WRN_DEPTH={depth} is not a WideResNet depth; allowed: 6n + 4 >= 10 "
                        "(10, 16, 22, 28, ...; unset it for the default 28)")
    return {
        "wideresnet28_10": {
            "build": {"depth": depth, "widen_factor": _env(env, "WRN_WIDEN_FACTOR", int, 10, lo=1),
                      "droprate": _env(env, "WRN_DROPRATE", float, 0.0, lo=0, hi=1, hi_open=True)},
            "train": {"epochs": _epochs(env, "WRN_AUTO_EPOCHS", 40), "lr": _lr(env, "WRN_AUTO_LR", 0.1),
                      "batch_size": _bs(env, "WRN_AUTO_BS", 128)}},
        "mobilenetv3small": {
            "build": {},
            "train": {"epochs": _epochs(env, "MNV3_AUTO_EPOCHS", 60), "lr": _lr(env, "MNV3_AUTO_LR", 0.1),
                      "batch_size": _bs(env, "MNV3_AUTO_BS", 128)}},
        "vit_b_16": {
            "build": {},
            "train": {"epochs": _epochs(env, "VIT_AUTO_EPOCHS", 3), "lr": _lr(env, "VIT_AUTO_LR", 0.01),
                      "batch_size": _bs(env, "VIT_AUTO_BS", 64),
                      "train_head_only": _env(env, "VIT_TRAIN_HEAD_ONLY", bool, False)}},
        "vgg13": {"build": {}, "train": _vgg_train(env)},
        "vgg13bn": {"build": {}, "train": _vgg_train(env)},
        "resnet20": {"build": {}, "train": {}},
        "resnet20_nbn": {"build": {}, "train": {"lr": 0.05, "grad_clip": 2.0, "epochs": 80}},
        "_": {"verbose": _env(env, "VERBOSE_MODEL_LOAD", bool, False)},
    }


def _vgg_train(env: Mapping[str, str]) -> dict[str, Any]:
    return {"epochs": _epochs(env, "VGG_AUTO_EPOCHS", 40), "lr": _lr(env, "VGG_AUTO_LR", 0.05),
            "batch_size": _bs(env, "VGG_AUTO_BS", 128)}


MODELS: dict[str, tuple[str, str]] = {f"{d}_{a}": (d, a) for d in DATASETS for a in ARCHS}
ALIASES = {"resnet20_normal": "cifar10_resnet20"}


def resolve_modeltype(modeltype: str) -> str:
    name = ALIASES.get(modeltype, modeltype)
    if name not in MODELS:
        raise UserError(f"unknown model type '{modeltype}'; known: {', '.join(list(MODELS) + list(ALIASES))}")
    return name


def arch_of(model: nn.Module) -> str | None:
    """The registered architecture of a model built by :func:`build_model` (None for any other module)."""
    return MODELS.get(getattr(model, "modeltype", None) or "", (None, None))[1]


def model_spec(modeltype: str) -> ModelSpec:
    return ARCHS[MODELS[resolve_modeltype(modeltype)][1]]


def build_model(modeltype: str, **overrides) -> nn.Module:
    """A freshly initialised model; ``overrides`` replace the knob defaults (e.g. a tiny WRN for tests)."""
    dataset, arch = MODELS[resolve_modeltype(modeltype)]
    info = dataset_info(dataset)
    kwargs = {**knobs()[arch]["build"], **overrides}
    model = ARCHS[arch].builder(info.num_classes, info.mean, info.std, **kwargs)
    model.modeltype = f"{dataset}_{arch}"  # lets explanations find the declared Grad-CAM layer
    return model


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted path such as ``layer3.2.bn2`` or ``features.-1.1`` (negative indices allowed)."""
    mod = model
    for part in path.split("."):
        if part.lstrip("-").isdigit():
            mod = list(mod.children())[int(part)]
        else:
            mod = getattr(mod, part)
    return mod


def cam_layer(model: nn.Module, modeltype: str | None = None) -> nn.Module:
    """The Grad-CAM target layer declared for ``modeltype`` (default: the model's own ``modeltype``)."""
    modeltype = modeltype or getattr(model, "modeltype", None)
    if modeltype is None:
        raise UserError("model has no 'modeltype'; build it with bnbackdoor.models.build_model or pass the layer")
    return get_submodule(model, model_spec(modeltype).cam_layer)


def checkpoint_path(modeltype: str, model_id: int = 0, root: str | os.PathLike = MODEL_ROOT) -> Path:
    return Path(root) / resolve_modeltype(modeltype) / f"model_{model_id}.pth"


def load_model(modeltype: str, model_id: int = 0, device: str | torch.device = "cpu",
               root: str | os.PathLike = MODEL_ROOT, path: str | os.PathLike | None = None,
               fix: str = CLEAN_MODEL_FIX, **overrides) -> nn.Module:
    """Load ``models/<modeltype>/model_<id>.pth`` (or ``path``) in eval mode on ``device``; never trains.

    A missing checkpoint is an error naming the command that trains it (:func:`bnbackdoor.zoo.load_or_train`
    trains it instead, behind the long-job gate). The checkpoint's meta is attached as ``model.meta``. ``fix``
    ends the error for an unreadable file (default: a clean model's fix; a run's model.pth passes its own).
    """
    modeltype = resolve_modeltype(modeltype)
    path = Path(path) if path is not None else checkpoint_path(modeltype, model_id, root)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}; train one with "
                        f"'python scripts/train_clean_model.py {modeltype} cpu --model-id {model_id}'")
    model = build_model(modeltype, **overrides)
    state, meta = read_checkpoint(path, fix=fix)
    load_into(model, state, path)
    model.meta = meta
    if knobs()["_"]["verbose"]:
        print(f"loaded {path} ({meta.get('test_accuracy', '?')} test accuracy)", file=sys.stderr)
    return model.to(device).eval()
