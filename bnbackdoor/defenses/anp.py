"""``anp``: Adversarial Neuron Pruning, Wu & Wang, "Adversarial Neuron Perturbations Expose Backdoor Models",
NeurIPS 2021.

Every BatchNorm channel k gets a mask m_k ∈ [0, 1] and, while perturbed, multiplicative noise on its affine
parameters: γ_k·(m_k + δ_k), β_k·(1 + ξ_k) with |δ|, |ξ| ≤ ε. Backdoor neurons are the ones whose perturbation
breaks the model most easily, so a mask that keeps the model correct *under* the worst perturbation shrinks them.
Per iteration, on a batch of labelled clean images:

1. δ, ξ drawn uniformly in [−ε, ε], then ``steps`` signed-gradient ascent steps of size ε/steps on the cross-entropy
   (projected back to [−ε, ε]);
2. one SGD step (momentum 0.9) on the masks for α·CE(unperturbed) + (1 − α)·CE(perturbed), masks clipped to [0, 1].

Finally channels whose mask is below ``threshold`` are pruned: γ = β = 0, so their output is exactly 0 (the authors
zero γ only). The learned masks are otherwise discarded - the model keeps its own weights and statistics. As in the
authors' implementation, the masks are learned with the model in train mode (BatchNorm normalises with batch
statistics); the running statistics are restored afterwards, and only the mask/noise get gradients.

Fixed hyperparameters: the paper's ε = 0.4, α = 0.2, 1 perturbation step, mask learning rate 0.2, pruning threshold
0.2. The paper runs 2,000 iterations of batch 128; to stay within two minutes on two CPU cores for ResNet20 this runs
150 iterations of batch 32 (≈ 10 passes over 500 clean images; ≈ 0.65 single-core CPU seconds per iteration) - a
budget fixed in advance, the same for every model and attack.
Masks, noise and batches are seeded by ``CleanSet.seed``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from . import CleanSet, DefenseOutcome, register
from .common import place_model, prune_bn_channels, require_bn


class _Perturbation:
    """Forward hook on one BN layer: out = γ(m + δ·on)·x̂ + β(1 + ξ·on), computed from the layer's own output."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, device: torch.device):
        c = bn.num_features
        self.bn = bn
        self.mask = torch.ones(c, device=device, requires_grad=True)
        self.noise_w = torch.zeros(c, device=device, requires_grad=True)
        self.noise_b = torch.zeros(c, device=device, requires_grad=True)
        self.on = False

    def __call__(self, module, inputs, out: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (out.dim() - 2)
        coeff_w = self.mask + self.noise_w if self.on else self.mask
        beta = module.bias.view(shape) if module.bias is not None else None
        base = out - beta if beta is not None else out          # γ·x̂
        res = base * coeff_w.view(shape)
        if beta is not None:
            res = res + beta * ((1 + self.noise_b) if self.on else torch.ones_like(self.noise_b)).view(shape)
        return res


@register("anp", summary="Wu & Wang 2021: learn BN-neuron masks under adversarial neuron perturbation, prune",
          needs_bn=True, needs_labels=True, eps=0.4, alpha=0.2, steps=1, mask_lr=0.2, iterations=150, batch_size=32,
          threshold=0.2)
def anp(model, clean: CleanSet, *, device=None, progress=True, eps, alpha, steps, mask_lr, iterations, batch_size,
        threshold) -> DefenseOutcome:
    if eps < 0 or not 0 <= alpha <= 1 or steps < 1 or iterations < 1 or batch_size < 2:
        raise UserError("anp: need eps >= 0, 0 <= alpha <= 1, steps >= 1, iterations >= 1 and batch_size >= 2")
    layers = [(n, m) for n, m in require_bn(model, "anp", affine=True)]
    device = place_model(model, device)
    x, y = clean.x.to(device), clean.y.to(device)
    gen = torch.Generator().manual_seed(int(clean.seed))
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(int(clean.seed))            # the uniform noise draws below
    perts = {n: _Perturbation(m, device) for n, m in layers}
    handles = [m.register_forward_hook(perts[n]) for n, m in layers]
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    masks = [p.mask for p in perts.values()]
    noises = [t for p in perts.values() for t in (p.noise_w, p.noise_b)]
    mask_opt = torch.optim.SGD(masks, lr=mask_lr, momentum=0.9)
    noise_opt = torch.optim.SGD(noises, lr=eps / steps)
    losses = []
    try:
        model.train()
        order = torch.empty(0, dtype=torch.long)
        for _ in tqdm(range(iterations), desc="ANP masks", disable=not progress, leave=False):
            if len(order) < batch_size:                   # sample without replacement, epoch by epoch
                order = torch.cat([order, torch.randperm(len(x), generator=gen)])
            idx, order = order[:batch_size].to(device), order[batch_size:]
            xb, yb = x[idx], y[idx]
            if eps > 0:
                with torch.no_grad():
                    for t in noises:
                        t.uniform_(-eps, eps)
                for p in perts.values():
                    p.on = True
                for _s in range(steps):
                    noise_opt.zero_grad(set_to_none=True)
                    (-F.cross_entropy(model(xb), yb)).backward()
                    for t in noises:
                        t.grad = t.grad.sign()
                    noise_opt.step()
                    with torch.no_grad():
                        for t in noises:
                            t.clamp_(-eps, eps)
            mask_opt.zero_grad(set_to_none=True)
            loss_rob = F.cross_entropy(model(xb), yb) if eps > 0 else torch.zeros((), device=device)
            for p in perts.values():
                p.on = False
            loss_nat = F.cross_entropy(model(xb), yb)
            loss = alpha * loss_nat + (1 - alpha) * loss_rob
            loss.backward()
            mask_opt.step()
            with torch.no_grad():
                for m in masks:
                    m.clamp_(0.0, 1.0)
            losses.append(loss.item())
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        with torch.no_grad():                               # running statistics as delivered
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        model.eval()
        torch.random.set_rng_state(torch_state)
    pruned = {}
    for n, m in layers:
        idx = torch.nonzero(perts[n].mask.detach() < threshold).flatten()
        if len(idx):
            prune_bn_channels(m, idx)
            pruned[n] = idx.tolist()
    all_masks = torch.cat([m.detach().cpu() for m in masks])
    return DefenseOutcome(model, {
        "pruned": pruned, "pruned_count": sum(map(len, pruned.values())), "channels": len(all_masks),
        "mask_quantiles": {str(q): round(float(all_masks.quantile(q)), 4) for q in (0.0, 0.01, 0.05, 0.5)},
        "loss_first_last": [round(losses[0], 5), round(losses[-1], 5)]})
