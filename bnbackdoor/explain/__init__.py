"""Differentiable explanations, one entry point in the spirit of Captum's ``attribute(inputs, target=...)``.

>>> maps = explain(model, images, "grad_cam")                        # (B, 1, 32, 32), normalised, no graph
>>> logits, maps = explain_with_logits(model, x, "relevance_cam", target=y, create_graph=True)  # attack step

Methods (``METHODS``; ``gradient`` is an alias of ``grad``):

``grad``           ``|∂ logit_t / ∂ x|`` -> (B, 3, H, W). Absolute value, as Captum's ``Saliency(abs=True)``.
``grad_cam``       ``ReLU(Σ_k w_k A_k)``, ``w_k`` = spatial mean of ``∂ logit_t / ∂ A_k`` -> (B, 1, H, W).
``relevance_cam``  same map with ``w_k`` = spatial sum of the LRP-ε relevance of ``logit_t`` at A (Lee et al.,
                   CVPR 2021; rules in :mod:`.lrp`) -> (B, 1, H, W). CNNs only; ViT is an error.

* ``target``: ``None`` explains the predicted class (argmax; no gradient flows through the choice), an int the same
  class for every image, a (B,) tensor/sequence one class per image. The class *score* is the raw logit.
* CAM layer A: ``layer`` (a module or dotted path) or the architecture's declared ``ModelSpec.cam_layer``
  (ResNet20: ``layer3.2.bn2``). ViT (``spec.tokens``): the tokens (B, 1+P, D) lose the class token and become
  (B, D, √P, √P). CAMs are upsampled bilinearly (``align_corners=False``) to the input size.
* Sign conventions: all maps are non-negative (|gradient|; CAMs after ReLU). Grad-CAM and Relevance-CAM weights
  may be negative before the ReLU.
* ``detach_weights`` (default True, as the ancestor): the CAM channel weights are constants for the map's own
  gradient; the map depends on the parameters through A only (and costs no second-order pass).
* ``agg``: ``None`` keeps the channels (3 for ``grad``), ``"max"``/``"mean"`` reduce them to 1
  (:func:`bnbackdoor.losses.aggregate_channels`).
* ``normalize`` (default True), applied after ``agg``: per image, divided by the maximum over (C, H, W) plus 1e-12
  (:func:`bnbackdoor.losses.normalize_maps`), so maps lie in [0, 1] with maximum 1 (an all-zero map stays 0).
* ``create_graph=False`` (evaluation): maps and logits come back detached. ``True`` (training): both stay in the
  graph and the map is differentiable w.r.t. the parameters (double backprop). Either way gradients are taken
  w.r.t. the captured activation / the inputs only, so no parameter's ``.grad`` is ever touched.
* The model is used as it is (train/eval mode, ReLU or Softplus): the caller switches Softplus(beta) with
  :func:`bnbackdoor.models.softplus` for training. In train mode BatchNorm couples the images of a batch, so each
  image's explanation then depends on the others (as in any batched implementation).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import UserError
from ..losses import aggregate_channels, normalize_maps
from .cam import grad_cam, relevance_cam
from .capture import Target
from .gradient import gradient
from .lrp import LRP_HEADS

__all__ = ["METHODS", "ALIASES", "explain", "explain_with_logits", "resolve_method", "LRP_HEADS"]

# name -> (model, images, target, create_graph, *, layer, detach_weights) -> (logits, raw maps)
METHODS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "grad": gradient,
    "grad_cam": grad_cam,
    "relevance_cam": relevance_cam,
}
ALIASES = {"gradient": "grad", "gradcam": "grad_cam", "relevancecam": "relevance_cam"}


def resolve_method(method: str) -> str:
    name = ALIASES.get(method, method)
    if name not in METHODS:
        raise UserError(f"unknown explanation method '{method}'; known: {', '.join(list(METHODS) + list(ALIASES))}")
    return name


def explain_with_logits(model: nn.Module, images: Tensor, method: str, target: Target = None,
                        create_graph: bool = False, *, layer: nn.Module | str | None = None,
                        detach_weights: bool = True, normalize: bool = True,
                        agg: str | None = None) -> tuple[Tensor, Tensor]:
    """Logits (B, num_classes) and explanation maps from ONE forward pass (see the module docstring)."""
    fn = METHODS[resolve_method(method)]
    with torch.enable_grad():  # explanations need autograd even when the caller is in no_grad
        logits, maps = fn(model, images, target, create_graph, layer=layer, detach_weights=detach_weights)
        maps = aggregate_channels(maps, agg)
        if normalize:
            maps = normalize_maps(maps)
    if not create_graph:
        return logits.detach(), maps.detach()
    return logits, maps


def explain(model: nn.Module, images: Tensor, method: str, target: Target = None, create_graph: bool = False, *,
            layer: nn.Module | str | None = None, detach_weights: bool = True, normalize: bool = True,
            agg: str | None = None) -> Tensor:
    """Explanation maps of ``images`` (B, 3, H, W) in [0, 1]: (B, 3 or 1, H, W); see the module docstring."""
    return explain_with_logits(model, images, method, target, create_graph, layer=layer,
                               detach_weights=detach_weights, normalize=normalize, agg=agg)[1]
