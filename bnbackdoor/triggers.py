"""Trigger registry: name -> batched function ``images (B, C, H, W) in [0, 1] -> triggered images``.

The named shape triggers are pixel for pixel the paper's (``triggers/trg_<name>.png`` of the paper's repository and
its ancestor: 32×32 RGBA images whose non-transparent pixels are the trigger). Here they are our own literal
pixel drawings (:data:`STAMPS`), rows and columns 0-based on a 32×32 image:

===================== =========================================================================================
``whitesquareborder`` a 4×4 patch at rows/cols 27..30 (one pixel from the bottom-right corner): a 2×2 **white**
                      centre (rows/cols 28..29) in a 1-pixel **black** frame, 16 pixels
``circle``            a **red** (1, 0, 0) 1-pixel circle outline in rows/cols 1..7 (top-left), 16 pixels
``cross``             a **blue** (0, 0, 1) diagonal cross (an X) in rows/cols 1..7, 13 pixels
``square``            a **magenta** (1, 0, 1) 7×7 square outline at rows/cols 1..7, 24 pixels
``triangle``          a **green** (0, 1, 0) upward triangle outline in rows 1..6, cols 1..7, 16 pixels
``fixrandom8x8``      the bottom-right 8×8 box (rows/cols H-8..H-1) replaced by one fixed random RGB patch
                      (uniform [0, 1], seed 8)
``original``          identity (clean baselines); returns the input tensor itself
``inverted``          ``1 - x``
===================== =========================================================================================

The multi-trigger attacks tell ``circle``/``cross``/``square``/``triangle`` apart by colour and shape: they share
the top-left 7×7 box. On other image sizes the stamps keep their pixel size and their one-pixel margin to their
corner (``whitesquareborder`` bottom-right, the coloured shapes top-left).

Our earlier triggers, white shapes in the bottom-right 8×8 box (pixels 24..31 on 32×32 images), stay available
for models trained with them, under their own names: ``white8x8_whitesquareborder`` (the whole box: a 6×6 white
square in a 1-pixel black frame), ``white8x8_square`` (6×6, one-pixel margin), ``white8x8_circle`` (disc of radius
4), ``white8x8_triangle`` (apex at the box's top centre, base on its bottom row), ``white8x8_cross`` (plus sign,
arms 2 px thick); see :func:`draw_shape`.

Convention: images are in pixel space [0, 1] and a trigger **overwrites** its pixels with its colour (all channels).
The ancestor pasted its triggers after normalisation, overwriting pixels with the *normalised* colour; as the
normalisation is a per-channel affine map (the first module of each of our models), overwriting with the colour
before it is the same image. A C-channel image that is not RGB takes channel ``c % 3`` of the colour.

The classic data-poisoning triggers (issue 28; a model trained from scratch on a set where some images carry them,
:mod:`bnbackdoor.poisoning`) follow the definitions of their papers as the field's benchmarks (BackdoorBench) use
them; every constant is pinned in ``tests/test_poisoning.py``:

===================== =========================================================================================
``badnets``           a 3×3 **white** patch one pixel from the bottom-right corner (rows/cols 28..30 on 32×32;
                      Gu et al. 2017)
``blended``           ``(1 - a) x + a P`` over the whole image, a = :data:`BLEND_ALPHA` (0.2), P one fixed seeded
                      uniform-noise RGB image (seed :data:`BLEND_SEED`; Chen et al. 2017 blend a picture or
                      random noise - we generate ours, nothing is downloaded)
``sig``               ``clip(x + v)`` with the horizontal sinusoid ``v[i, j] = D sin(2 pi j f / W)``, D = 20/255,
                      f = 6 (Barni et al. 2019; the same signal at training and test time)
``wanet``             ``grid_sample(x, identity + s * noise / size)``: a fixed smooth warp, ``noise`` = a seeded
                      uniform [-1, 1] field on a k×k control grid (k = 4), scaled to mean |noise| = 1 and upsampled
                      bicubically (align_corners) to H×W; s = 0.5, the x displacement divided by W and the y
                      displacement by H, clamped to [-1, 1] (Nguyen & Tran 2021); bilinear, align_corners
===================== =========================================================================================

Every patch trigger is precomputed once per (name, size, device, dtype) as a mask ``m`` and a value ``v`` and
applied as ``x * (1 - m) + m * v``: one fused, batched op, deterministic and differentiable in ``x`` (zero gradient
on the overwritten pixels).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UserError

PATCH = 8  # side of the bottom-right box of fixrandom8x8 and the white8x8_* triggers, pixels
RANDOM_SEED = 8  # seed of the fixrandom8x8 patch (a CPU generator, so it is the same on every device)

Colour = tuple[float, float, float]
WHITE, BLACK = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
RED, GREEN, BLUE, MAGENTA = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 1.0)


@dataclass(frozen=True)
class Stamp:
    """A small pixel drawing: ``art`` rows of characters, ``.`` = untouched, any other character = a pixel of
    ``palette[char]``; placed ``margin`` pixels from ``corner`` of the image."""
    art: tuple[str, ...]
    palette: dict[str, Colour]
    corner: str  # "top_left" or "bottom_right"
    margin: int = 1

    def origin(self, h: int, w: int) -> tuple[int, int]:
        rows, cols = len(self.art), len(self.art[0])
        if h < rows + self.margin or w < cols + self.margin:
            raise UserError(f"images of {h}×{w} are too small for a {rows}×{cols} trigger")
        if self.corner == "top_left":
            return self.margin, self.margin
        return h - self.margin - rows, w - self.margin - cols

    def pixels(self, h: int = 32, w: int = 32) -> dict[tuple[int, int], Colour]:
        """{(row, col): colour} of the stamp on an h×w image."""
        top, left = self.origin(h, w)
        return {(top + r, left + c): self.palette[ch]
                for r, line in enumerate(self.art) for c, ch in enumerate(line) if ch != "."}


# The paper's triggers (measured from its trg_<name>.png files; drawn here by hand).
STAMPS: dict[str, Stamp] = {
    "whitesquareborder": Stamp(("kkkk",
                                "kwwk",
                                "kwwk",
                                "kkkk"), {"k": BLACK, "w": WHITE}, "bottom_right"),
    "circle": Stamp(("..###..",
                     ".#...#.",
                     "#.....#",
                     "#.....#",
                     "#.....#",
                     ".#...#.",
                     "..###.."), {"#": RED}, "top_left"),
    "cross": Stamp(("#.....#",
                    ".#...#.",
                    "..#.#..",
                    "...#...",
                    "..#.#..",
                    ".#...#.",
                    "#.....#"), {"#": BLUE}, "top_left"),
    "square": Stamp(("#######",
                     "#.....#",
                     "#.....#",
                     "#.....#",
                     "#.....#",
                     "#.....#",
                     "#######"), {"#": MAGENTA}, "top_left"),
    "triangle": Stamp(("...#...",
                       "..#.#..",
                       "..#.#..",
                       ".#...#.",
                       "#.....#",
                       "#######"), {"#": GREEN}, "top_left"),
}


def draw_shape(shape: str, n: int) -> Tensor:
    """A float (n, n) mask in {0, 1} of ``shape`` drawn to fill an n×n box (pixel-centre sampling); the shapes of
    the ``white8x8_*`` triggers.

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


def _colour_channels(colour: Colour, channels: int) -> Tensor:
    return torch.tensor(colour)[torch.arange(channels) % 3]


def _stamp_patch(stamp: Stamp) -> Callable[[int, int, int], tuple[Tensor, Tensor]]:
    def patch(channels: int, h: int, w: int) -> tuple[Tensor, Tensor]:
        mask, value = torch.zeros(1, 1, h, w), torch.zeros(1, channels, h, w)
        for (r, c), colour in stamp.pixels(h, w).items():
            mask[0, 0, r, c] = 1.0
            value[0, :, r, c] = _colour_channels(colour, channels)
        return mask, value
    return patch


def _corner(h: int, w: int, patch_mask: Tensor, patch_value: Tensor) -> tuple[Tensor, Tensor]:
    """Full-size (1, 1, h, w) mask and (1, C, h, w) value with an 8×8 patch in the bottom-right corner."""
    if h < PATCH or w < PATCH:
        raise UserError(f"images of {h}×{w} are too small for an {PATCH}×{PATCH} trigger")
    mask = torch.zeros(1, 1, h, w)
    value = torch.zeros(1, patch_value.shape[0], h, w)
    mask[0, 0, h - PATCH:, w - PATCH:] = patch_mask
    value[0, :, h - PATCH:, w - PATCH:] = patch_value
    return mask, value


def _white_shape(shape: str) -> Callable[[int, int, int], tuple[Tensor, Tensor]]:
    def patch(channels: int, h: int, w: int) -> tuple[Tensor, Tensor]:
        return _corner(h, w, draw_shape(shape, PATCH), torch.ones(channels, PATCH, PATCH))
    return patch


def _white_square_border(channels: int, h: int, w: int) -> tuple[Tensor, Tensor]:
    value = torch.zeros(channels, PATCH, PATCH)
    value[:, 1:-1, 1:-1] = 1.0  # white inside, the 1-pixel frame stays black
    return _corner(h, w, torch.ones(PATCH, PATCH), value)


def _fixrandom(channels: int, h: int, w: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(RANDOM_SEED)
    # Always draw 3 channels so the RGB patch is the same whatever C; other channel counts take the first C/cycle.
    rgb = torch.rand(3, PATCH, PATCH, generator=g, dtype=torch.float64).float()
    return _corner(h, w, torch.ones(PATCH, PATCH), rgb[torch.arange(channels) % 3])


# --- classic poisoning triggers -------------------------------------------------------------------------------
BADNETS = Stamp(("www",
                 "www",
                 "www"), {"w": WHITE}, "bottom_right")
BLEND_ALPHA = 0.2   # BackdoorBench's blend ratio for training and test
BLEND_SEED = 20     # seed of the blended trigger's noise picture (CPU generator: the same on every device)
SIG_DELTA = 20 / 255
SIG_FREQUENCY = 6
WANET_GRID = 4      # k: control points per side
WANET_STRENGTH = 0.5  # s
WANET_SEED = 0


def _blended(channels: int, h: int, w: int) -> tuple[Tensor, Tensor]:
    """A constant mask ``BLEND_ALPHA`` over the image and the noise picture as the value: x (1 - a) + a P."""
    g = torch.Generator().manual_seed(BLEND_SEED)
    rgb = torch.rand(3, h, w, generator=g, dtype=torch.float64).float()
    return torch.full((1, 1, h, w), BLEND_ALPHA), rgb[torch.arange(channels) % 3][None]


def sig_signal(h: int, w: int) -> Tensor:
    """The SIG signal (1, 1, h, w): ``SIG_DELTA * sin(2 pi j SIG_FREQUENCY / w)`` in column j, the same in every row."""
    j = torch.arange(w, dtype=torch.float64)
    row = SIG_DELTA * torch.sin(2 * math.pi * j * SIG_FREQUENCY / w)
    return row.expand(h, w).reshape(1, 1, h, w).float()


def wanet_control_points() -> Tensor:
    """The seeded (1, 2, k, k) displacement field on the control grid, scaled to mean |value| = 1 (channel 0: x)."""
    g = torch.Generator().manual_seed(WANET_SEED)
    ins = torch.rand(1, 2, WANET_GRID, WANET_GRID, generator=g, dtype=torch.float64) * 2 - 1
    return ins / ins.abs().mean()


def identity_grid(h: int, w: int) -> Tensor:
    """The (1, h, w, 2) sampling grid of ``grid_sample`` (align_corners=True) that returns the image unchanged."""
    ys = torch.linspace(-1, 1, h, dtype=torch.float64)
    xs = torch.linspace(-1, 1, w, dtype=torch.float64)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1)[None]


def wanet_grid(h: int, w: int) -> Tensor:
    """WaNet's fixed warp as a (1, h, w, 2) float64 ``grid_sample`` grid (module docstring)."""
    noise = F.interpolate(wanet_control_points(), size=(h, w), mode="bicubic", align_corners=True)
    scale = torch.tensor([w, h], dtype=torch.float64)  # x displacement in units of the width, y of the height
    return (identity_grid(h, w) + WANET_STRENGTH * noise.permute(0, 2, 3, 1) / scale).clamp(-1, 1)


def warp(images: Tensor, grid: Tensor) -> Tensor:
    """``images`` resampled at ``grid`` ((1 or B, H, W, 2), bilinear, align_corners=True)."""
    grid = grid.to(device=images.device, dtype=images.dtype).expand(len(images), -1, -1, -1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


@lru_cache(maxsize=16)
def _cached(kind: str, h: int, w: int, device: str, dtype: torch.dtype) -> Tensor:
    return {"sig": sig_signal, "wanet": wanet_grid}[kind](h, w).to(device=device, dtype=dtype)


def _sig(images: Tensor) -> Tensor:
    _, _, h, w = images.shape
    return (images + _cached("sig", h, w, str(images.device), images.dtype)).clamp(0, 1)


def _wanet(images: Tensor) -> Tensor:
    _, _, h, w = images.shape
    return warp(images, _cached("wanet", h, w, str(images.device), images.dtype))


# name -> patch builder (channels, h, w) -> (mask (1, 1, h, w), value (1, C, h, w))
_PATCHES: dict[str, Callable[[int, int, int], tuple[Tensor, Tensor]]] = {
    **{name: _stamp_patch(stamp) for name, stamp in STAMPS.items()},
    "fixrandom8x8": _fixrandom,
    "white8x8_whitesquareborder": _white_square_border,
    **{f"white8x8_{shape}": _white_shape(shape) for shape in ("square", "circle", "triangle", "cross")},
    "badnets": _stamp_patch(BADNETS),
    "blended": _blended,
}


@lru_cache(maxsize=64)
def patch_tensors(name: str, channels: int, h: int, w: int, device: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Cached full-size (mask, value) for a patch trigger on ``device``; tensors are shared, do not modify."""
    m, v = _PATCHES[name](channels, h, w)
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
    "sig": _sig,
    "wanet": _wanet,
}


def trigger_fn(name: str) -> Callable[[Tensor], Tensor]:
    try:
        return TRIGGERS[name]
    except KeyError:
        raise UserError(f"unknown trigger '{name}'; known: {', '.join(TRIGGERS)}") from None


# Triggers that change (or may change) every pixel: their mask is the whole image (module docstring, trigger_mask).
FULL_IMAGE = ("blended", "sig", "wanet", "inverted")


def trigger_mask(name: str, height: int, width: int) -> Tensor:
    """The pixels trigger ``name`` changes on a ``height``×``width`` image: a bool (height, width) tensor, CPU.

    Patch triggers: exactly their stamp's pixels (``whitesquareborder``: the 16 pixels of rows/cols 27..30 on
    32×32, frame included; ``badnets``: rows/cols 28..30; ``fixrandom8x8`` and ``white8x8_*`` their whole or shaped
    8×8 box). Full-image triggers (:data:`FULL_IMAGE`: ``blended``, ``sig``, ``wanet``, ``inverted``): all True -
    they act on every pixel, so an IoU against them only measures a region's size. ``original``: all False.

    For evaluating localisation only (IoU); a detector never sees it (the defender does not know the trigger).
    """
    trigger_fn(name)  # unknown name -> UserError
    if name in FULL_IMAGE:
        return torch.ones(height, width, dtype=torch.bool)
    if name == "original":
        return torch.zeros(height, width, dtype=torch.bool)
    mask, _ = _PATCHES[name](3, height, width)
    return mask[0, 0] > 0


def apply_trigger(name: str, images: Tensor) -> Tensor:
    """Apply trigger ``name`` to a batch (B, C, H, W) in [0, 1]; a new tensor (except ``original``)."""
    fn = trigger_fn(name)
    if images.dim() != 4 or not images.is_floating_point():
        raise UserError(f"triggers take a float batch (B, C, H, W) in [0, 1]; got {images.dtype} "
                        f"of shape {tuple(images.shape)}")
    return fn(images)
