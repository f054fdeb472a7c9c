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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ..data import DATASETS, dataset_info
from ..errors import UserError
from .checkpoint import CLEAN_MODEL_FIX, load_into, read_checkpoint, save_checkpoint, weights_sha256
from .layers import Act, Normalize, set_softplus, softplus
from .resnet import resnet20, resnet20_nbn
from .torchvision_models import MobileNetV3Small, ViTB16
from .vgg import vgg13, vgg13bn
from .wideresnet import WideResNet

__all__ = ["ARCHS", "MODELS", "ModelSpec", "build_model", "load_model", "model_spec", "resolve_modeltype",
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


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    builder: Callable[..., nn.Module]
    # Grad-CAM target layer: a dotted module path (negative indices count from the end).
    cam_layer: str
    # ViT: the target layer outputs tokens (B, 1 + P, D) that explanations reshape to the patch grid.
    tokens: bool = False
    has_bn: bool = True
    notes: str = ""


def _mnv3(num_classes, mean, std, **kw):
    return MobileNetV3Small(num_classes, mean, std)


def _wrn(num_classes, mean, std, depth=28, widen_factor=10, droprate=0.0):
    return WideResNet(depth, widen_factor, droprate, num_classes, mean, std)


def _vit(num_classes, mean, std, **kw):
    return ViTB16(num_classes, mean, std, **kw)


ARCHS: dict[str, ModelSpec] = {
    "resnet20": ModelSpec("resnet20", lambda n, m, s: resnet20(n, m, s), "layer3.2.bn2"),
    "resnet20_nbn": ModelSpec("resnet20_nbn", lambda n, m, s: resnet20_nbn(n, m, s), "layer3.2.conv2",
                              has_bn=False, notes="no BatchNorm; Grad-CAM on the last block's last conv"),
    "vgg13": ModelSpec("vgg13", lambda n, m, s: vgg13(n, m, s), "features.-3", has_bn=False,
                       notes="Grad-CAM on the last conv (2×2 map before the last pool)"),
    "vgg13bn": ModelSpec("vgg13bn", lambda n, m, s: vgg13bn(n, m, s), "features.-3",
                         notes="Grad-CAM on the last BN (2×2 map before the last pool)"),
    "wideresnet28_10": ModelSpec("wideresnet28_10", _wrn, "bn", notes="Grad-CAM on the final BN (8×8)"),
    # Not the last 1×1 conv (4×4 at 32×32): with that layer the red-herring attack moved attack success but not
    # the map (manipulated_models/*MNV3154/README.md); the last 8×8 block matches ResNet20's map size.
    "mobilenetv3small": ModelSpec("mobilenetv3small", _mnv3, "features.8",
                                  notes="Grad-CAM on the last 8×8 block (features.8, 48 channels)"),
    "vit_b_16": ModelSpec("vit_b_16", _vit, "vit.encoder.layers.-1", tokens=True, has_bn=False,
                          notes="Grad-CAM on the last encoder block's tokens, reshaped to the patch grid"),
}

MODELS: dict[str, tuple[str, str]] = {f"{d}_{a}": (d, a) for d in DATASETS for a in ARCHS}
ALIASES = {"resnet20_normal": "cifar10_resnet20"}


def resolve_modeltype(modeltype: str) -> str:
    name = ALIASES.get(modeltype, modeltype)
    if name not in MODELS:
        raise UserError(f"unknown model type '{modeltype}'; known: {', '.join(list(MODELS) + list(ALIASES))}")
    return name


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
