"""``rnp``: Reconstructive Neuron Pruning, Li, Lyu, Ma, Chen, Koren, Li & Jiang, "Reconstructive Neuron Pruning for
Backdoor Defense", ICML 2023.

Unlearning the clean task exposes backdoor neurons: gradient ascent on the clean loss is achieved fastest through
them (they push every input to the target class), and recovering the clean task on the unlearned model by masking
neurons then switches exactly those off. Three steps:

1. **Unlearn** a copy: SGD *ascent* on the cross-entropy of the labelled clean images (train mode, flips and crops,
   gradient norm clipped to 20), epoch by epoch until the accuracy on the clean set during the epoch is at most
   ``clean_threshold`` or after ``unlearn_epochs`` epochs (learning rate ÷10 after 10 epochs).
2. **Recover**: a mask m_k ∈ [0, 1] (initially 1) on every channel of every BatchNorm output - of every convolution
   output in a model without BatchNorm - of the unlearned copy; with its weights frozen, SGD on the masks minimises
   α·CE on the clean set (train mode), masks clipped to [0, 1] after each step.
3. **Prune** the channels whose mask is below ``threshold`` from the ORIGINAL model: BatchNorm γ = β = 0, or a
   convolution's filter and bias = 0, so the channel's output is exactly 0 (a state-dict change). The unlearned copy
   and the masks are then discarded.

Fixed hyperparameters, from the authors' code (github.com/bboylyg/RNP, ``main.py`` defaults; its defense set is 1 %
of CIFAR-10 = 500 images, so the epoch counts fit the two-minute CPU budget as they are): unlearning SGD lr 0.01,
momentum 0.9, weight decay 5e-4, batch 128, stop at clean accuracy 0.2 or after 20 epochs, milestones [10, 20];
recovering 20 epochs, mask lr 0.2, momentum 0.9, α = 0.2. The authors sweep the pruning threshold (0 to 0.9 in steps
of 0.05) against test attack success; a defender cannot, so this uses one threshold fixed in advance, 0.2 (the
``anp`` default of this package). The authors mask and prune γ only; here the mask scales the whole channel output
and pruning zeroes γ and β, so a pruned channel is exactly 0 (why: the same pruning as ``anp``/``bnp``, and it also
works on convolutions). The authors clip the gradient before ``backward`` (a no-op); here it is clipped after.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from ..train import augment_batch
from . import CleanSet, DefenseOutcome, register
from .common import BN, place_model, prune_bn_channels


class _Mask:
    """Forward hook scaling each output channel by a learnable mask value."""

    def __init__(self, channels: int, device: torch.device):
        self.m = torch.ones(channels, device=device, requires_grad=True)

    def __call__(self, module, inputs, out: torch.Tensor) -> torch.Tensor:
        return out * self.m.view([1, -1] + [1] * (out.dim() - 2))


def neuron_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose channels RNP masks: every BatchNorm (with γ/β), else every convolution."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, BN) and m.affine]
    if bns:
        return bns
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError("rnp: the model has neither BatchNorm nor convolution layers whose channels it could prune")
    return convs


@torch.no_grad()
def prune_channels(module: nn.Module, idx: torch.Tensor) -> None:
    """Output channels ``idx`` of a BatchNorm (γ = β = 0) or convolution (filter and bias 0) are exactly 0."""
    if isinstance(module, BN):
        prune_bn_channels(module, idx)
        return
    module.weight[idx] = 0.0
    if module.bias is not None:
        module.bias[idx] = 0.0


def _epoch(model, x, y, batch_size, gen, step) -> tuple[float, float]:
    """One pass over (x, y) in random order with flips and crops; ``step(logits, labels)`` -> loss. (loss, acc)."""
    order = torch.randperm(len(x), generator=gen).to(x.device)
    total, hits, seen = 0.0, 0, 0
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        if len(idx) < 2:
            continue                      # batch statistics of one image are undefined
        logits = model(augment_batch(x[idx], gen))
        total += step(logits, y[idx]) * len(idx)
        hits += int((logits.argmax(1) == y[idx]).sum())
        seen += len(idx)
    return total / max(seen, 1), hits / max(seen, 1)


@register("rnp", summary="Li et al. 2023: unlearn, recover channel masks on the unlearned copy, prune the original",
          needs_labels=True, clean_threshold=0.2, unlearn_epochs=20, unlearn_lr=0.01, unlearn_milestone=10,
          recover_epochs=20, mask_lr=0.2, alpha=0.2, batch_size=128, momentum=0.9, weight_decay=5e-4,
          threshold=0.2)
def rnp(model, clean: CleanSet, *, device=None, progress=True, clean_threshold, unlearn_epochs, unlearn_lr,
        unlearn_milestone, recover_epochs, mask_lr, alpha, batch_size, momentum, weight_decay,
        threshold) -> DefenseOutcome:
    if unlearn_epochs < 0 or recover_epochs < 1 or batch_size < 2 or alpha <= 0:
        raise UserError("rnp: need unlearn_epochs >= 0, recover_epochs >= 1, batch_size >= 2 and alpha > 0")
    device = place_model(model, device)
    layers = neuron_layers(model)
    x, y = clean.x.to(device), clean.y.to(device)
    gen = torch.Generator().manual_seed(int(clean.seed))

    # 1. unlearn a copy (the original stays as delivered for step 3)
    bad = copy.deepcopy(model)
    params = [p for p in bad.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=unlearn_lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[unlearn_milestone], gamma=0.1)

    def ascend(logits, labels):
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        (-loss).backward()
        nn.utils.clip_grad_norm_(params, max_norm=20.0)
        opt.step()
        return loss.item()

    unlearn = []
    bad.train()
    for _ in tqdm(range(unlearn_epochs), desc="RNP unlearn", disable=not progress, leave=False):
        loss, acc = _epoch(bad, x, y, batch_size, gen, ascend)
        sched.step()
        unlearn.append({"loss": round(loss, 5), "clean_set_accuracy": round(acc, 4)})
        if acc <= clean_threshold:
            break

    # 2. recover masks on the unlearned copy, its weights frozen
    for p in bad.parameters():
        p.requires_grad_(False)
    bad_layers = dict(bad.named_modules())
    masks = {n: _Mask(m.weight.shape[0], device) for n, m in layers}
    handles = [bad_layers[n].register_forward_hook(masks[n]) for n, _ in layers]
    mask_opt = torch.optim.SGD([k.m for k in masks.values()], lr=mask_lr, momentum=momentum)

    def recover(logits, labels):
        loss = alpha * F.cross_entropy(logits, labels)
        mask_opt.zero_grad(set_to_none=True)
        loss.backward()
        mask_opt.step()
        with torch.no_grad():
            for k in masks.values():
                k.m.clamp_(0.0, 1.0)
        return loss.item()

    recovered = []
    try:
        bad.train()
        for _ in tqdm(range(recover_epochs), desc="RNP recover", disable=not progress, leave=False):
            loss, acc = _epoch(bad, x, y, batch_size, gen, recover)
            recovered.append({"loss": round(loss, 5), "clean_set_accuracy": round(acc, 4)})
    finally:
        for h in handles:
            h.remove()
    del bad

    # 3. prune the original
    pruned = {}
    for n, m in layers:
        idx = torch.nonzero(masks[n].m.detach() < threshold).flatten()
        if len(idx):
            prune_channels(m, idx)
            pruned[n] = idx.tolist()
    model.eval()
    values = torch.cat([k.m.detach().cpu() for k in masks.values()])
    return DefenseOutcome(model, {
        "pruned": pruned, "pruned_count": sum(map(len, pruned.values())), "channels": len(values),
        "masks": {n: [round(float(v), 4) for v in masks[n].m.detach().cpu()] for n, _ in layers}
        if len(values) <= 256 else {},
        "mask_quantiles": {str(q): round(float(values.quantile(q)), 4) for q in (0.0, 0.01, 0.05, 0.5)},
        "unlearn": unlearn, "recover": recovered})
