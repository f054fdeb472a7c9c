"""How close can any Grad-CAM map of a given resolution come to a target explanation?

A CAM is ``ReLU(Σ_k w_k A_k)`` on the explained layer's h×w grid, bilinearly upsampled to the image and normalised
per image (:func:`bnbackdoor.explain.cam.combine`, :func:`bnbackdoor.losses.normalize_maps`). Whatever the weights
do, the map an attack can produce is a non-negative h×w grid seen through that upsampling, so the lowest loss any such
grid reaches against the target is a floor for every attack explained at that layer. :func:`best_fit` searches the
grid directly (Adam from the target average-pooled to h×w, then from random grids; the all-zero map, which a grid
that is nowhere positive gives, is a candidate too).

The search is local: a value below a threshold proves the target is reachable at that resolution (the returned
grid is an example); a value above it is strong evidence, not a proof, that it is not.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..explain.cam import combine
from ..losses import loss_fn, normalize_maps


@dataclass(frozen=True)
class Fit:
    loss: float      # the lowest per-image loss found
    cam: Tensor      # (1, 1, H, W): the normalised map that reaches it


def cam_from_grid(grid: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, 1, h, w) grid -> (B, 1, H, W) normalised map, exactly as an explanation is made from a CAM layer."""
    return normalize_maps(combine(torch.ones(grid.shape[0], 1, dtype=grid.dtype), grid, size))


def best_fit(target: Tensor, resolution: int, loss: str = "ssim", steps: int = 600, restarts: int = 4,
             lr: float = 0.05, seed: int = 0) -> Fit:
    """The lowest ``loss`` between ``target`` (1, 1, H, W) in [0, 1] and any map made from a ``resolution`` ×
    ``resolution`` grid; ``restarts`` grids in parallel (the first from the pooled target, the rest random)."""
    if target.dim() != 4 or target.shape[:2] != (1, 1):
        raise UserError(f"target must be one (1, 1, H, W) map, got shape {tuple(target.shape)}")
    size = tuple(target.shape[-2:])
    if not 1 <= resolution <= min(size):
        raise UserError(f"resolution {resolution} must be between 1 and the target's size {min(size)}")
    if steps < 1 or restarts < 1:
        raise UserError("steps and restarts must be at least 1")
    fn = loss_fn(loss)
    target = target.detach().to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    pooled = F.adaptive_avg_pool2d(target, resolution) + 0.01  # + 0.01: a blank region still gets a gradient
    grid = torch.cat([pooled, torch.rand(restarts - 1, 1, resolution, resolution, generator=g,
                                         dtype=torch.float64)]).requires_grad_(True)
    opt = torch.optim.Adam([grid], lr=lr)
    # A grid that is nowhere positive gives the all-zero map: always reachable, but not by gradient steps (the
    # normalised map does not change as a positive grid shrinks), so it is a candidate of its own.
    zero = torch.zeros_like(target)
    best_loss, best_cam = fn(zero, target).item(), zero
    for _ in range(steps):
        cam = cam_from_grid(grid, size)
        per_image = fn(cam, target)
        i = int(per_image.argmin())
        if per_image[i].item() < best_loss:
            best_loss, best_cam = per_image[i].item(), cam[i:i + 1].detach()
        opt.zero_grad()
        per_image.sum().backward()
        opt.step()
    return Fit(best_loss, best_cam)
