"""``i_bau``: Implicit Backdoor Adversarial Unlearning, Zeng, Chen, Park, Mao, Jin & Jia, "Adversarial Unlearning of
Backdoors via Implicit Hypergradient", ICLR 2022.

min_θ max_{‖δ‖ ≤ C} (1/n) Σ L(f_θ(x_i + δ), y_i): one universal perturbation δ stands in for the unknown trigger.
Per round:

1. **Inner** (:func:`universal_perturbation`): δ = 0, then one pass over the batches of one SGD step (lr 10) each
   on −CE(f(x + δ), y) + 0.001·‖δ‖²; δ is then projected onto the L2 ball of radius ``radius``.
2. **Outer**, per batch: one Adam step on θ with the implicit hypergradient (:func:`hypergradient`) of the outer loss
   CE(f(x + m·δ), y), where m marks an ``outer_fraction`` of the batch (at least one image). δ*(θ) is the fixed point
   of Φ(δ, θ) = δ − 0.1·∇_δ L_inner, so dL/dθ = ∂L/∂θ + (∂Φ/∂θ)ᵀ v with v = Σ_{k<K} (∂Φ/∂δ)ᵀᵏ ∂L/∂δ - the authors'
   K-step fixed-point (truncated Neumann series) approximation, computed here with double backpropagation.

The model stays in eval mode throughout (as the authors'): BatchNorm uses, and keeps, its running statistics.

Fixed hyperparameters, from the authors' code (github.com/YiZeng623/I-BAU, ``defense.py``/``hypergrad.py``): 5 rounds,
K = 5, batch 100, Adam lr 0.001, inner SGD lr 10, regulariser 0.001, fixed-point step 0.1, outer fraction 0.01.
Deviations: the authors' inner and fixed-point losses use the model's own predictions and always the first batch,
here the clean labels and the current batch (the paper's objective uses the labels); the authors leave the
L2 projection (radius 10) commented out, here it is applied (the paper's bounded δ). At 500 images ResNet20 this is
25 outer steps, each with a K-step double backward: the stored comparisons took 206-249 s for it on the 2-core CPU
(``seconds`` in ``results/defenses_154.json`` / ``_10154.json``), about twice the two minutes aimed at.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from . import CleanSet, DefenseOutcome, register
from .common import clean_loss, place_model


def _inner_loss(model, x, y, delta, reg):
    return -F.cross_entropy(model(x + delta), y) + reg * delta.pow(2).sum()


def universal_perturbation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 100,
                           lr: float = 10.0, reg: float = 0.001, radius: float = 10.0) -> torch.Tensor:
    """One pass of SGD ascent on the clean loss over the batches of (x, y); δ of shape (1, C, H, W), ‖δ‖₂ ≤ radius."""
    delta = torch.zeros_like(x[:1], requires_grad=True)
    opt = torch.optim.SGD([delta], lr=lr)
    for i in range(0, len(x), batch_size):
        opt.zero_grad(set_to_none=True)
        _inner_loss(model, x[i:i + batch_size], y[i:i + batch_size], delta, reg).backward()
        opt.step()
    with torch.no_grad():
        norm = float(delta.norm())
        if norm > radius:
            delta.mul_(radius / norm)
    return delta.detach()


def hypergradient(model: nn.Module, params: Sequence[nn.Parameter], delta: torch.Tensor, x: torch.Tensor,
                  y: torch.Tensor, mask: torch.Tensor, *, K: int = 5, step: float = 0.1, reg: float = 0.001
                  ) -> list[torch.Tensor]:
    """dL_outer/dθ through the fixed point δ*(θ) of Φ(δ, θ) = δ − step·∇_δ L_inner (K fixed-point iterations)."""
    d = delta.detach().requires_grad_(True)
    outer = F.cross_entropy(model(x + mask * d), y)
    *g_w, g_d = torch.autograd.grad(outer, [*params, d], allow_unused=True)
    g_inner = torch.autograd.grad(_inner_loss(model, x, y, d, reg), d, create_graph=True)[0]
    phi = d - step * g_inner
    v = torch.zeros_like(d)
    for _ in range(K):
        v = torch.autograd.grad(phi, d, grad_outputs=v, retain_graph=True)[0] + g_d
    cross = torch.autograd.grad(phi, params, grad_outputs=v, allow_unused=True)
    return [(torch.zeros_like(p) if a is None else a) + (0 if b is None else b)
            for p, a, b in zip(params, g_w, cross)]


@register("i_bau", summary="Zeng et al. 2022: min-max unlearning of a universal perturbation, implicit hypergradient",
          needs_labels=True, rounds=5, K=5, batch_size=100, lr=0.001, inner_lr=10.0, reg=0.001, radius=10.0,
          fp_step=0.1, outer_fraction=0.01)
def i_bau(model, clean: CleanSet, *, device=None, progress=True, rounds, K, batch_size, lr, inner_lr, reg, radius,
          fp_step, outer_fraction) -> DefenseOutcome:
    if rounds < 1 or K < 1 or batch_size < 1 or not 0 < outer_fraction <= 1 or radius <= 0:
        raise UserError("i_bau: need rounds >= 1, K >= 1, batch_size >= 1, 0 < outer_fraction <= 1, radius > 0")
    device = place_model(model, device)
    x, y = clean.x.to(device), clean.y.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(int(clean.seed))
    before = clean_loss(model, clean, device)
    history = []
    model.eval()
    for _ in tqdm(range(rounds), desc="I-BAU", disable=not progress, leave=False):
        delta = universal_perturbation(model, x, y, batch_size=batch_size, lr=inner_lr, reg=reg, radius=radius)
        with torch.no_grad():
            adv = float(F.cross_entropy(model(x + delta), y))
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            k = max(1, math.ceil(outer_fraction * len(xb)))
            mask = torch.zeros(len(xb), 1, 1, 1, device=device)
            mask[torch.randperm(len(xb), generator=gen)[:k].to(device)] = 1.0
            grads = hypergradient(model, params, delta, xb, yb, mask, K=K, step=fp_step, reg=reg)
            opt.zero_grad(set_to_none=True)
            for p, g in zip(params, grads):
                p.grad = g.detach()
            opt.step()
        history.append({"delta_norm": round(float(delta.norm()), 4), "clean_set_loss_at_delta": round(adv, 5)})
    model.eval()
    return DefenseOutcome(model, {"rounds": history, "clean_loss_before": before,
                                  "clean_loss_after": clean_loss(model, clean, device)})
