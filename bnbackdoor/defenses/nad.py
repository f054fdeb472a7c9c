"""``nad``: Neural Attention Distillation, Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention Distillation: Erasing
Backdoor Triggers from Deep Neural Networks", ICLR 2021.

1. **Teacher**: a copy of the model fine-tuned on the labelled clean set exactly as the ``finetune`` defense does.
2. **Student**: the original model, trained on the clean set with CE + Σ_l β_l·AT_l, where AT_l is the mean squared
   difference between the teacher's and the student's attention maps at stage l (teacher frozen, eval mode).
   Attention map (:func:`attention_map`): mean over channels of |a|^p, flattened and L2-normalised per image.

Stages (:func:`attention_stages`): the model's top-level ``layer1``, ``layer2``, ... (ResNet20: the three groups of
blocks, whose outputs NAD uses); a model without them uses its last feature stage (the ``fine_pruning`` rule).

Fixed hyperparameters, from the authors' code (github.com/bboylyg/NAD, ``config.py``): p = 2, β = (0, 0, 5000) for
the low/middle/high stage (stages beyond three get β = 0 except the last, which gets β3), batch 64, SGD momentum
0.9, weight decay 1e-4. Deviations, for the two-minute CPU budget of ResNet20 at 500 clean images: teacher as
``finetune`` (10 epochs, lr 0.01) and the student 10 epochs at a constant lr 0.01 (the authors: 20 epochs from lr
0.1, divided by 10 every 2 epochs - the same few effective high-lr epochs, fewer low-lr ones). Seeded by
``CleanSet.seed`` (flips and crops as the clean trainer).
"""
from __future__ import annotations

import copy
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from ..train import augment_batch
from . import CleanSet, DefenseOutcome, register
from .common import finetune_on_clean, place_model
from .fine_pruning import last_feature_stage


def attention_map(a: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W): mean over channels of |a|^p, each image's map divided by its L2 norm."""
    return F.normalize(a.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(a_student: torch.Tensor, a_teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the two attention maps (the teacher's is a constant)."""
    return (attention_map(a_student, p) - attention_map(a_teacher.detach(), p)).pow(2).mean()


def attention_stages(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Top-level ``layerN`` modules in order, else the last module with a spatial feature map."""
    names = sorted((n for n, _ in model.named_children() if re.fullmatch(r"layer\d+", n)), key=lambda n: int(n[5:]))
    if names:
        return names
    return [last_feature_stage(model, x)]


class _Grab:
    def __init__(self):
        self.out: dict[str, torch.Tensor] = {}

    def hook(self, name):
        def fn(mod, inp, out):
            self.out[name] = out
        return fn


@register("nad", summary="Li et al. 2021: distil a clean-fine-tuned teacher's attention maps into the model",
          needs_labels=True, beta1=0.0, beta2=0.0, beta3=5000.0, p=2.0, teacher_epochs=10, epochs=10, lr=0.01,
          batch_size=64, momentum=0.9, weight_decay=1e-4)
def nad(model, clean: CleanSet, *, device=None, progress=True, beta1, beta2, beta3, p, teacher_epochs, epochs, lr,
        batch_size, momentum, weight_decay) -> DefenseOutcome:
    if p <= 0 or epochs < 1 or teacher_epochs < 0 or batch_size < 2:
        raise UserError("nad: need p > 0, epochs >= 1, teacher_epochs >= 0 and batch_size >= 2")
    device = place_model(model, device)
    x, y = clean.x.to(device), clean.y.to(device)
    stages = attention_stages(model, x[:2])
    betas = [0.0] * len(stages)
    for i, b in enumerate((beta1, beta2)):
        if i < len(stages) - 1:
            betas[i] = float(b)
    betas[-1] = float(beta3)

    teacher = copy.deepcopy(model)
    finetune_on_clean(teacher, clean, list(teacher.parameters()), epochs=teacher_epochs, lr=0.01, batch_size=64,
                      momentum=0.9, weight_decay=5e-4, device=device, progress=progress, desc="NAD teacher")
    for q in teacher.parameters():
        q.requires_grad_(False)
    teacher.eval()

    grab_s, grab_t = _Grab(), _Grab()
    mods_s, mods_t = dict(model.named_modules()), dict(teacher.named_modules())
    handles = [mods_s[n].register_forward_hook(grab_s.hook(n)) for n in stages]
    handles += [mods_t[n].register_forward_hook(grab_t.hook(n)) for n in stages]
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(clean.seed) + 1)
    history = []
    try:
        for _ in tqdm(range(epochs), desc="NAD student", disable=not progress, leave=False):
            model.train()
            order = torch.randperm(len(x), generator=gen).to(device)
            ce_sum, at_sum, seen = 0.0, 0.0, 0
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                if len(idx) < 2:
                    continue              # batch statistics of one image are undefined
                xb = augment_batch(x[idx], gen)
                with torch.no_grad():
                    teacher(xb)
                ce = F.cross_entropy(model(xb), y[idx])
                at = sum(b * attention_loss(grab_s.out[n], grab_t.out[n], p)
                         for n, b in zip(stages, betas) if b != 0.0)
                loss = ce + at
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ce_sum += ce.item() * len(idx)
                at_sum += (float(at.detach()) if torch.is_tensor(at) else 0.0) * len(idx)
                seen += len(idx)
            history.append({"ce": round(ce_sum / max(seen, 1), 5), "attention": round(at_sum / max(seen, 1), 6)})
    finally:
        for h in handles:
            h.remove()
        model.eval()
    return DefenseOutcome(model, {"stages": stages, "betas": betas, "train": history})
