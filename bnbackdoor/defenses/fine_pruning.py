"""``fine_pruning``: Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018.

1. Find the last convolution stage: the module whose output is the network's last feature map with spatial extent
   (ResNet20: ``layer3``, the input of the global average pool; found by one probing forward pass, or named with the
   ``layer`` option).
2. Rank its channels by their mean activation on the clean images (eval mode; over images and positions).
3. Prune in increasing order of activation, ``step`` of the channels at a time (a forward hook masks a pruned channel:
   its output is exactly 0), measuring accuracy on the clean set after each step; stop before the step that lowers it
   by more than ``max_accuracy_drop`` below the unpruned model's, or at ``max_ratio`` of the channels - the paper's
   rule (prune until accuracy on clean data falls below a threshold fixed in advance).
4. Fine-tune every weight on the clean set exactly as the ``finetune`` defense does (the mask stays in place, so
   pruned channels stay 0).

The defender's clean set serves both as the paper's validation data for the stopping rule and as fine-tuning data.
The mask is a forward hook (:class:`~bnbackdoor.defenses.common.ChannelMask`) kept by ``deepcopy`` but not by the
state dict: ``info["pruned"]`` records the channels.

Fixed hyperparameters (chosen in advance, never tuned on test attack success): step 5 % of the channels, stop at an
accuracy drop of 4 percentage points, at most 90 % pruned; fine-tuning as ``finetune`` (10 epochs, batch 64, SGD lr
0.01, momentum 0.9, weight decay 5e-4, flips and crops).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import UserError
from ..models import get_submodule
from . import CleanSet, DefenseOutcome, register
from .common import finetune_on_clean, mask_channels, place_model

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@torch.no_grad()
def last_feature_stage(model: nn.Module, x: torch.Tensor) -> str:
    """Name of the module that last produces a 4-D feature map with more than one position (not a pooling layer)."""
    seen: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if name and not isinstance(m, _POOLS):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: seen.append(name)
                if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1 else None))
    try:
        model.eval()
        model(x)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise UserError("fine_pruning: the model has no convolutional feature map to prune")
    return seen[-1]


@torch.no_grad()
def mean_channel_activation(model: nn.Module, layer: nn.Module, x: torch.Tensor, batch_size: int = 250
                            ) -> torch.Tensor:
    """Mean of ``layer``'s output per channel over the images and positions of ``x`` (eval mode)."""
    total, count = None, 0
    grab = {}
    h = layer.register_forward_hook(lambda mod, inp, out: grab.__setitem__("out", out))
    try:
        model.eval()
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
            out = grab["out"].double()
            s = out.transpose(0, 1).reshape(out.shape[1], -1).sum(1)
            total = s if total is None else total + s
            count += out.numel() // out.shape[1]
    finally:
        h.remove()
    return (total / count).float()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
               for i in range(0, len(x), batch_size))
    return hits / len(x)


@register("fine_pruning", summary="Liu et al. 2018: prune the last stage's least active channels, then fine-tune",
          needs_labels=True, layer="", step=0.05, max_accuracy_drop=0.04, max_ratio=0.9,
          epochs=10, lr=0.01, batch_size=64, momentum=0.9, weight_decay=5e-4)
def fine_pruning(model, clean: CleanSet, *, device=None, progress=True, layer, step, max_accuracy_drop, max_ratio,
                 epochs, lr, batch_size, momentum, weight_decay) -> DefenseOutcome:
    if not (0 < step <= 1 and 0 <= max_ratio < 1 and max_accuracy_drop >= 0):
        raise UserError("fine_pruning: need 0 < step <= 1, 0 <= max_ratio < 1 and max_accuracy_drop >= 0")
    device = place_model(model, device)
    x, y = clean.x.to(device), clean.y.to(device)
    name = layer or last_feature_stage(model, x[:2])
    try:
        stage = get_submodule(model, name)
    except (AttributeError, IndexError):
        raise UserError(f"fine_pruning: the model has no module '{name}'") from None
    activation = mean_channel_activation(model, stage, x)
    channels = len(activation)
    order = torch.argsort(activation, stable=True).tolist()
    base = _accuracy(model, x, y)
    per_step = max(1, math.ceil(step * channels))
    limit = int(math.floor(max_ratio * channels))
    pruned, trace = 0, [{"pruned": 0, "clean_set_accuracy": base}]
    for k in range(per_step, limit + 1, per_step):
        mask_channels(stage, order[:k], channels)
        acc = _accuracy(model, x, y)
        trace.append({"pruned": k, "clean_set_accuracy": acc})
        if acc < base - max_accuracy_drop:
            break
        pruned = k
    mask_channels(stage, order[:pruned], channels)
    losses = finetune_on_clean(model, clean, list(model.parameters()), epochs=epochs, lr=lr, batch_size=batch_size,
                               momentum=momentum, weight_decay=weight_decay, device=device, bn_train=True,
                               progress=progress, desc="fine-pruning FT")
    return DefenseOutcome(model, {
        "layer": name, "channels": channels, "pruned": sorted(order[:pruned]), "pruned_count": pruned,
        "mean_activation_pruned": [round(float(activation[c]), 6) for c in order[:pruned]],
        "scan": trace, "train_loss": [round(v, 5) for v in losses],
        "clean_set_accuracy_after": _accuracy(model, x, y)})
