"""Layer-wise relevance propagation (LRP-ε) from the target logit down to the CAM layer, per architecture.

Relevance starts as the target logit, ``R = onehot(t) ⊙ z``, and flows back through the few modules between the
CAM layer (the head's ``layer``, else the Grad-CAM layer) and the logits with closed-form, batched rules
(differentiable, no backward pass needed):

* linear ``z = W x + b`` (ε-rule): ``R_x = x ⊙ Wᵀ (R_z / (z + ε·sign z))``; the bias keeps its share;
* average pooling ``p = mean(x)``: ``R_x = x ⊙ R_p / ((p + ε·sign p) · hw)``;
* max pooling: winner takes all (relevance goes to each window's maximum);
* residual add ``y = a + b``: split in proportion, ``R_a = a ⊙ R_y / (y + ε·sign y)`` (same for ``b``);
* element-wise activations (ReLU, Softplus, Hardswish) and dropout pass relevance through unchanged.

Conservation: with ε → 0 the relevance reaching a layer sums to the target logit minus the biases' shares (in the
ResNet the shortcut keeps its share too). Each head returns its relevances by name, ``"layer"`` being the CAM
layer's (B, K, h, w). The rule is LRP-ε throughout; z⁺ or contrastive (CLRP/SGLRP) variants are not offered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError

EPSILON = 1e-6  # stabiliser: keeps near-zero denominators from blowing relevance up


def stabilize(z: Tensor, eps: float) -> Tensor:
    return z + torch.where(z >= 0, eps, -eps)


def initial_relevance(logits: Tensor, target: Tensor) -> Tensor:
    """Only the target logit is explained: R = onehot(t) ⊙ z."""
    return F.one_hot(target, logits.shape[1]).to(logits.dtype) * logits


def lrp_linear(x: Tensor, weight: Tensor, z: Tensor, rel: Tensor, eps: float) -> Tensor:
    """ε-rule for ``z = x Wᵀ + b``; x (B, I), weight (O, I), z and rel (B, O) -> (B, I)."""
    return x * ((rel / stabilize(z, eps)) @ weight)


def lrp_avgpool(x: Tensor, rel: Tensor, eps: float) -> Tensor:
    """Global average pooling (B, C, h, w) -> (B, C): each position's share of the mean."""
    p = x.mean(dim=(2, 3))
    return x * (rel / stabilize(p, eps))[:, :, None, None] / (x.shape[2] * x.shape[3])


def lrp_maxpool(x: Tensor, rel: Tensor, pool: nn.MaxPool2d) -> Tensor:
    """Winner takes all: ``rel`` (B, C, h', w') goes to each window's maximum in x (B, C, h, w)."""
    _, idx = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, return_indices=True)
    return F.max_unpool2d(rel, idx, pool.kernel_size, pool.stride, pool.padding, output_size=x.shape[-2:])


def lrp_sum(parts: list[Tensor], rel: Tensor, eps: float) -> list[Tensor]:
    """``y = Σ parts``: each part gets relevance in proportion to its contribution."""
    s = rel / stabilize(sum(parts), eps)
    return [p * s for p in parts]


@dataclass(frozen=True)
class LrpHead:
    # Extra modules whose outputs the rules need (name -> module), captured in the same forward pass.
    capture: Callable[[nn.Module], dict[str, nn.Module]]
    # (model, A, captured, logits, target, eps) -> relevances by name ("layer": at A).
    propagate: Callable[..., dict[str, Tensor]]
    # The layer A the relevance is propagated to (a dotted path); None: the architecture's Grad-CAM layer.
    layer: str | None = None


def _resnet(model, acts, got, logits, target, eps=EPSILON):
    # Last block: act2(bn2(conv2(.)) + shortcut(x)) -> global average pool -> linear. A is bn2's output
    # (conv2's in the BN-free twin, whose bn2 is an Identity).
    block = model.layer3[-1]
    short = got["shortcut"]
    out = block.act2(acts + short)
    rel = initial_relevance(logits, target)
    rel_pooled = lrp_linear(out.mean(dim=(2, 3)), model.linear.weight, logits, rel, eps)
    rel_out = lrp_avgpool(out, rel_pooled, eps)
    rel_a, rel_short = lrp_sum([acts, short], rel_out, eps)
    return {"layer": rel_a, "shortcut": rel_short, "pooled": rel_pooled, "logits": rel}


def _vgg(model, acts, got, logits, target, eps=EPSILON):
    # features[-3] (last BN, or last conv without BN) -> act -> maxpool -> flatten -> classifier.
    act, pool = model.features[-2], model.features[-1]
    out = act(acts)
    pooled = pool(out)
    rel = initial_relevance(logits, target)
    rel_pooled = lrp_linear(pooled.flatten(1), model.classifier.weight, logits, rel, eps)
    rel_a = lrp_maxpool(out, rel_pooled.view_as(pooled), pool)
    return {"layer": rel_a, "pooled": rel_pooled, "logits": rel}


def _wrn(model, acts, got, logits, target, eps=EPSILON):
    # Final BN -> act -> global average pool -> fc.
    out = model.act(acts)
    rel = initial_relevance(logits, target)
    rel_pooled = lrp_linear(out.mean(dim=(2, 3)), model.fc.weight, logits, rel, eps)
    return {"layer": lrp_avgpool(out, rel_pooled, eps), "pooled": rel_pooled, "logits": rel}


def _mnv3(model, acts, got, logits, target, eps=EPSILON):
    # Last BN -> Hardswish -> avgpool -> Linear -> Hardswish -> Dropout -> Linear. The dropout output is the one
    # the forward pass used (captured), so a training-mode mask is honoured.
    lin1, _, _, lin2 = model.classifier
    out = F.hardswish(acts)  # not the model's in-place module: it would overwrite A
    pooled = out.mean(dim=(2, 3))
    rel = initial_relevance(logits, target)
    rel_hidden = lrp_linear(got["dropout"], lin2.weight, logits, rel, eps)
    rel_pooled = lrp_linear(pooled, lin1.weight, lin1(pooled), rel_hidden, eps)
    return {"layer": lrp_avgpool(out, rel_pooled, eps), "pooled": rel_pooled, "hidden": rel_hidden, "logits": rel}


_RESNET = LrpHead(lambda m: {"shortcut": m.layer3[-1].shortcut}, _resnet)
_VGG = LrpHead(lambda m: {}, _vgg)

# architecture -> LRP head (the modules between the declared CAM layer and the logits)
LRP_HEADS: dict[str, LrpHead] = {
    "resnet20": _RESNET,
    "resnet20_nbn": _RESNET,
    "vgg13": _VGG,
    "vgg13bn": _VGG,
    "wideresnet28_10": LrpHead(lambda m: {}, _wrn),
    # Relevance-CAM stays on the last 1×1 conv's BN (4×4): the rules here do not cross inverted residuals and
    # squeeze-excitation blocks, which lie between it and the 8×8 Grad-CAM layer (features.8).
    "mobilenetv3small": LrpHead(lambda m: {"dropout": m.classifier[2]}, _mnv3, layer="features.-1.1"),
}


def lrp_head(arch: str) -> LrpHead:
    try:
        return LRP_HEADS[arch]
    except KeyError:
        raise UserError(f"Relevance-CAM has no LRP rules for '{arch}'; supported: {', '.join(LRP_HEADS)}") from None
