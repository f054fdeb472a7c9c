"""Target-explanation registry: what a triggered input's explanation is pushed toward.

Shape targets are (1, 1, S, S) masks in {0, 1} (S = 32 by default). The shape fills a box of side ``S // 2`` whose
top-left corner is at ``(S // 8, S // 8)``, i.e. rows/columns 4..19 of a 32×32 map: the **upper-left** part of the
image, away from the triggers in the bottom-right corner (a red herring points elsewhere than the trigger).

============ ============================================================================================
``square``   the whole 16×16 box (rows/cols 4..19), aligned to the 4-pixel cells of ResNet20's 8×8 Grad-CAM
``circle``   a disc of radius 8 px inscribed in the box
``triangle`` an upward triangle: apex at the box's top centre, base on its bottom row
``cross``    a plus sign spanning the box, arms 4 px thick
``fixrandom8x8`` one fixed random map (8×8 grid, seed 123, upsampled): the "random" red herring
``original`` the clean model's explanation of the *untriggered* input (full disguise); the caller computes it
             and passes it as ``clean_expl`` to :func:`target_explanation`
``inverted`` ``1 −`` that explanation: the "opposing" red herring
============ ============================================================================================

Masks are already in the range of normalised explanations ([0, 1], see :mod:`bnbackdoor.losses`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from .errors import UserError
from .triggers import draw_shape


def _shape_target(shape: str) -> Callable[[int], Tensor]:
    def build(size: int) -> Tensor:
        n, off = size // 2, size // 8
        patch = torch.ones(n, n) if shape == "square" else draw_shape(shape, n)
        out = torch.zeros(1, 1, size, size)
        out[0, 0, off:off + n, off:off + n] = patch
        return out
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
    "square": _shape_target("square"),
    "circle": _shape_target("circle"),
    "triangle": _shape_target("triangle"),
    "cross": _shape_target("cross"),
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
    """The cached (1, 1, size, size) mask of a shape target (shared tensor: do not modify in place)."""
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
