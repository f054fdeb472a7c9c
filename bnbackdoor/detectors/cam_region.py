"""The Grad-CAM region SentiNet and Februus cut out: the top ``area`` share of pixels of the predicted class's map.

Both papers threshold a Grad-CAM heatmap of the predicted class. We take a fixed *share* of the image instead of a
fixed heat threshold, so that a flat map cannot select the whole image (which would make every clean input "fool"
SentiNet and leave Februus nothing to inpaint from). Ties (a flat or all-zero map) are broken by pixel index
(a stable sort), so the region is deterministic.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..explain import explain_with_logits

__all__ = ["REGION_AREA", "cam_region", "top_share"]

REGION_AREA = 0.05  # share of the image's pixels in the region: 51 of 1024 on 32×32 (about a 7×7 box)


def top_share(maps: Tensor, area: float) -> Tensor:
    """(B, H, W) bool: the ``area`` share (at least one pixel) of the highest values of ``maps`` (B, 1, H, W)."""
    b, _, h, w = maps.shape
    k = max(1, round(area * h * w))
    idx = torch.argsort(maps.reshape(b, -1), dim=1, descending=True, stable=True)[:, :k]
    region = torch.zeros(b, h * w, dtype=torch.bool, device=maps.device)
    region.scatter_(1, idx, True)
    return region.view(b, h, w)


def cam_region(model: nn.Module, x: Tensor, area: float = REGION_AREA, layer: str | None = None
               ) -> tuple[Tensor, Tensor]:
    """(logits (B, K), region (B, H, W) bool) of ``x`` on the model's device: Grad-CAM of the predicted class
    (``layer``: the CAM layer, default the architecture's declared one), then :func:`top_share`."""
    logits, maps = explain_with_logits(model, x, "grad_cam", target=None, layer=layer, agg="max")
    return logits, top_share(maps, area)
