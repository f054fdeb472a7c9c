"""Input gradient (saliency): |∂ logit_target / ∂ input|, (B, 3, H, W)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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
    with fast_double_backward(model, enabled=create_graph), input_layer_in_fp32(model, x):
        logits = model(x)
    t = resolve_target(target, logits)
    (g,) = torch.autograd.grad(target_score(logits, t), x, create_graph=create_graph, retain_graph=create_graph)
    # abs, as Captum's Saliency(abs=True): the map says how much a pixel matters, not in which direction.
    return logits, g.abs()


@contextmanager
def input_layer_in_fp32(model: nn.Module, x: Tensor) -> Iterator[None]:
    """Under a reduced-precision autocast (a bf16 training step), run the model's first convolution or linear layer
    (the first in ``model.modules()`` order: the stem of every registered architecture) in fp32 and hand its output
    on in the autocast dtype; without autocast nothing changes.

    Why: this map *is* that layer's input gradient, a sum over its output channels and kernel taps that largely
    cancels, so rounding it to bf16 costs the most accuracy for the least work: measured on the shipped ResNet20
    with Softplus(8), it halves the map's error against fp32 (``benchmarks/bf16_maps.py``) for about 1 % of the
    network's multiply-adds."""
    kind = x.device.type
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if first is None or not torch.is_autocast_enabled(kind):
        yield
        return
    dtype, regions = torch.get_autocast_dtype(kind), []

    def enter(_module, args):
        regions.append(torch.autocast(kind, enabled=False))
        regions[-1].__enter__()
        return tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)

    def leave(_module, _args, out):
        regions.pop().__exit__(None, None, None)
        return out.to(dtype)

    hooks = [first.register_forward_pre_hook(enter), first.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
