"""Model registry: ``<dataset>_<arch>`` -> builder, in the spirit of torchvision's builders and timm's registry.

>>> from bnbackdoor.models import load_model
>>> model = load_model("cifar10_resnet20", model_id=0, device="cpu")   # models/cifar10_resnet20/model_0.pth

The registry builds models and loads checkpoints; it never trains (a missing clean model is trained by
:mod:`bnbackdoor.zoo`, one layer up). Every model takes images in [0, 1] (normalisation is its first module) and
its ReLUs can be switched to Softplus(beta) with :func:`set_softplus` / :func:`softplus`. The environment knobs of
docs/DESIGN.md ("Auto-train fallback knobs") are read here and nowhere else.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ..data import DATASETS, dataset_info
from ..errors import UserError
from .checkpoint import load_into, read_checkpoint, save_checkpoint
from .layers import Act, Normalize, set_softplus, softplus
from .resnet import resnet20, resnet20_nbn
from .torchvision_models import MobileNetV3Small, ViTB16
from .vgg import vgg13, vgg13bn
from .wideresnet import WideResNet

__all__ = ["ARCHS", "MODELS", "ModelSpec", "build_model", "load_model", "model_spec", "resolve_modeltype",
           "checkpoint_path", "get_submodule", "cam_layer", "set_softplus", "softplus", "Act", "Normalize",
           "save_checkpoint", "read_checkpoint", "knobs", "MODEL_ROOT"]

MODEL_ROOT = Path("models")


def _env(env: Mapping[str, str], name: str, cast, default):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        if cast is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        return cast(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not a valid {cast.__name__}") from None


def knobs(env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Every environment knob, per architecture: build settings and auto-train settings."""
    env = os.environ if env is None else env
    return {
        "wideresnet28_10": {
            "build": {"depth": _env(env, "WRN_DEPTH", int, 28), "widen_factor": _env(env, "WRN_WIDEN_FACTOR", int, 10),
                      "droprate": _env(env, "WRN_DROPRATE", float, 0.0)},
            "train": {"epochs": _env(env, "WRN_AUTO_EPOCHS", int, 40), "lr": _env(env, "WRN_AUTO_LR", float, 0.1),
                      "batch_size": _env(env, "WRN_AUTO_BS", int, 128)}},
        "mobilenetv3small": {
            "build": {},
            "train": {"epochs": _env(env, "MNV3_AUTO_EPOCHS", int, 60), "lr": _env(env, "MNV3_AUTO_LR", float, 0.1),
                      "batch_size": _env(env, "MNV3_AUTO_BS", int, 128)}},
        "vit_b_16": {
            "build": {},
            "train": {"epochs": _env(env, "VIT_AUTO_EPOCHS", int, 3), "lr": _env(env, "VIT_AUTO_LR", float, 0.01),
                      "batch_size": _env(env, "VIT_AUTO_BS", int, 64),
                      "train_head_only": _env(env, "VIT_TRAIN_HEAD_ONLY", bool, False)}},
        "vgg13": {"build": {}, "train": _vgg_train(env)},
        "vgg13bn": {"build": {}, "train": _vgg_train(env)},
        "resnet20": {"build": {}, "train": {}},
        "resnet20_nbn": {"build": {}, "train": {"lr": 0.05, "grad_clip": 2.0, "epochs": 80}},
        "_": {"verbose": _env(env, "VERBOSE_MODEL_LOAD", bool, False)},
    }


def _vgg_train(env: Mapping[str, str]) -> dict[str, Any]:
    return {"epochs": _env(env, "VGG_AUTO_EPOCHS", int, 40), "lr": _env(env, "VGG_AUTO_LR", float, 0.05),
            "batch_size": _env(env, "VGG_AUTO_BS", int, 128)}


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
               **overrides) -> nn.Module:
    """Load ``models/<modeltype>/model_<id>.pth`` (or ``path``) in eval mode on ``device``; never trains.

    A missing checkpoint is an error naming the command that trains it (:func:`bnbackdoor.zoo.load_or_train`
    trains it instead, behind the long-job gate). The checkpoint's meta is attached as ``model.meta``.
    """
    modeltype = resolve_modeltype(modeltype)
    path = Path(path) if path is not None else checkpoint_path(modeltype, model_id, root)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}; train one with "
                        f"'python scripts/train_clean_model.py {modeltype} cpu --model-id {model_id}'")
    model = build_model(modeltype, **overrides)
    state, meta = read_checkpoint(path)
    load_into(model, state, path)
    model.meta = meta
    if knobs()["_"]["verbose"]:
        print(f"loaded {path} ({meta.get('test_accuracy', '?')} test accuracy)", file=sys.stderr)
    return model.to(device).eval()
