"""Grad-CAM and Relevance-CAM: a channel-weighted sum of the explained layer's activation, ReLU, upsampled.

Both capture the activation A (B, K, h, w) with a forward hook during the model's single forward pass and differ
only in the channel weights: Grad-CAM the spatial mean of ∂ logit_target / ∂ A, Relevance-CAM the spatial sum of
the LRP relevance that reaches A (see :mod:`.lrp`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .capture import Target, capture, explained_layer, resolve_target, spec_of, target_score, tokens_to_grid
from .doublegrad import fast_double_backward
from .lrp import lrp_head


def combine(weights: Tensor, acts: Tensor, size: tuple[int, int]) -> Tensor:
    """ReLU(Σ_k w_k A_k) bilinearly upsampled to ``size`` (align_corners=False, as Captum's interpolate)."""
    cam = F.relu(torch.einsum("bk,bkhw->bhw", weights, acts)).unsqueeze(1)
    if cam.shape[-2:] != size:
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return cam


def grad_cam(model: nn.Module, images: Tensor, target: Target, create_graph: bool, *, layer=None,
             detach_weights: bool = True) -> tuple[Tensor, Tensor]:
    module = explained_layer(model, layer)
    spec = spec_of(model)
    # Detached weights need no graph of their own: a first-order gradient, then the map depends on the
    # parameters through A alone (the ancestor's choice, and the cheap one). Graph kept for the caller's backward.
    second_order = create_graph and not detach_weights
    # Without create_graph only ∂ logit / ∂ A is needed: the layers before A run without recording a graph.
    with capture({"A": module}, start_graph=None if create_graph else "A") as got, \
            fast_double_backward(model, enabled=second_order), torch.set_grad_enabled(create_graph):
        logits = model(images)
    t = resolve_target(target, logits)
    acts = got["A"]
    (grads,) = torch.autograd.grad(target_score(logits, t), acts, create_graph=second_order,
                                   retain_graph=create_graph)
    if spec is not None and spec.tokens and acts.dim() == 3:
        acts, grads = tokens_to_grid(acts), tokens_to_grid(grads)
    weights = grads.mean(dim=(2, 3))
    if detach_weights:
        weights = weights.detach()
    return logits, combine(weights, acts, images.shape[-2:])


def relevance_cam(model: nn.Module, images: Tensor, target: Target, create_graph: bool, *, layer=None,
                  detach_weights: bool = True) -> tuple[Tensor, Tensor]:
    spec = spec_of(model)
    if spec is not None and spec.tokens:
        raise UserError("Relevance-CAM does not apply to ViT (LRP rules are defined for the CNN heads only); "
                        "use grad or grad_cam")
    if spec is None:
        raise UserError("Relevance-CAM needs the model's architecture: build it with bnbackdoor.models.build_model")
    head = lrp_head(spec.arch)
    module = explained_layer(model, head.layer)
    if layer is not None and explained_layer(model, layer) is not module:
        raise UserError(f"Relevance-CAM on {spec.arch} is defined for its declared layer "
                        f"'{head.layer or spec.cam_layer}' only")
    extra = head.capture(model)
    with capture({"A": module, **extra}) as got, torch.set_grad_enabled(create_graph):
        logits = model(images)  # relevance needs no backward pass: no graph unless the caller wants one
    t = resolve_target(target, logits)
    acts = got["A"]
    # Relevance is closed-form over the small head (no backward pass). Detached weights: compute it without a
    # graph; otherwise it stays differentiable w.r.t. the head's parameters and activations.
    with torch.set_grad_enabled(create_graph and not detach_weights):
        relevance = head.propagate(model, acts, got, logits, t)["layer"]
        weights = relevance.sum(dim=(2, 3))
    if detach_weights:
        weights = weights.detach()
    return logits, combine(weights, acts, images.shape[-2:])
