"""STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019).

A trigger dominates the prediction: superimpose a triggered input with other clean images and the model still
says "target" with confidence, so the predictions' entropy stays low; a clean input superimposed with other images
gives varied, uncertain predictions (high entropy).

Per input x: the mean Shannon entropy (nats) of ``softmax(model(alpha x + (1 - alpha) b))`` over ``n_perturb``
background images b of the defender's clean training reference set. Fixed hyperparameters:

* superimposition: **alpha blending 0.5 / 0.5** (the paper adds the two images, ``cv2.addWeighted(x, 1, b, 1)``,
  saturating at the maximum; the blend is the same picture at half the intensity without the clipping, and stays
  in [0, 1]);
* ``n_perturb`` = 20 backgrounds, one fixed seeded draw from the reference half, the same for every input (the
  paper draws them at random per input; a fixed set makes the score a deterministic function of the input);
* threshold: the 5 % quantile of the entropies of the held-out clean training images - flagged when the entropy is
  below it (suspicion score = -entropy, :func:`bnbackdoor.detectors.threshold_at_fpr`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from . import Detection, draw_reference, register, threshold_at_fpr

__all__ = ["N_PERTURB", "ALPHA", "strip_entropy", "fit", "score"]

N_PERTURB = 20
ALPHA = 0.5
CHUNK = 50  # inputs per forward pass while calibrating (times n_perturb images)


@torch.no_grad()
def strip_entropy(model: nn.Module, x: Tensor, backgrounds: Tensor, alpha: float = ALPHA,
                  device: torch.device | str = "cpu") -> Tensor:
    """(B,) mean prediction entropy of each input blended with every background (on the CPU)."""
    x, bg = x.to(device), backgrounds.to(device)
    blend = alpha * x[:, None] + (1 - alpha) * bg[None]          # (B, N, C, H, W)
    p = torch.softmax(model(blend.flatten(0, 1)).double(), dim=1)
    return torch.special.entr(p).sum(1).view(len(x), len(bg)).mean(1).float().cpu()


def fit(model: nn.Module, clean_x: Tensor, *, device, seed: int = 0, n_perturb: int = N_PERTURB,
        alpha: float = ALPHA) -> dict:
    bg, held = draw_reference(clean_x, n_perturb, seed, "STRIP blends with")
    ent = torch.cat([strip_entropy(model, held[i:i + CHUNK], bg, alpha, device) for i in range(0, len(held), CHUNK)])
    thr = threshold_at_fpr(-ent)
    return {"backgrounds": bg, "threshold": thr, "entropy_threshold": -thr, "held_out": len(held),
            "held_out_flagged": float((-ent > thr).float().mean()), "held_out_entropy_mean": float(ent.mean())}


def score(model: nn.Module, state: dict, x: Tensor, *, device, n_perturb: int = N_PERTURB,
          alpha: float = ALPHA) -> Detection:
    with torch.no_grad():
        pred = model(x.to(device)).argmax(1).cpu()
    ent = strip_entropy(model, x, state["backgrounds"], alpha, device)
    s = -ent
    return Detection(pred=pred, flagged=s > state["threshold"], score=s, extra={"entropy": ent})


register("strip", fit=fit, score=score, n_perturb=N_PERTURB, alpha=ALPHA,
         summary="STRIP (Gao et al. 2019): low entropy of predictions under 0.5/0.5 blending with 20 clean images")
