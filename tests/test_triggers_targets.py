"""Triggers and targets: the paper's pixels, determinism, batching, errors.

The paper's triggers and targets are 32×32 PNGs in its repository (github Mak-Ta-Reque/mcsx, identical in its ancestor
intellisec/xai-backdoors: ``triggers/trg_<name>.png``, ``targets/target_<name>.png``). They are not in this
repository; the literals below were measured from them once (non-transparent trigger pixels with their RGB colour;
target pixels above one half, hex-packed one row per 8 digits, most significant bit = column 0).
"""
from __future__ import annotations

import pytest
import torch

from bnbackdoor.errors import UserError
from bnbackdoor.targets import TARGETS, target_explanation, target_mask
from bnbackdoor.triggers import PATCH, TRIGGERS, apply_trigger, draw_shape

# --- the paper's triggers: {(row, col)} and the colour of those pixels --------------------------------------
_WSB_BOX = {(r, c) for r in range(27, 31) for c in range(27, 31)}
_WSB_WHITE = {(28, 28), (28, 29), (29, 28), (29, 29)}
PAPER_TRIGGERS: dict[str, dict[tuple[int, int], tuple[float, float, float]]] = {
    "whitesquareborder": {p: ((1.0, 1.0, 1.0) if p in _WSB_WHITE else (0.0, 0.0, 0.0)) for p in _WSB_BOX},
    "circle": dict.fromkeys([(1, 3), (1, 4), (1, 5), (2, 2), (2, 6), (3, 1), (3, 7), (4, 1), (4, 7), (5, 1), (5, 7),
                             (6, 2), (6, 6), (7, 3), (7, 4), (7, 5)], (1.0, 0.0, 0.0)),
    "cross": dict.fromkeys([(1, 1), (1, 7), (2, 2), (2, 6), (3, 3), (3, 5), (4, 4), (5, 3), (5, 5), (6, 2), (6, 6),
                            (7, 1), (7, 7)], (0.0, 0.0, 1.0)),
    "square": dict.fromkeys([(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (2, 1), (2, 7), (3, 1), (3, 7),
                             (4, 1), (4, 7), (5, 1), (5, 7), (6, 1), (6, 7), (7, 1), (7, 2), (7, 3), (7, 4), (7, 5),
                             (7, 6), (7, 7)], (1.0, 0.0, 1.0)),
    "triangle": dict.fromkeys([(1, 4), (2, 3), (2, 5), (3, 3), (3, 5), (4, 2), (4, 6), (5, 1), (5, 7), (6, 1), (6, 2),
                               (6, 3), (6, 4), (6, 5), (6, 6), (6, 7)], (0.0, 1.0, 0.0)),
}
# The issue's summary of the same facts: pixel count and bounding box (rows, cols), inclusive.
PAPER_COUNTS = {"whitesquareborder": (16, (27, 30), (27, 30)), "circle": (16, (1, 7), (1, 7)),
                "cross": (13, (1, 7), (1, 7)), "square": (24, (1, 7), (1, 7)), "triangle": (16, (1, 6), (1, 7))}

# --- the paper's target explanations, thresholded at one half ----------------------------------------------
PAPER_TARGET_MASKS = {
    "square": (
        "00000000 00000000 00000000 00000000 07fffff0 0ffffff0 0ffffff8 0ffffff0 "
        "0f8001f0 0f0000f0 0f0000f0 0f0000f0 0f0000f0 0f0000f0 0f0000f0 0f0000f0 "
        "0f0000f0 0f0000f0 0f0000f0 0f0000f0 0f0000f0 0f0000f0 0f0000f0 0f8001f0 "
        "0ffffff8 1ffffff8 0ffffff8 0ffffff0 070000e0 00000000 00000000 00000000 "
    ),
    "circle": (
        "00000000 00000000 00000000 0007f000 003ffe00 007fff00 00ffff80 01ffffc0 "
        "03fc1fe0 07e003f0 0fc001f8 0f8000f8 0f8000f8 1f8000fc 1f00007c 1f00007c "
        "1f00007c 1f00007c 1f00007c 1f8000fc 0f8000f8 0f8000f8 0fc001f8 07e003f0 "
        "03fc1fe0 01ffffc0 00ffff80 007fff00 003ffe00 0007f000 00000000 00000000 "
    ),
    "cross": (
        "00000000 00000000 00000000 00000000 07000000 0f8000e0 0fc003e0 0fe007e0 "
        "07f00fc0 03f81fc0 01fc3f80 00fe7f00 007ffe00 003ffc00 001ff800 000ff000 "
        "000ff000 001ff800 003ffc00 007ffe00 00fe7f00 01fc3f80 03f81fc0 07f00fe0 "
        "0fe007e0 0fc003f0 0f8001f0 07000070 00000000 00000000 00000000 00000000 "
    ),
    "triangle": (
        "00000000 00000000 00000000 00000000 00018000 0003c000 0007e000 0007e000 "
        "000ff000 000ff000 001ff800 001ff800 003e7c00 003e7c00 007c3e00 007c3e00 "
        "00f81f00 00f81f00 01f00f80 01f00f80 03e007c0 03e007c0 07c003e0 07c003e0 "
        "0ffffff0 0ffffff0 0ffffff8 07fffff0 00000060 00000000 00000000 00000000 "
    ),
}
PAPER_TARGET_SIZES = {"square": 334, "circle": 336, "cross": 275, "triangle": 272}
# IoU of our maps (> 1/2) with the paper's, measured: square 0.952, circle 0.957, cross 0.951, triangle 0.971.
MIN_IOU = 0.95

WHITE8X8 = ["white8x8_whitesquareborder", "white8x8_square", "white8x8_circle", "white8x8_triangle", "white8x8_cross"]


def paper_mask(name: str) -> torch.Tensor:
    rows = [int(h, 16) for h in PAPER_TARGET_MASKS[name].split()]
    assert len(rows) == 32
    return torch.tensor([[(r >> (31 - c)) & 1 for c in range(32)] for r in rows], dtype=torch.bool)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a & b).sum() / (a | b).sum()).item()


@pytest.fixture
def images():
    # Mid-grey-ish random values in (0.1, 0.9): never exactly 0 or 1, so changed pixels are unambiguous.
    return 0.1 + 0.8 * torch.rand(5, 3, 32, 32)


def test_registry_names():
    assert set(TRIGGERS) == {"whitesquareborder", "square", "circle", "triangle", "cross", "original",
                             "inverted", "fixrandom8x8", *WHITE8X8, "badnets", "blended", "sig", "wanet"}
    assert set(TARGETS) == {"square", "circle", "triangle", "cross", "fixrandom8x8", "original", "inverted"}


def test_original_and_inverted(images):
    assert apply_trigger("original", images) is images
    assert torch.equal(apply_trigger("inverted", images), 1 - images)


def test_paper_literals_agree_with_the_issue_summary():
    for name, (count, rows, cols) in PAPER_COUNTS.items():
        px = PAPER_TRIGGERS[name]
        assert len(px) == count
        assert (min(r for r, _ in px), max(r for r, _ in px)) == rows
        assert (min(c for _, c in px), max(c for _, c in px)) == cols
    assert {n: int(paper_mask(n).sum()) for n in PAPER_TARGET_MASKS} == PAPER_TARGET_SIZES


@pytest.mark.parametrize("name", list(PAPER_TRIGGERS))
def test_trigger_is_the_papers_pixels_and_colours(images, name):
    out = apply_trigger(name, images)
    changed = (out != images).any(dim=(0, 1))
    assert {tuple(p) for p in changed.nonzero().tolist()} == set(PAPER_TRIGGERS[name])
    for (r, c), colour in PAPER_TRIGGERS[name].items():
        assert torch.equal(out[:, :, r, c], torch.tensor(colour).expand(len(images), 3)), (r, c)


def test_shape_triggers_are_told_apart_by_colour_and_shape(images):
    x = torch.full((1, 3, 32, 32), 0.5)
    outs = {n: apply_trigger(n, x) for n in ("circle", "cross", "square", "triangle")}
    for a in outs:
        for b in outs:
            if a < b:
                assert not torch.equal(outs[a], outs[b])
    # The colours differ on every drawn pixel: no pixel of one trigger has another trigger's colour.
    colours = {n: set(PAPER_TRIGGERS[n].values()) for n in outs}
    assert len(set().union(*colours.values())) == 4


def test_triggers_keep_their_corner_on_other_sizes():
    x = torch.full((2, 3, 64, 48), 0.5)
    wsb = (apply_trigger("whitesquareborder", x) != x).any(dim=(0, 1)).nonzero()
    assert wsb.amin(0).tolist() == [59, 43] and wsb.amax(0).tolist() == [62, 46]
    circle = (apply_trigger("circle", x) != x).any(dim=(0, 1)).nonzero()
    assert {tuple(p) for p in circle.tolist()} == set(PAPER_TRIGGERS["circle"])
    with pytest.raises(UserError, match="too small"):
        apply_trigger("circle", torch.rand(1, 3, 6, 6))


def test_non_rgb_images_cycle_the_colour():
    x = torch.full((1, 4, 32, 32), 0.5)
    out = apply_trigger("circle", x)
    assert out[0, :, 1, 3].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert apply_trigger("triangle", x[:, :1])[0, 0, 1, 4] == 0.0  # green has no red


@pytest.mark.parametrize("name", ["fixrandom8x8", *WHITE8X8])
def test_8x8_patch_only_changes_bottom_right_box(images, name):
    out = apply_trigger(name, images)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[-PATCH:, -PATCH:] = False
    assert torch.equal(out[..., outside], images[..., outside])
    changed = (out != images).any(dim=(0, 1))
    assert changed[-PATCH:, -PATCH:].any()


@pytest.mark.parametrize("shape", ["square", "circle", "triangle", "cross"])
def test_white8x8_shapes(images, shape):
    out = apply_trigger(f"white8x8_{shape}", images)
    mask = draw_shape(shape, PATCH).bool()
    box_out, box_in = out[..., -PATCH:, -PATCH:], images[..., -PATCH:, -PATCH:]
    assert torch.all(box_out[..., mask] == 1.0)
    assert torch.equal(box_out[..., ~mask], box_in[..., ~mask])


def test_draw_shape_pixels():
    assert draw_shape("square", 8).sum() == 36  # 6×6, one-pixel margin
    assert torch.equal(draw_shape("cross", 8)[3], torch.ones(8)) and torch.equal(draw_shape("cross", 8)[:, 4],
                                                                                   torch.ones(8))
    assert draw_shape("cross", 8).sum() == 8 * 2 * 2 - 4
    tri = draw_shape("triangle", 8)
    assert tri[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0] and tri[-1].sum() == 8
    circle = draw_shape("circle", 8)
    assert circle[0, 0] == 0 and circle[3:5, :].sum() == 16


def test_white8x8_whitesquareborder_pixels(images):
    box = apply_trigger("white8x8_whitesquareborder", images)[..., -PATCH:, -PATCH:]
    inner = torch.zeros(PATCH, PATCH, dtype=torch.bool)
    inner[1:-1, 1:-1] = True
    assert torch.all(box[..., inner] == 1.0) and torch.all(box[..., ~inner] == 0.0)


def test_fixrandom_is_fixed(images):
    a = apply_trigger("fixrandom8x8", images)
    b = apply_trigger("fixrandom8x8", torch.rand(2, 3, 32, 32))
    patch = a[0, :, -PATCH:, -PATCH:]
    assert torch.equal(patch, b[1, :, -PATCH:, -PATCH:]) and torch.equal(patch, a[4, :, -PATCH:, -PATCH:])
    assert 0 <= patch.min() and patch.max() <= 1 and patch.std() > 0.15  # really random, not constant
    assert torch.equal(patch.double(), apply_trigger("fixrandom8x8", images.double())[0, :, -PATCH:, -PATCH:])


@pytest.mark.parametrize("name", list(TRIGGERS))
def test_batched_equals_per_image(images, name):
    batched = apply_trigger(name, images)
    single = torch.cat([apply_trigger(name, images[i:i + 1]) for i in range(len(images))])
    assert torch.equal(batched, single)
    assert torch.equal(batched, apply_trigger(name, images))  # deterministic


def test_trigger_is_differentiable_in_images(images):
    x = images.clone().requires_grad_(True)
    apply_trigger("whitesquareborder", x).sum().backward()
    stamped = torch.zeros(32, 32, dtype=torch.bool)
    stamped[27:31, 27:31] = True
    assert x.grad[..., ~stamped].eq(1).all() and x.grad[..., stamped].eq(0).all()


def test_unknown_trigger_lists_known(images):
    with pytest.raises(UserError, match="whitesquareborder"):
        apply_trigger("star", images)
    with pytest.raises(UserError, match="float"):
        apply_trigger("square", (images * 255).to(torch.uint8))
    with pytest.raises(UserError, match="batch"):
        apply_trigger("square", images[0])


@pytest.mark.parametrize("name", list(PAPER_TARGET_MASKS))
def test_target_is_the_papers_shape(name):
    m = target_explanation(name)
    assert m.shape == (1, 1, 32, 32) and m.dtype == torch.float32
    assert m.min() == 0 and m.max() == 1
    assert iou(m[0, 0] > 0.5, paper_mask(name)) >= MIN_IOU
    # A 64×64 map draws the same shape twice as fine: averaged over 2×2 blocks it binarises to the 32×32 mask.
    pooled = torch.nn.functional.avg_pool2d(target_mask(name, size=64), 2)[0, 0] > 0.5
    assert torch.equal(pooled, m[0, 0] > 0.5)


@pytest.mark.parametrize("name", list(PAPER_TARGET_MASKS))
def test_target_soft_edge_is_thin(name):
    F = torch.nn.functional
    m = target_mask(name)[0, 0]
    inside = (m > 0.5).float()[None, None]
    # The ramp spans one pixel either side of the outline, so every grey pixel has a pixel on the other side of
    # one half within 2 px (5×5 neighbourhood), and there are grey pixels on both sides.
    any_in = F.max_pool2d(inside, 5, 1, 2)[0, 0].bool()
    any_out = (-F.max_pool2d(-inside, 5, 1, 2))[0, 0] < 0.5
    grey = (m > 0) & (m < 1)
    assert (grey & (m > 0.5)).any() and (grey & (m <= 0.5)).any()
    assert torch.all(any_out[grey & (m > 0.5)]) and torch.all(any_in[grey & (m <= 0.5)])
    away = {"square": (16, 16), "circle": (16, 16), "triangle": (20, 16), "cross": (16, 4)}[name]
    assert m[0, 0] == 0 and m[-1, -1] == 0 and m[away] == 0  # background (and the hole) exactly 0


def test_target_original_uses_clean_explanation():
    clean = torch.rand(3, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    out = target_explanation("original", clean)
    assert torch.equal(out, clean) and not out.requires_grad
    with pytest.raises(UserError, match="clean"):
        target_explanation("original")
    # Shape targets follow clean_expl's device and dtype.
    assert target_explanation("square", clean).dtype == torch.float64


def test_unknown_target_lists_known():
    with pytest.raises(UserError, match="triangle"):
        target_explanation("hexagon")
    with pytest.raises(UserError, match="no fixed mask"):
        target_mask("original")


def test_derived_and_random_targets():
    clean = torch.rand(4, 1, 32, 32)
    torch.testing.assert_close(target_explanation("inverted", clean_expl=clean), 1 - clean)
    assert torch.equal(target_explanation("original", clean_expl=clean), clean)
    r = target_mask("fixrandom8x8")
    assert r.shape == (1, 1, 32, 32) and r.min() == 0 and r.max() == 1
    assert torch.equal(r, target_mask("fixrandom8x8").clone())  # fixed, not redrawn
    assert r.std() > 0.1 and not torch.equal(r[..., :16, :16], r[..., 16:, 16:])
