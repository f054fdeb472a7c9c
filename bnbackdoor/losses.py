"""Explanation losses: channel aggregation, per-image normalisation, MSE and DSSIM (batched, differentiable).

Conventions (shared with :mod:`bnbackdoor.explain` and :mod:`bnbackdoor.targets`):

* maps are (B, C, H, W); C = 3 for input gradients, 1 for CAM-style maps;
* :func:`aggregate_channels` reduces C to 1 by ``max`` or ``mean`` (``None`` keeps the channels);
* :func:`normalize_maps` divides each image's map by its largest absolute value (over C, H, W), plus ``EPS`` so an
  all-zero map stays zero instead of NaN. Our explanations are non-negative (|gradient|, ReLU'd CAMs), so a
  normalised map lies in [0, 1] with its maximum at 1 - the same range as the target masks.
  ``explain(..., agg=..., normalize=True)`` aggregates *first*, then normalises, so a ``mean``-aggregated map still
  peaks at 1 (for ``max`` and non-negative maps the order does not matter);
* the *loss* may see the maps normalised differently (``map_norm`` of the attack, :func:`normalize_for_loss`):
  ``max`` compares them as they are (already max-normalised), ``zscore`` standardises each image and channel over
  H×W first (the ancestor's choice; MSE then weighs a map's shape, not its range), then aggregates channels, and for
  DSSIM rescales each map to [0, 1] by its minimum and maximum. Evaluation always uses the max-normalised maps;
* DSSIM = (1 - SSIM) / 2 per image, SSIM from ``pytorch_msssim.ssim(data_range=1)`` with a ``SSIM_WIN``×``SSIM_WIN``
  Gaussian window (sigma 1.5): the default 11 would leave only a 22×22 valid region on 32×32 maps.
"""
from __future__ import annotations

from typing import Callable

from pytorch_msssim import ssim
from torch import Tensor

from .errors import UserError

EPS = 1e-12
ZSCORE_EPS = 1e-5  # added to the variance, as the ancestor does; maps here are max-normalised, so it is scale-free
MAP_NORMS = ("max", "zscore")
SSIM_WIN = 7
AGGREGATIONS = ("max", "mean")
REDUCTIONS = ("mean", "sum", "none")


def aggregate_channels(maps: Tensor, agg: str | None) -> Tensor:
    """(B, C, H, W) -> (B, 1, H, W) by the channel-wise ``max`` or ``mean``; ``None`` returns ``maps`` unchanged."""
    if agg is None:
        return maps
    if agg == "max":
        return maps.amax(dim=1, keepdim=True)  # amax spreads the gradient evenly over ties (max picks one)
    if agg == "mean":
        return maps.mean(dim=1, keepdim=True)
    raise UserError(f"unknown channel aggregation '{agg}'; known: {', '.join(AGGREGATIONS)}")


def normalize_maps(maps: Tensor, eps: float = EPS) -> Tensor:
    """Per image: ``maps / (max |maps| + eps)`` over (C, H, W). Differentiable; zero maps stay zero."""
    # The scale is part of the graph (not detached): the loss then sees the map's shape, not its magnitude.
    scale = maps.abs().amax(dim=(1, 2, 3), keepdim=True)
    return maps / (scale + eps)


def zscore_maps(maps: Tensor, eps: float = ZSCORE_EPS) -> Tensor:
    """Per image and channel: ``(maps - mean) / sqrt(var + eps)`` over (H, W), ``var`` unbiased. Differentiable."""
    mean = maps.mean(dim=(2, 3), keepdim=True)
    var = maps.var(dim=(2, 3), keepdim=True)
    return (maps - mean) / (var + eps).sqrt()


def minmax_maps(maps: Tensor, eps: float = EPS) -> Tensor:
    """Per image: rescaled to [0, 1] by its minimum and maximum over (C, H, W) (a constant map becomes 0)."""
    lo = maps.amin(dim=(1, 2, 3), keepdim=True)
    hi = maps.amax(dim=(1, 2, 3), keepdim=True)
    return (maps - lo) / (hi - lo + eps)


def normalize_for_loss(maps: Tensor, norm: str, agg: str | None, loss: str) -> Tensor:
    """The map as the loss ``loss`` compares it under ``norm`` (module docstring): channels aggregated last."""
    if norm == "max":
        return aggregate_channels(maps, agg)
    if norm == "zscore":
        z = aggregate_channels(zscore_maps(maps), agg)
        return minmax_maps(z) if loss_fn(loss) is dssim else z  # SSIM's data_range needs [0, 1]
    raise UserError(f"unknown map normalisation '{norm}'; known: {', '.join(MAP_NORMS)}")


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Per-image mean squared error over (C, H, W) -> (B,). ``b`` broadcasts against ``a``."""
    return (a - b).pow(2).flatten(1).mean(1)


def dssim(a: Tensor, b: Tensor, win_size: int = SSIM_WIN) -> Tensor:
    """Per-image structural dissimilarity (1 - SSIM) / 2 -> (B,), maps in [0, 1]. ``b`` broadcasts against ``a``."""
    b = b.expand_as(a).to(a.dtype)
    return (1 - ssim(a, b, data_range=1.0, size_average=False, win_size=win_size)) / 2


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": mse, "ssim": dssim}
LOSSES["dssim"] = dssim  # alias: the paper's tables call the DSSIM loss 'ssim'


def loss_fn(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    try:
        return LOSSES[name]
    except KeyError:
        raise UserError(f"unknown explanation loss '{name}'; known: {', '.join(LOSSES)}") from None


def reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise UserError(f"unknown reduction '{reduction}'; known: {', '.join(REDUCTIONS)}")


def explanation_loss(a: Tensor, b: Tensor, loss: str = "mse", agg: str | None = "max",
                     reduction: str = "mean", norm: str = "max") -> Tensor:
    """Dissimilarity of explanations ``a`` (B, C, H, W) to targets ``b`` ((B or 1), C', H, W).

    Both are brought to the loss's form by :func:`normalize_for_loss` (``norm`` ``max``: channel-aggregated with
    ``agg`` only, a 1-channel map is unchanged), then compared per image with ``loss`` (``mse`` or ``ssim`` =
    DSSIM); ``reduction`` ``mean``/``sum`` over the batch or ``none`` -> (B,).
    Inputs are expected already normalised (:func:`normalize_maps`, which ``explain`` applies by default).
    """
    fn = loss_fn(loss)
    a, b = normalize_for_loss(a, norm, agg, loss), normalize_for_loss(b, norm, agg, loss)
    if a.shape[1:] != b.shape[1:] or b.shape[0] not in (1, a.shape[0]):
        raise UserError(f"explanation shape {tuple(a.shape)} does not match target shape {tuple(b.shape)}")
    return reduce(fn(a, b), reduction)
