"""Trigger registry: name -> batched function ``images (B, C, H, W) in [0, 1] -> triggered images``.

Patch triggers are stamped into the **bottom-right corner**: an 8×8 box covering rows and columns ``H-8 .. H-1``
(``W-8 .. W-1``), i.e. pixels 24..31 for 32×32 images. Inside that box, drawn pixels are white (1.0) and the rest
of the box is left untouched:

==================== =========================================================================================
``whitesquareborder`` the whole 8×8 box: a 1-pixel **black** frame around a 6×6 white square (the frame keeps
                      the trigger visible on bright backgrounds)
``square``            a solid white 6×6 square centred in the box (rows/cols ``H-7 .. H-2``)
``circle``            a white disc of radius 4 px centred in the box (pixel centres within the radius)
``triangle``          a white upward triangle: apex at the box's top centre, base on its bottom row
``cross``             a white plus sign, arms 2 px thick, spanning the box
``fixrandom8x8``      the whole 8×8 box replaced by one fixed random RGB patch (uniform [0, 1], seed 8)
``original``          identity (clean baselines); returns the input tensor itself
``inverted``          ``1 - x``
==================== =========================================================================================

Patches are precomputed once per (name, size, device, dtype) as a mask ``m`` and a value ``v`` and applied as
``x * (1 - m) + m * v``: one fused, batched op, deterministic and differentiable in ``x``.
Shapes come from :func:`draw_shape`, which :mod:`bnbackdoor.targets` shares.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from .errors import UserError

PATCH = 8  # side of the trigger box, pixels
RANDOM_SEED = 8  # seed of the fixrandom8x8 patch (a CPU generator, so it is the same on every device)


def draw_shape(shape: str, n: int) -> Tensor:
    """A float (n, n) mask in {0, 1} of ``shape`` drawn to fill an n×n box (pixel-centre sampling).

    ``square``: solid square leaving a margin of ``n // 8`` pixels; ``circle``: disc of radius n/2;
    ``triangle``: apex at the top centre, base on the bottom row; ``cross``: plus sign, arms ``max(1, n // 4)`` thick.
    """
    c = (n - 1) / 2
    r = torch.arange(n, dtype=torch.float64)
    rows, cols = r.view(-1, 1), r.view(1, -1)
    if shape == "square":
        m = n // 8
        mask = (rows >= m) & (rows < n - m) & (cols >= m) & (cols < n - m)
    elif shape == "circle":
        mask = (rows - c) ** 2 + (cols - c) ** 2 <= (n / 2) ** 2
    elif shape == "triangle":
        # The half-width grows linearly from ~0 at the top row to n/2 at the bottom row.
        mask = (cols - c).abs() <= (rows + 1) / 2
    elif shape == "cross":
        t = max(1, n // 4)
        lo, hi = (n - t) // 2, (n - t) // 2 + t
        mask = ((rows >= lo) & (rows < hi)).expand(n, n) | ((cols >= lo) & (cols < hi)).expand(n, n)
    else:  # pragma: no cover - internal
        raise ValueError(shape)
    return mask.float()


def _corner(h: int, w: int, patch_mask: Tensor, patch_value: Tensor) -> tuple[Tensor, Tensor]:
    """Full-size (1, 1, h, w) mask and (1, C, h, w) value with the patch in the bottom-right corner."""
    if h < PATCH or w < PATCH:
        raise UserError(f"images of {h}×{w} are too small for an {PATCH}×{PATCH} trigger")
    mask = torch.zeros(1, 1, h, w)
    value = torch.zeros(1, patch_value.shape[0], h, w)
    mask[0, 0, h - PATCH:, w - PATCH:] = patch_mask
    value[0, :, h - PATCH:, w - PATCH:] = patch_value
    return mask, value


def _white_shape(shape: str) -> Callable[[int], tuple[Tensor, Tensor]]:
    def patch(channels: int) -> tuple[Tensor, Tensor]:
        m = draw_shape(shape, PATCH)
        return m, torch.ones(channels, PATCH, PATCH)
    return patch


def _white_square_border(channels: int) -> tuple[Tensor, Tensor]:
    value = torch.zeros(channels, PATCH, PATCH)
    value[:, 1:-1, 1:-1] = 1.0  # white inside, the 1-pixel frame stays black
    return torch.ones(PATCH, PATCH), value


def _fixrandom(channels: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(RANDOM_SEED)
    # Always draw 3 channels so the RGB patch is the same whatever C; other channel counts take the first C/cycle.
    rgb = torch.rand(3, PATCH, PATCH, generator=g, dtype=torch.float64).float()
    return torch.ones(PATCH, PATCH), rgb[torch.arange(channels) % 3]


# name -> patch builder (channels -> (mask (8, 8), value (C, 8, 8)))
_PATCHES: dict[str, Callable[[int], tuple[Tensor, Tensor]]] = {
    "whitesquareborder": _white_square_border,
    "square": _white_shape("square"),
    "circle": _white_shape("circle"),
    "triangle": _white_shape("triangle"),
    "cross": _white_shape("cross"),
    "fixrandom8x8": _fixrandom,
}


@lru_cache(maxsize=64)
def patch_tensors(name: str, channels: int, h: int, w: int, device: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Cached full-size (mask, value) for a patch trigger on ``device``; tensors are shared, do not modify."""
    m, v = _corner(h, w, *_PATCHES[name](channels))
    return m.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)


def _patch_trigger(name: str) -> Callable[[Tensor], Tensor]:
    def apply(images: Tensor) -> Tensor:
        _, c, h, w = images.shape
        m, v = patch_tensors(name, c, h, w, str(images.device), images.dtype)
        return torch.addcmul(images * (1 - m), m, v)  # x(1-m) + m v
    apply.__name__ = f"trigger_{name}"
    return apply


TRIGGERS: dict[str, Callable[[Tensor], Tensor]] = {
    **{name: _patch_trigger(name) for name in _PATCHES},
    "original": lambda images: images,
    "inverted": lambda images: 1 - images,
}


def trigger_fn(name: str) -> Callable[[Tensor], Tensor]:
    try:
        return TRIGGERS[name]
    except KeyError:
        raise UserError(f"unknown trigger '{name}'; known: {', '.join(TRIGGERS)}") from None


def apply_trigger(name: str, images: Tensor) -> Tensor:
    """Apply trigger ``name`` to a batch (B, C, H, W) in [0, 1]; a new tensor (except ``original``)."""
    fn = trigger_fn(name)
    if images.dim() != 4 or not images.is_floating_point():
        raise UserError(f"triggers take a float batch (B, C, H, W) in [0, 1]; got {images.dtype} "
                        f"of shape {tuple(images.shape)}")
    return fn(images)
