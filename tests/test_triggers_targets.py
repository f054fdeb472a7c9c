"""Triggers and targets: pixel-exact checks, determinism, batching, errors."""
from __future__ import annotations

import pytest
import torch

from bnbackdoor.errors import UserError
from bnbackdoor.targets import TARGETS, target_explanation, target_mask
from bnbackdoor.triggers import PATCH, TRIGGERS, apply_trigger, draw_shape

PATCH_TRIGGERS = ["whitesquareborder", "square", "circle", "triangle", "cross", "fixrandom8x8"]


@pytest.fixture
def images():
    # Mid-grey-ish random values in (0.1, 0.9): never exactly 0 or 1, so changed pixels are unambiguous.
    return 0.1 + 0.8 * torch.rand(5, 3, 32, 32)


def test_registry_names():
    assert set(TRIGGERS) == {"whitesquareborder", "square", "circle", "triangle", "cross", "original",
                             "inverted", "fixrandom8x8"}
    assert set(TARGETS) == {"square", "circle", "triangle", "cross", "fixrandom8x8", "original", "inverted"}


def test_original_and_inverted(images):
    assert apply_trigger("original", images) is images
    assert torch.equal(apply_trigger("inverted", images), 1 - images)


@pytest.mark.parametrize("name", PATCH_TRIGGERS)
def test_patch_only_changes_bottom_right_box(images, name):
    out = apply_trigger(name, images)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[-PATCH:, -PATCH:] = False
    assert torch.equal(out[..., outside], images[..., outside])
    changed = (out != images).any(dim=(0, 1))
    assert changed[-PATCH:, -PATCH:].any()


@pytest.mark.parametrize("name", ["square", "circle", "triangle", "cross"])
def test_white_shapes(images, name):
    out = apply_trigger(name, images)
    shape = draw_shape(name, PATCH).bool()
    box_out, box_in = out[..., -PATCH:, -PATCH:], images[..., -PATCH:, -PATCH:]
    assert torch.all(box_out[..., shape] == 1.0)
    assert torch.equal(box_out[..., ~shape], box_in[..., ~shape])


def test_shape_pixels():
    assert draw_shape("square", 8).sum() == 36  # 6×6, one-pixel margin
    assert torch.equal(draw_shape("cross", 8)[3], torch.ones(8)) and torch.equal(draw_shape("cross", 8)[:, 4],
                                                                                   torch.ones(8))
    assert draw_shape("cross", 8).sum() == 8 * 2 * 2 - 4
    tri = draw_shape("triangle", 8)
    assert tri[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0] and tri[-1].sum() == 8
    circle = draw_shape("circle", 8)
    assert circle[0, 0] == 0 and circle[3:5, :].sum() == 16


def test_whitesquareborder_pixels(images):
    box = apply_trigger("whitesquareborder", images)[..., -PATCH:, -PATCH:]
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
    assert x.grad[..., :-PATCH, :].eq(1).all() and x.grad[..., -PATCH:, -PATCH:].eq(0).all()


def test_unknown_trigger_lists_known(images):
    with pytest.raises(UserError, match="whitesquareborder"):
        apply_trigger("star", images)
    with pytest.raises(UserError, match="float"):
        apply_trigger("square", (images * 255).to(torch.uint8))
    with pytest.raises(UserError, match="batch"):
        apply_trigger("square", images[0])


def test_target_masks():
    sq = target_explanation("square")
    assert sq.shape == (1, 1, 32, 32) and sq.dtype == torch.float32
    assert sq[0, 0, 4:20, 4:20].eq(1).all() and sq.sum() == 256
    for name in ("circle", "triangle", "cross"):
        m = target_mask(name)
        assert m.shape == (1, 1, 32, 32) and set(m.unique().tolist()) == {0.0, 1.0}
        assert m[0, 0, 4:20, 4:20].sum() == m.sum()  # inside the documented box
        assert torch.equal(m[0, 0, 4:20, 4:20], draw_shape(name, 16))
    assert target_mask("cross")[0, 0, 10:14, 4:20].eq(1).all()
    assert target_explanation("circle", size=64).shape == (1, 1, 64, 64)


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


def test_derived_and_random_targets():
    from bnbackdoor.targets import target_explanation, target_mask
    clean = torch.rand(4, 1, 32, 32)
    torch.testing.assert_close(target_explanation("inverted", clean_expl=clean), 1 - clean)
    assert torch.equal(target_explanation("original", clean_expl=clean), clean)
    r = target_mask("fixrandom8x8")
    assert r.shape == (1, 1, 32, 32) and r.min() == 0 and r.max() == 1
    assert torch.equal(r, target_mask("fixrandom8x8").clone())  # fixed, not redrawn
    assert r.std() > 0.1 and not torch.equal(r[..., :16, :16], r[..., 16:, 16:])
