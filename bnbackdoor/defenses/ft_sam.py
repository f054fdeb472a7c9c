"""``ft_sam``: fine-tuning with sharpness-aware minimisation, Zhu, Wei, Shen, Fan & Wu, "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023 (FT-SAM).

Backdoor neurons sit where the loss is sharp in weight space; minimising the worst loss in a ball around the weights
pushes them out. Every step, on a batch of labelled clean images (the clean trainer's flips and crops):

1. g = ∇L(w); the ascent direction e = ρ·g/‖g‖ (SAM, Foret et al. 2021) or, ``adaptive`` (ASAM, Kwon et al. 2021,
   the FT-SAM code's default), e = ρ·w²·g/‖|w|·g‖ (elementwise), norms over all parameters together;
2. the gradient at w + e; restore w; one SGD step with that gradient (:func:`sam_step`).

BatchNorm runs in train mode; its running statistics follow only the first (unperturbed) pass of each step, so the
perturbed pass leaves no trace in the stored statistics.

Fixed hyperparameters, from the authors' code (``config/defense/ft-sam/cifar10.yaml``: ρ = 2, adaptive, SGD lr 0.01,
momentum 0.9, weight decay 5e-4, label smoothing 0.1, cosine learning-rate schedule). Deviations, both for the
two-minute CPU budget of ResNet20 at 500 clean images: 10 epochs instead of 100, batch 64 instead of 256 (at 500
images batch 256 would give two steps per epoch); each SAM step costs two forward/backward passes, so this is about
twice ``finetune``. Data order and augmentation are seeded by ``CleanSet.seed``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from ..train import augment_batch
from . import CleanSet, DefenseOutcome, register
from .common import BN, clean_loss, place_model


@torch.no_grad()
def sam_perturbation(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float,
                     adaptive: bool = False) -> list[torch.Tensor]:
    """The weight perturbation of one (A)SAM step: ρ·g/‖g‖, or ρ·w²·g/‖|w|·g‖ when ``adaptive``."""
    scaled = [(p.abs() * g) if adaptive else g for p, g in zip(params, grads)]
    norm = torch.sqrt(sum((s.double() ** 2).sum() for s in scaled)).item()
    scale = rho / (norm + 1e-12)
    return [((p * p) if adaptive else 1.0) * g * scale for p, g in zip(params, grads)]


def sam_step(loss_fn: Callable[[bool], torch.Tensor], params: Sequence[nn.Parameter], opt: torch.optim.Optimizer,
             rho: float, adaptive: bool = False) -> float:
    """One SAM step: ``loss_fn(first)`` is the loss at the current weights (``first`` True for the unperturbed pass).
    The optimiser steps with the gradient taken at w + e; returns the unperturbed loss."""
    loss = loss_fn(True)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    e = sam_perturbation(params, grads, rho, adaptive)
    with torch.no_grad():
        for p, d in zip(params, e):
            p.add_(d)
    opt.zero_grad(set_to_none=True)
    loss_fn(False).backward()
    with torch.no_grad():
        for p, d in zip(params, e):
            p.sub_(d)
    opt.step()
    return float(loss.detach())


@register("ft_sam", summary="Zhu et al. 2023: fine-tune all weights with (adaptive) sharpness-aware minimisation",
          needs_labels=True, rho=2.0, adaptive=True, epochs=10, lr=0.01, batch_size=64, momentum=0.9,
          weight_decay=5e-4, label_smoothing=0.1)
def ft_sam(model, clean: CleanSet, *, device=None, progress=True, rho, adaptive, epochs, lr, batch_size, momentum,
           weight_decay, label_smoothing) -> DefenseOutcome:
    if rho < 0 or epochs < 1 or batch_size < 2 or not 0 <= label_smoothing < 1:
        raise UserError("ft_sam: need rho >= 0, epochs >= 1, batch_size >= 2 and 0 <= label_smoothing < 1")
    device = place_model(model, device)
    before = clean_loss(model, clean, device)
    params = [p for p in model.parameters() if p.requires_grad]
    bns = [m for m in model.modules() if isinstance(m, BN) and m.track_running_stats]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    x, y = clean.x.to(device), clean.y.to(device)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(int(clean.seed))
    losses = []
    try:
        model.train()
        for _ in tqdm(range(epochs), desc="FT-SAM", disable=not progress, leave=False):
            order = torch.randperm(len(x), generator=gen).to(device)
            total, seen = 0.0, 0
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                if len(idx) < 2:
                    continue          # batch statistics of one image are undefined
                xb, yb = augment_batch(x[idx], gen), y[idx]

                def loss_fn(first: bool) -> torch.Tensor:
                    moms = [m.momentum for m in bns]
                    if not first:     # the perturbed pass must not move the running statistics
                        for m in bns:
                            m.momentum = 0.0
                    try:
                        return F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
                    finally:
                        for m, mo in zip(bns, moms):
                            m.momentum = mo

                total += sam_step(loss_fn, params, opt, rho, adaptive) * len(idx)
                seen += len(idx)
                sched.step()
            losses.append(total / max(seen, 1))
    finally:
        model.eval()
    return DefenseOutcome(model, {"train_loss": [round(v, 5) for v in losses], "clean_loss_before": before,
                                  "clean_loss_after": clean_loss(model, clean, device)})
