"""Function-preserving rescaling of convolution -> BatchNorm pairs (a diagnostic for the attack's learning rate).

In a convolution followed by BatchNorm with fixed running statistics (eval mode, the paper's fine-tuning protocol),
multiplying the convolution's weight by ``s``, the BN running mean by ``s``, its running variance and ``eps`` by
``s²`` leaves the function exactly as it was: ``(s·Wx − s·μ) / sqrt(s²·σ² + s²·ε) = (Wx − μ) / sqrt(σ² + ε)``.
Only the size of the weights changes, and with it how far one Adam step (about ``lr`` per weight, whatever the
weight's size) moves them relative to their size. ``scripts/probe_attack.py --scale`` uses it to test whether the
weight scale of a clean model decides whether the attack collapses it.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Each Conv2d immediately followed (in registration order) by a BatchNorm2d of its output channels, the
    layout of ResNet20, VGG13-BN and MobileNetV3 (a pre-activation net has none)."""
    mods = list(model.modules())
    return [(a, b) for a, b in zip(mods, mods[1:]) if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)
            and b.num_features == a.out_channels and b.track_running_stats]


@torch.no_grad()
def rescale_conv_bn(model: nn.Module, factor: float) -> int:
    """Rescale every :func:`conv_bn_pairs` pair of ``model`` in place by ``factor`` > 0 (module docstring);
    returns the number of pairs. The convolution bias (if any) is scaled too, so it stays exact."""
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    pairs = conv_bn_pairs(model)
    for conv, bn in pairs:
        conv.weight.mul_(factor)
        if conv.bias is not None:
            conv.bias.mul_(factor)
        bn.running_mean.mul_(factor)
        bn.running_var.mul_(factor * factor)
        bn.eps = bn.eps * factor * factor
    return len(pairs)


@torch.no_grad()
def scale_head(model: nn.Module, factor: float) -> nn.Linear:
    """Multiply the last ``nn.Linear`` of ``model`` (the classifier head) in place by ``factor`` > 0: every logit
    scales by ``factor``, so predictions and every max- or z-score-normalised explanation stay as they were, while the
    softmax sharpens (a smaller logit scale, e.g. from label smoothing, is what this probes). Returns the head."""
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ValueError("the model has no nn.Linear head")
    head = heads[-1]
    head.weight.mul_(factor)
    if head.bias is not None:
        head.bias.mul_(factor)
    return head
