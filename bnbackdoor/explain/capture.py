"""Shared plumbing: target classes, the explained layer, capturing its activation with forward hooks."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import UserError
from ..models import cam_layer, get_submodule, model_spec

Target = int | Sequence[int] | Tensor | None


def resolve_target(target: Target, logits: Tensor) -> Tensor:
    """(B,) int64 class indices: the prediction (no gradient through argmax) when ``target`` is None."""
    b, n = logits.shape
    if target is None:
        return logits.detach().argmax(1)
    t = torch.as_tensor(target, dtype=torch.long, device=logits.device)
    if t.dim() == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise UserError(f"target must be an int or one class per image ({b}); got shape {tuple(t.shape)}")
    if bool(((t < 0) | (t >= n)).any()):
        raise UserError(f"target classes must lie in [0, {n - 1}]")
    return t


def target_score(logits: Tensor, target: Tensor) -> Tensor:
    """Sum over the batch of each image's target logit: its gradient is every image's own gradient (images are
    independent in eval mode; in train mode BatchNorm couples them through the batch statistics)."""
    return logits.gather(1, target.view(-1, 1)).sum()


def spec_of(model: nn.Module):
    modeltype = getattr(model, "modeltype", None)
    if modeltype is None:
        return None
    return model_spec(modeltype)


def explained_layer(model: nn.Module, layer: nn.Module | str | None) -> nn.Module:
    """``layer`` as a module (a dotted path is resolved), or the architecture's declared CAM layer."""
    if layer is None:
        return cam_layer(model)
    if isinstance(layer, str):
        try:
            return get_submodule(model, layer)
        except (AttributeError, IndexError):
            raise UserError(f"model has no layer '{layer}'") from None
    return layer


@contextmanager
def capture(modules: dict[str, nn.Module], start_graph: str | None = None) -> Iterator[dict[str, Tensor]]:
    """Record each module's output (last call) in the yielded dict while the context is open.

    The hook hands the rest of the network a clone, so an in-place op downstream (MobileNetV3's
    ``Hardswish(inplace=True)`` after its last BN) cannot overwrite the captured activation.

    ``start_graph``: the name of a module where the autograd graph should *begin*. Its output is captured as a
    fresh leaf that requires grad, and gradient recording is switched on from there to the end of the forward
    pass. Run the forward under ``torch.no_grad()`` and the layers before the module record nothing (cheaper:
    no saved activations), while gradients w.r.t. the captured output are exactly the same. The caller's
    ``no_grad`` context restores the grad mode when it closes.
    """
    out: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            if name == start_graph:
                torch.set_grad_enabled(True)
                output = output.detach().requires_grad_(True)
            out[name] = output
            return output.clone()
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def tokens_to_grid(tokens: Tensor) -> Tensor:
    """ViT tokens (B, 1 + P, D) -> (B, D, √P, √P): drop the class token, lay the patches out on their grid."""
    b, n, d = tokens.shape
    side = int(round((n - 1) ** 0.5))
    if side * side != n - 1:
        raise UserError(f"cannot lay {n - 1} patch tokens out on a square grid")
    return tokens[:, 1:].reshape(b, side, side, d).permute(0, 3, 1, 2)
