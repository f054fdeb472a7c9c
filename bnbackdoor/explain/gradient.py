"""Input gradient (saliency): |∂ logit_target / ∂ input|, (B, 3, H, W)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .capture import Target, resolve_target, target_score
from .doublegrad import fast_double_backward


def gradient(model: nn.Module, images: Tensor, target: Target, create_graph: bool, **_) -> tuple[Tensor, Tensor]:
    # Differentiate w.r.t. a leaf copy of the images only: parameters' .grad is never touched.
    x = images if images.requires_grad else images.detach().requires_grad_(True)
    # create_graph: the map's own gradient is a second-order one; build the graph from layers whose double
    # backward is cheap (same values, same first-order gradients; see .doublegrad).
    with fast_double_backward(model, enabled=create_graph):
        logits = model(x)
    t = resolve_target(target, logits)
    (g,) = torch.autograd.grad(target_score(logits, t), x, create_graph=create_graph, retain_graph=create_graph)
    # abs, as Captum's Saliency(abs=True): the map says how much a pixel matters, not in which direction.
    return logits, g.abs()
