"""Building blocks shared by the baseline defenses (registers nothing itself).

* :func:`finetune_on_clean` - the one fine-tuning loop (SGD, the clean trainer's flips and crops) that ``finetune``,
  ``bn_finetune`` and ``fine_pruning`` share, so their training differs only where the defenses differ.
* :func:`require_bn` - the BatchNorm layers a BN-based defense works on, or a one-line :class:`UserError`.
* :func:`prune_bn_channels` - pruning a BatchNorm channel: γ = β = 0, so the layer's output for that channel is
  exactly 0 (whatever its input), and the change is an ordinary state-dict change (saved with the model).
* :class:`ChannelMask` - pruning the channels of any module's output (a forward hook; survives ``deepcopy``).
* :func:`bn_input_moments` - per channel, the exact mean and variance of every BN layer's input over a set of images.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from ..metrics import model_device
from ..train import augment_batch
from . import CleanSet, get_defense
from .rebn import bn_layers

__all__ = ["place_model", "require_bn", "not_applicable", "prune_bn_channels", "ChannelMask", "mask_channels", "channel_masks",
           "finetune_on_clean", "clean_loss", "bn_input_moments", "batch_size_for"]

BN = nn.modules.batchnorm._BatchNorm


def place_model(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` (the model is moved there) or the model's own device (:func:`bnbackdoor.metrics.place_model`)."""
    if device is not None:
        model.to(device)
    return model_device(model, device)


def require_bn(model: nn.Module, defense: str, affine: bool = False) -> list[tuple[str, BN]]:
    """The BatchNorm layers (with running statistics; with γ/β when ``affine``) ``defense`` acts on."""
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, BN) and m.track_running_stats and m.running_mean is not None
              and (m.affine or not affine)]
    if not layers:
        what = "BatchNorm layers with running statistics" + (" and affine parameters" if affine else "")
        raise UserError(f"defense '{defense}' works on BatchNorm; this model has no {what}")
    return layers


def not_applicable(name: str, model: nn.Module) -> str | None:
    """Why defense ``name`` cannot act on ``model`` (one line), or None where it can: a BatchNorm defense
    (registered ``needs_bn``) on a model without BatchNorm (the BN-free ResNet20, VGG13, ViT). A comparison skips
    such a pair and says so instead of failing on it."""
    if get_defense(name).needs_bn and not bn_layers(model):
        return f"'{name}' acts on BatchNorm layers and this model has none"
    return None


@torch.no_grad()
def prune_bn_channels(bn: BN, channels: Sequence[int] | torch.Tensor) -> None:
    """Set γ and β of ``channels`` to 0: the BN output of those channels is exactly 0 from now on."""
    idx = torch.as_tensor(channels, dtype=torch.long, device=bn.weight.device)
    bn.weight[idx] = 0.0
    bn.bias[idx] = 0.0


class ChannelMask:
    """Forward hook zeroing channels (dim 1) of a module's output: ``keep`` is a bool vector per channel.

    An object, not a closure, so ``copy.deepcopy`` of the model copies the mask with it.
    """

    def __init__(self, keep: torch.Tensor):
        self.keep = keep.detach().bool().clone()

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (output.dim() - 2)
        return output.masked_fill(~self.keep.to(output.device).view(shape), 0.0)


def mask_channels(module: nn.Module, channels: Sequence[int], num_channels: int) -> ChannelMask:
    """Zero ``channels`` of ``module``'s output from now on (replaces an earlier :class:`ChannelMask`)."""
    for key, hook in list(module._forward_hooks.items()):
        if isinstance(hook, ChannelMask):
            del module._forward_hooks[key]
    keep = torch.ones(num_channels, dtype=torch.bool)
    keep[torch.as_tensor(list(channels), dtype=torch.long)] = False
    mask = ChannelMask(keep)
    module.register_forward_hook(mask)
    return mask


def channel_masks(model: nn.Module) -> dict[str, list[int]]:
    """Module name -> the channels a :class:`ChannelMask` zeroes there."""
    out = {}
    for name, m in model.named_modules():
        for hook in m._forward_hooks.values():
            if isinstance(hook, ChannelMask):
                out[name] = (~hook.keep).nonzero().flatten().tolist()
    return out


def batch_size_for(n: int, cap: int) -> int:
    """Largest batch size <= ``cap`` splitting ``n`` images into (nearly) equal batches."""
    k = -(-n // cap)
    return -(-n // max(k, 1))


def finetune_on_clean(model: nn.Module, clean: CleanSet, params: Sequence[nn.Parameter], *, epochs: int,
                      lr: float, batch_size: int, momentum: float, weight_decay: float, device: torch.device,
                      bn_train: bool = True, progress: bool = True, desc: str = "fine-tune",
                      after_step: Callable[[], None] | None = None) -> list[float]:
    """SGD on ``params`` only (every other parameter is frozen), cross-entropy on the labelled clean set with the
    clean trainer's random crops and flips (:func:`bnbackdoor.train.augment_batch`), seeded by ``clean.seed``.

    ``bn_train``: BatchNorm normalises with batch statistics and its running statistics follow (momentum) - plain
    fine-tuning; otherwise the whole model stays in eval mode (running statistics fixed and used).
    Returns the mean loss per epoch. The model ends in eval mode.
    """
    if clean.y is None:
        raise UserError("fine-tuning needs labelled clean images")
    wanted = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in wanted and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    x, y = clean.x.to(device), clean.y.to(device)
    gen = torch.Generator().manual_seed(int(clean.seed))
    losses = []
    try:
        for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
            model.train(bn_train)
            order = torch.randperm(len(x), generator=gen).to(device)
            total = 0.0
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                if bn_train and len(idx) < 2:
                    continue   # batch statistics of one image are undefined
                xb = augment_batch(x[idx], gen)
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step()
                total += loss.item() * len(idx)
            losses.append(total / len(x))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    return losses


@torch.no_grad()
def clean_loss(model: nn.Module, clean: CleanSet, device: torch.device | str | None = None,
               batch_size: int = 250) -> float:
    """Mean cross-entropy of ``model`` (eval mode, no augmentation) on the labelled clean set."""
    device = model_device(model, device)
    model.eval()
    total = 0.0
    for i in range(0, len(clean), batch_size):
        logits = model(clean.x[i:i + batch_size].to(device))
        total += F.cross_entropy(logits, clean.y[i:i + batch_size].to(device), reduction="sum").item()
    return total / max(len(clean), 1)


@torch.no_grad()
def bn_input_moments(model: nn.Module, layers: Sequence[tuple[str, BN]], x: torch.Tensor, *,
                     device: torch.device, batch_size: int = 250, progress: bool = True
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer: (mean, unbiased variance) per channel of its input over all images and positions of ``x``.

    The model runs in eval mode (the deployed model: earlier layers normalise with their stored statistics).
    Accumulated in float64 sums, so the result does not depend on the batch size.
    """
    acc: dict[str, list] = {n: [0, 0.0, 0.0] for n, _ in layers}

    def hook(name):
        def fn(mod, inp):
            t = inp[0].detach().double().transpose(0, 1).reshape(inp[0].shape[1], -1)
            a = acc[name]
            a[0] += t.shape[1]
            a[1] = a[1] + t.sum(1)
            a[2] = a[2] + (t * t).sum(1)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    was = model.training
    model.eval()
    try:
        for i in tqdm(range(0, len(x), batch_size), desc="BN input statistics", disable=not progress, leave=False):
            model(x[i:i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    out = {}
    for n, (cnt, s, ss) in acc.items():
        if cnt < 2:
            raise UserError("need at least 2 values per channel to estimate BatchNorm input statistics")
        mean = s / cnt
        var = (ss - cnt * mean * mean) / (cnt - 1)
        out[n] = (mean, var.clamp_min(0.0))
    return out
