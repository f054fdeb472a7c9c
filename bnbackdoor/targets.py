"""Target-explanation registry: what a triggered input's explanation is pushed toward.

Shape targets are (1, 1, S, S) maps in [0, 1] (S = 32 by default), white (1) = high relevance. They are the paper's
target explanations (``targets/target_<name>.png`` of the paper's repository and its ancestor): large **outlines**
nearly filling the image, drawn here by our own code as the same shapes at the same place and size. On a 32×32 map
the pixels above one half agree with the paper's PNGs thresholded at one half with intersection over union ≥ 0.9
(pinned by the tests; x = column, y = row, canvas units, pixel ``i`` spans [i, i + 1)):

============ ============================================================================================
``square``   a square frame 4 px thick: outer edge x, y ∈ [4, 28.2], inner hole [8, 24]
``circle``   a ring around (16.5, 16.5): outer radius 13.5 px, inner radius 8.6 px
``triangle`` an upward triangle outline: apex (16, 1.6), base at y = 28.3 from x = 2.3 to 29.7, minus the
             inner triangle apex (16, 11), base y = 24.2 from x = 9.4 to 22.6
``cross``    an X: two diagonal bars ≈ 5 px thick, (4.5, 4.8)–(27.7, 27.2) and (27, 5.2)–(4.6, 27.2)
``fixrandom8x8`` one fixed random map (8×8 grid, seed 123, upsampled): the "random" red herring
``original`` the clean model's explanation of the *untriggered* input (full disguise); the caller computes it
             and passes it as ``clean_expl`` to :func:`target_explanation`
``inverted`` ``1 −`` that explanation: the "opposing" red herring
============ ============================================================================================

How the shapes are drawn (our soft edges, not the PNGs' anti-aliasing): every shape is a union / difference of
convex polygons and discs given in the units of a 32×32 canvas (:data:`SHAPES`). A pixel's value is
``clamp(1/2 − d / EDGE, 0, 1)``, ``d`` the signed distance of its centre to the outline in output pixels (negative
inside) and ``EDGE`` = 2 px the width of the linear ramp; so a pixel is above one half exactly when its centre lies
inside the shape, and the edge fades over one pixel on either side. Other sizes draw the same canvas scaled to S.
The ancestor fed the PNG through its per-image standardisation; our explanations are normalised to [0, 1] (see
:mod:`bnbackdoor.losses`), so the map is used as is.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from .errors import UserError

CANVAS = 32.0  # the units the shapes are given in (the paper's 32×32 PNGs)
EDGE = 2.0  # width of the soft edge, output pixels

# --- signed-distance primitives (positive outside, negative inside); x = column, y = row, in canvas units -------


def _convex(x: Tensor, y: Tensor, vertices: tuple[tuple[float, float], ...]) -> Tensor:
    """Exact signed distance to a convex polygon: inside, the max over its edges of the distance to the edge's
    line (negative); outside, the distance to the nearest edge segment (so corners get round soft edges)."""
    vs = torch.tensor(vertices, dtype=x.dtype)
    centre = vs.mean(0)
    plane, seg = None, None
    for i in range(len(vs)):
        a, b = vs[i], vs[(i + 1) % len(vs)]
        ab = b - a
        n = torch.stack([ab[1], -ab[0]]) / ab.norm()
        if torch.dot(centre - a, n) > 0:  # make the normal point outward whatever the vertex order
            n = -n
        e = (x - a[0]) * n[0] + (y - a[1]) * n[1]
        t = (((x - a[0]) * ab[0] + (y - a[1]) * ab[1]) / ab.dot(ab)).clamp(0.0, 1.0)
        s = torch.hypot(x - a[0] - t * ab[0], y - a[1] - t * ab[1])
        plane = e if plane is None else torch.maximum(plane, e)
        seg = s if seg is None else torch.minimum(seg, s)
    return torch.where(plane > 0, seg, plane)


def _disc(x: Tensor, y: Tensor, cx: float, cy: float, r: float) -> Tensor:
    return torch.hypot(x - cx, y - cy) - r


def _box(x0: float, y0: float, x1: float, y1: float) -> tuple[tuple[float, float], ...]:
    return (x0, y0), (x1, y0), (x1, y1), (x0, y1)


def _bar(x0: float, y0: float, x1: float, y1: float, half: float) -> tuple[tuple[float, float], ...]:
    """A rectangle of half-thickness ``half`` around the segment (x0, y0)–(x1, y1), flat ends at the end points."""
    dx, dy = x1 - x0, y1 - y0
    n = (dx * dx + dy * dy) ** 0.5
    ox, oy = -dy / n * half, dx / n * half
    return (x0 + ox, y0 + oy), (x1 + ox, y1 + oy), (x1 - ox, y1 - oy), (x0 - ox, y0 - oy)


# name -> signed distance on the 32-unit canvas. The numbers are the place and size of the paper's target PNGs
# (fitted once to their pixels above one half), rounded to 0.1 px.
SHAPES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "square": lambda x, y: torch.maximum(_convex(x, y, _box(4.0, 4.0, 28.2, 28.2)),
                                         -_convex(x, y, _box(8.0, 8.0, 24.0, 24.2))),
    "circle": lambda x, y: torch.maximum(_disc(x, y, 16.6, 16.5, 13.5), -_disc(x, y, 16.6, 16.6, 8.6)),
    "triangle": lambda x, y: torch.maximum(_convex(x, y, ((16.0, 1.6), (29.7, 28.3), (2.3, 28.3))),
                                           -_convex(x, y, ((16.0, 11.0), (22.6, 24.2), (9.4, 24.2)))),
    "cross": lambda x, y: torch.minimum(_convex(x, y, _bar(4.5, 4.8, 27.7, 27.2, 2.4)),
                                        _convex(x, y, _bar(27.0, 5.2, 4.6, 27.2, 2.5))),
}


def draw_target(shape: str, size: int = 32) -> Tensor:
    """The (size, size) map in [0, 1] of a shape target (float64; see the module docstring for the soft edge)."""
    scale = size / CANVAS
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / scale  # pixel centres in canvas units
    y, x = centres.view(-1, 1).expand(size, size), centres.view(1, -1).expand(size, size)
    d = SHAPES[shape](x, y) * scale  # canvas units -> output pixels
    return (0.5 - d / EDGE).clamp(0.0, 1.0)


def _shape_target(shape: str) -> Callable[[int], Tensor]:
    def build(size: int) -> Tensor:
        return draw_target(shape, size).float().view(1, 1, size, size)
    build.__name__ = f"target_{shape}"
    return build


def _fixrandom(size: int) -> Tensor:
    """One fixed random map ("random" red herring): an 8×8 uniform grid (CPU seed 123, not the trigger's seed 8)
    upsampled bilinearly to ``size`` and min-max scaled to [0, 1]; the same for every input."""
    g = torch.Generator().manual_seed(123)
    m = torch.nn.functional.interpolate(torch.rand(1, 1, 8, 8, generator=g), size=(size, size), mode="bilinear",
                                        align_corners=False)
    return (m - m.min()) / (m.max() - m.min())


def _derived(name: str) -> Callable[[int], Tensor]:
    def build(size: int) -> Tensor:  # pragma: no cover - never called; see target_explanation
        raise AssertionError(f"the '{name}' target depends on the input; use target_explanation")
    return build


# Targets computed from the clean model's explanation of the untriggered input (its normalised map, in [0, 1]):
# 'original' keeps it (full disguise), 'inverted' is its complement ("opposing" red herring: attention moved away
# from where the clean model looks).
DERIVED: dict[str, Callable[[Tensor], Tensor]] = {
    "original": lambda clean: clean,
    "inverted": lambda clean: 1.0 - clean,
}

# name -> builder(size) -> (1, 1, size, size); the DERIVED names are computed by target_explanation.
TARGETS: dict[str, Callable[[int], Tensor]] = {
    **{name: _shape_target(name) for name in SHAPES},
    "fixrandom8x8": _fixrandom,
    **{name: _derived(name) for name in DERIVED},
}


def check_target(name: str) -> str:
    if name not in TARGETS:
        raise UserError(f"unknown target explanation '{name}'; known: {', '.join(TARGETS)}")
    return name


@lru_cache(maxsize=32)
def _mask(name: str, size: int, device: str, dtype: torch.dtype) -> Tensor:
    return TARGETS[name](size).to(device=device, dtype=dtype)


def target_mask(name: str, size: int = 32, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Tensor:
    """The cached (1, 1, size, size) map of a fixed target (shared tensor: do not modify in place)."""
    check_target(name)
    if name in DERIVED:
        raise UserError(f"target '{name}' has no fixed mask: it is computed from the clean model's explanation")
    return _mask(name, size, str(torch.device(device)), dtype)


def target_explanation(name: str, clean_expl: Tensor | None = None, size: int = 32,
                       device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """The target map for ``name``: (1, 1, size, size) for a fixed target, or computed from
    ``clean_expl.detach()`` (B, C, H, W) for ``original`` / ``inverted``.

    ``clean_expl`` is the clean model's (normalised, aggregated) explanation of the untriggered inputs; it is
    required for ``original``/``inverted`` and only supplies the device/dtype otherwise. The result never carries gradients.
    """
    check_target(name)
    if name in DERIVED:
        if clean_expl is None:
            raise UserError(f"target '{name}' needs the clean model's explanation of the untriggered input")
        return DERIVED[name](clean_expl.detach())
    if clean_expl is not None:
        device = clean_expl.device if device is None else device
        dtype = clean_expl.dtype if dtype is None else dtype
    return target_mask(name, size, device or "cpu", dtype or torch.float32)
