"""Februus-style purification (Doan et al., "Februus: Input Purification Defense Against Trojan Attacks on Deep
Neural Network Systems", ACSAC 2020).

Februus removes the region the model relies on and restores it before predicting: (1) the Grad-CAM map of the
predicted class, thresholded to a region - here the top :data:`~.cam_region.REGION_AREA` (5 %) of its pixels
(:func:`~.cam_region.cam_region`); (2) the region is cut out and (3) filled from its surroundings - the paper
uses a GAN inpainter trained on clean data; we use a deterministic diffusion fill (:func:`inpaint`); (4) the
model predicts the restored image.

It purifies every input and has no threshold, so it is not calibrated at a false-positive rate: the
evaluation reports attack success and clean accuracy after restoration, the region's IoU with the trigger, and, as
its "flag", whether restoration changed the prediction (its false-positive rate as measured, not fixed).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import Detection, register
from .cam_region import REGION_AREA, cam_region

__all__ = ["SMOOTH_ITERATIONS", "inpaint", "fit", "score"]

SMOOTH_ITERATIONS = 50  # Jacobi sweeps after the fill: the fill approaches the smooth (harmonic) interpolation
_CROSS = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # the 4 neighbours of a pixel


def _neighbour_sum(t: Tensor) -> Tensor:
    k = _CROSS.to(device=t.device, dtype=t.dtype).expand(t.shape[1], 1, 3, 3)
    return F.conv2d(t, k, padding=1, groups=t.shape[1])  # zero padding: pixels outside the image count as absent


def inpaint(x: Tensor, hole: Tensor, smooth_iterations: int = SMOOTH_ITERATIONS) -> Tensor:
    """``x`` (B, C, H, W) with the pixels of ``hole`` (B, H, W) bool filled from their surroundings.

    First an onion-peel fill: each step sets the hole pixels that touch known pixels to the mean of their known
    4-neighbours, ring by ring inwards. Then ``smooth_iterations`` Jacobi sweeps replace every hole pixel by the
    mean of its 4 neighbours (known pixels never change). Deterministic; a constant image stays that constant.
    A hole covering the whole image has nothing to fill from and is left 0.
    """
    hole4 = hole[:, None].to(x.device)
    known = (~hole4).to(x.dtype)
    out = x * known
    for _ in range(x.shape[-2] + x.shape[-1]):  # enough rings for any hole
        count = _neighbour_sum(known)
        new = (known == 0) & (count > 0)
        if not new.any():
            break
        out = torch.where(new, _neighbour_sum(out * known) / count.clamp(min=1), out)
        known = known + new.to(x.dtype)
    count = _neighbour_sum(torch.ones_like(known))
    for _ in range(smooth_iterations):
        out = torch.where(hole4 & (known > 0), _neighbour_sum(out) / count, out)
    return out


def fit(model: nn.Module, clean_x: Tensor, *, device, seed: int = 0, area: float = REGION_AREA,
        layer: str | None = None, smooth_iterations: int = SMOOTH_ITERATIONS) -> dict:
    return {"threshold": None}  # nothing to calibrate (the paper's GAN is trained on clean data instead)


def score(model: nn.Module, state: dict, x: Tensor, *, device, area: float = REGION_AREA, layer: str | None = None,
          smooth_iterations: int = SMOOTH_ITERATIONS) -> Detection:
    x = x.to(device)
    logits, region = cam_region(model, x, area, layer)
    pred = logits.argmax(1)
    with torch.no_grad():
        restored = model(inpaint(x, region, smooth_iterations)).argmax(1)
    return Detection(pred=pred.cpu(), flagged=(restored != pred).cpu(), region=region.cpu(),
                     restored_pred=restored.cpu())


register("februus", fit=fit, score=score, localises=True, purifies=True, calibrated=False, area=REGION_AREA,
         layer=None, smooth_iterations=SMOOTH_ITERATIONS,
         summary="Februus-style (Doan et al. 2020): cut the Grad-CAM top-5 % region, diffusion inpainting, "
                 "predict again")
