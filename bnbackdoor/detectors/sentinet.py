"""SentiNet (Chou et al., "SentiNet: Detecting Localized Universal Attacks Against Deep Learning Systems",
IEEE S&P Workshops 2020).

A localized trigger is a region that hijacks the prediction of *any* image it is pasted on. Per input x:

1. the region: the top :data:`~.cam_region.REGION_AREA` (5 %) of the Grad-CAM map of x's predicted class
   (:func:`~.cam_region.cam_region`; the paper thresholds the heatmap, and also subtracts the maps of other
   top classes - not done here);
2. **fooled rate**: paste x's region onto each of ``n_paste`` = 20 clean reference images (fixed, seeded); the
   share whose prediction becomes x's predicted class, among those the model does not already assign that class
   (otherwise the rate of a class's own images among the 20 - its base rate - would separate classes, not
   triggers: every triggered input has the same, target, prediction);
3. **inert pattern**: the same region filled with one fixed seeded uniform-noise pattern, pasted onto the same
   images; the mean top-class softmax confidence (reported per input as ``inert_confidence``).

Decision: the paper fits a boundary to the (inert confidence, fooled rate) points of clean images and flags points
above it. We use the documented simpler rule on the fooled rate alone: flagged when it is strictly above the 95 %
quantile of the fooled rates of the held-out clean training images (:data:`bnbackdoor.detectors.FPR` = 5 %). The
region is returned for localisation (IoU with the trigger, evaluation only).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from . import Detection, draw_reference, register, threshold_at_fpr
from .cam_region import REGION_AREA, cam_region

__all__ = ["N_PASTE", "sentinet_scores", "fit", "score"]

N_PASTE = 20
NOISE_SEED = 1  # the inert pattern's seed (a CPU generator: the same pattern on every device)
CHUNK = 50


def sentinet_scores(model: nn.Module, x: Tensor, targets: Tensor, noise: Tensor, area: float = REGION_AREA,
                    layer: str | None = None, device: torch.device | str = "cpu",
                    target_pred: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(pred (B,), fooled rate (B,), inert confidence (B,), region (B, H, W) bool), all on the CPU.
    ``target_pred``: the model's predictions of ``targets`` (computed when not given)."""
    x, targets, noise = x.to(device), targets.to(device), noise.to(device)
    if target_pred is None:
        with torch.no_grad():
            target_pred = model(targets).argmax(1)
    target_pred = target_pred.to(device)
    logits, region = cam_region(model, x, area, layer)
    pred = logits.argmax(1)
    m = region[:, None, None].to(x.dtype)                       # (B, 1, 1, H, W) over (B, N, C, H, W)
    with torch.no_grad():
        pasted = targets[None] * (1 - m) + x[:, None] * m
        hit = model(pasted.flatten(0, 1)).argmax(1).view(len(x), -1) == pred[:, None]
        counted = target_pred[None] != pred[:, None]            # paste targets not already of x's class
        fooled = (hit & counted).sum(1) / counted.sum(1).clamp(min=1)
        inert = targets[None] * (1 - m) + noise[None] * m
        conf = torch.softmax(model(inert.flatten(0, 1)), 1).amax(1).view(len(x), -1).mean(1)
    return pred.cpu(), fooled.cpu(), conf.cpu(), region.cpu()


def fit(model: nn.Module, clean_x: Tensor, *, device, seed: int = 0, n_paste: int = N_PASTE,
        area: float = REGION_AREA, layer: str | None = None) -> dict:
    targets, held = draw_reference(clean_x, n_paste, seed, "SentiNet pastes onto")
    noise = torch.rand((1,) + tuple(held.shape[1:]), generator=torch.Generator().manual_seed(NOISE_SEED))
    with torch.no_grad():
        target_pred = model(targets.to(device)).argmax(1).cpu()
    fooled = torch.cat([sentinet_scores(model, held[i:i + CHUNK], targets, noise, area, layer, device,
                                        target_pred)[1] for i in range(0, len(held), CHUNK)])
    thr = threshold_at_fpr(fooled)
    return {"targets": targets, "target_pred": target_pred, "noise": noise, "threshold": thr, "held_out": len(held),
            "held_out_flagged": float((fooled > thr).float().mean()), "held_out_fooled_mean": float(fooled.mean())}


def score(model: nn.Module, state: dict, x: Tensor, *, device, n_paste: int = N_PASTE, area: float = REGION_AREA,
          layer: str | None = None) -> Detection:
    pred, fooled, conf, region = sentinet_scores(model, x, state["targets"], state["noise"], area, layer, device,
                                                 state["target_pred"])
    return Detection(pred=pred, flagged=fooled > state["threshold"], score=fooled, region=region,
                     extra={"fooled_rate": fooled, "inert_confidence": conf})


register("sentinet", fit=fit, score=score, localises=True, n_paste=N_PASTE, area=REGION_AREA, layer=None,
         summary="SentiNet (Chou et al. 2020): Grad-CAM top-5 % region pasted on 20 clean images; fooled rate "
                 "above the clean 95 % quantile")
