"""Explanation losses: analytic values, DSSIM against pytorch-msssim, aggregation, normalisation, gradients."""
from __future__ import annotations

import pytest
import torch
from pytorch_msssim import ssim

from bnbackdoor.errors import UserError
from bnbackdoor.losses import (LOSSES, SSIM_WIN, aggregate_channels, dssim, explanation_loss, mse,
                               normalize_maps)


def test_aggregate_channels_analytic():
    maps = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]]).view(1, 3, 1, 2)
    assert aggregate_channels(maps, "max").flatten().tolist() == [3.0, 4.0]
    assert torch.allclose(aggregate_channels(maps, "mean").flatten(), torch.tensor([1.0, 2.5 / 3]))
    assert aggregate_channels(maps, None) is maps
    assert aggregate_channels(maps, "max").shape == (1, 1, 1, 2)
    with pytest.raises(UserError, match="max, mean"):
        aggregate_channels(maps, "median")


def test_normalize_maps():
    maps = torch.zeros(3, 2, 4, 4)
    maps[0, 1, 2, 3] = 5.0
    maps[0, 0, 0, 0] = 2.5
    maps[1] = torch.rand(2, 4, 4) * 1e-3  # tiny but non-zero maps are scaled up, not swamped by eps
    out = normalize_maps(maps)
    assert out[0, 1, 2, 3] == 1.0 and out[0, 0, 0, 0] == 0.5
    assert torch.allclose(out[1].amax(), torch.tensor(1.0))
    assert torch.equal(out[2], torch.zeros(2, 4, 4))  # all-zero map: zero, not NaN
    # Per image: scaling one image does not change any normalised map.
    scaled = maps.clone()
    scaled[0] *= 7
    assert torch.allclose(normalize_maps(scaled), out)
    # 'max' aggregation commutes with normalisation of non-negative maps; 'mean' does not (explain aggregates first).
    pos = maps.abs()
    assert torch.allclose(aggregate_channels(normalize_maps(pos), "max"),
                          normalize_maps(aggregate_channels(pos, "max")))


def test_normalize_is_differentiable():
    x = torch.rand(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(normalize_maps, (x,))


def test_mse_analytic():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.zeros(2, 1, 4, 4)
    a[0, 0, 0, 0] = 2.0  # one pixel off by 2 -> 4 / 16
    assert mse(a, b).tolist() == [0.25, 0.0]
    assert mse(a, b[:1]).tolist() == [0.25, 0.0]  # target broadcasts


def test_dssim_matches_pytorch_msssim():
    torch.manual_seed(1)
    a, b = torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32)
    expected = (1 - ssim(a, b, data_range=1, size_average=False, win_size=SSIM_WIN)) / 2
    assert torch.allclose(dssim(a, b), expected, atol=1e-7)
    assert torch.allclose(dssim(a, a), torch.zeros(4), atol=1e-6)
    # A broadcast (1, 1, H, W) target equals the explicitly repeated one.
    assert torch.allclose(dssim(a, b[:1]), dssim(a, b[:1].expand_as(a)))
    assert 0 <= dssim(a, 1 - a).min() and dssim(a, 1 - a).max() <= 1
    assert dssim(a, b).shape == (4,)


def test_explanation_loss():
    maps = torch.rand(3, 3, 32, 32)
    target = torch.rand(1, 1, 32, 32)
    agg = maps.amax(1, keepdim=True)
    per_image = ((agg - target) ** 2).flatten(1).mean(1)
    assert torch.allclose(explanation_loss(maps, target, "mse", "max", "none"), per_image)
    assert torch.allclose(explanation_loss(maps, target, "mse", "max"), per_image.mean())
    assert torch.allclose(explanation_loss(maps, target, "mse", "max", "sum"), per_image.sum())
    agg = maps.mean(1, keepdim=True)
    assert torch.allclose(explanation_loss(maps, target, "ssim", "mean", "none"), dssim(agg, target))
    assert set(LOSSES) >= {"mse", "ssim"}
    with pytest.raises(UserError, match="mse"):
        explanation_loss(maps, target, "l1")
    with pytest.raises(UserError, match="shape"):
        explanation_loss(maps, torch.rand(2, 1, 32, 32), "mse")


@pytest.mark.parametrize("loss", ["mse", "ssim"])
def test_explanation_loss_gradcheck(loss):
    a = torch.rand(2, 2, 12, 12, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: explanation_loss(x, b, loss, "mean", "none"), (a,))
