"""``bnp``: BN-statistics-based pruning from Zheng, Tang, Li & Liu, "Pre-activation Distributions Expose Backdoor
Neurons", NeurIPS 2022 (their "BNP").

Idea: a neuron's pre-activation (a BatchNorm layer's input channel) on the training data - which is what the stored
running statistics summarise - and on benign data differ strongly for backdoor neurons. Per BN channel k:

* stored distribution  N(μ_s, σ_s²): the layer's running mean and variance (the model as delivered);
* benign distribution  N(μ_c, σ_c²): mean and variance of the layer's input over the defender's clean images and
  all positions, the model in eval mode (the paper's Gaussian assumption, moments from benign data);
* divergence KL(N(μ_c, σ_c²) ‖ N(μ_s, σ_s²)) = log(σ_s/σ_c) + (σ_c² + (μ_c − μ_s)²) / (2σ_s²) − 1/2.

Within each layer, channels whose divergence exceeds mean + u·std of that layer's divergences are pruned.

Faithful to the paper: the benign moments come from the defender's clean images. (BackdoorBench's port instead takes
batch statistics of the poisoned training data, which the defender does not have.) Pruning sets γ and β of the channel
to 0, so its BN output is exactly 0 (the authors' code zeroes γ only, leaving the constant β; zeroing both makes the
channel truly removed). Needs no labels; nothing is trained.

Fixed hyperparameter (the authors' default, chosen in advance): u = 3. Both variances include the layer's ε (what it
divides by). BN layers without affine parameters are skipped (listed in the info).
"""
from __future__ import annotations

import torch

from ..cli import OptionKind
from . import CleanSet, DefenseOutcome, register
from .common import bn_input_moments, place_model, prune_bn_channels, require_bn


def gaussian_kl(mean_p: torch.Tensor, var_p: torch.Tensor, mean_q: torch.Tensor, var_q: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, var_p) ‖ N(mean_q, var_q)) elementwise (float64)."""
    mp, vp, mq, vq = (t.double() for t in (mean_p, var_p, mean_q, var_q))
    return 0.5 * torch.log(vq / vp) + (vp + (mp - mq) ** 2) / (2 * vq) - 0.5


def outliers(scores: torch.Tensor, u: float) -> torch.Tensor:
    """Indices whose score exceeds mean + u·std (unbiased std, finite scores only; infinite scores always count)."""
    finite = scores[torch.isfinite(scores)]
    if len(finite) < 2:
        return torch.nonzero(~torch.isfinite(scores)).flatten()
    thr = finite.mean() + u * finite.std()
    return torch.nonzero((scores > thr) | ~torch.isfinite(scores)).flatten()


@register("bnp", summary="Zheng et al. 2022: prune BN channels whose clean-data statistics diverge from the stored",
          needs_bn=True, u=3.0, batch_size=250,
          kinds={"batch_size": OptionKind(int, 1, reason="forward passes only: any batch of images")})
def bnp(model, clean: CleanSet, *, device=None, progress=True, u, batch_size) -> DefenseOutcome:
    device = place_model(model, device)
    layers = require_bn(model, "bnp")
    moments = bn_input_moments(model, layers, clean.x, device=device, batch_size=batch_size, progress=progress)
    pruned, skipped, stats = {}, [], {}
    for name, bn in layers:
        if not bn.affine:
            skipped.append(name)
            continue
        mean_c, var_c = moments[name]
        # Divergence of the benign pre-activations from the stored ones; both variances + the layer's eps (what
        # it divides by), so a channel constant on the clean set does not divide by zero.
        kl = gaussian_kl(mean_c, var_c + bn.eps, bn.running_mean, bn.running_var + bn.eps)
        idx = outliers(kl, u)
        if len(idx):
            prune_bn_channels(bn, idx)
            pruned[name] = idx.tolist()
        fin = kl[torch.isfinite(kl)]
        stats[name] = {"kl_mean": float(fin.mean()) if len(fin) else None,
                       "kl_max": float(kl.max()), "threshold_u": u}
    total = sum(len(m.running_mean) for n, m in layers if n not in skipped)
    return DefenseOutcome(model, {"pruned": pruned, "pruned_count": sum(map(len, pruned.values())),
                                  "channels": total, "skipped_layers": skipped, "layers": stats})
