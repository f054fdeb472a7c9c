"""The architecture registry: each architecture declares its facts next to its builder (timm-style).

>>> @register_arch("resnet20", cam_layer="layer3.2.bn2", blocks=lambda: (BasicBlock,))
... def resnet20(num_classes, mean, std): ...

A :class:`ModelSpec` holds everything the rest of the toolkit needs to know about an architecture: the builder,
the Grad-CAM layer, whether it has BatchNorm, its residual blocks (for the per-block update capture) and the
containers the parameter-group ablation splits into stages. The LRP rules of Relevance-CAM are method-specific and
stay in :mod:`bnbackdoor.explain.lrp`, keyed by the same name; the auto-train recipe and its environment knobs are
read in one place, :func:`bnbackdoor.models.knobs`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    builder: Callable[..., nn.Module]  # (num_classes, mean, std, **build knobs) -> model taking [0, 1] images
    # Grad-CAM target layer: a dotted module path (negative indices count from the end).
    cam_layer: str
    # ViT: the target layer outputs tokens (B, 1 + P, D) that explanations reshape to the patch grid.
    tokens: bool = False
    has_bn: bool = True
    notes: str = ""
    # The residual / inverted-residual / encoder block classes, as a callable so that torchvision is imported only
    # when a model's blocks are listed; () = a plain stack (each conv with the BatchNorm after it is a block).
    blocks: Callable[[], tuple[type, ...]] = tuple
    # Containers beside the others that the ablation splits into stages (ViT's encoder layers).
    split: tuple[str, ...] = ()


ARCHS: dict[str, ModelSpec] = {}


def register_arch(arch: str, **facts) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``builder`` as architecture ``arch`` with its :class:`ModelSpec` facts."""
    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if arch in ARCHS:
            raise ValueError(f"architecture '{arch}' registered twice")
        ARCHS[arch] = ModelSpec(arch, builder, **facts)
        return builder
    return deco
