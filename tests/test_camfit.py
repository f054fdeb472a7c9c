"""The CAM-resolution floor (bnbackdoor/evaluation/cam_fit.py) on cases whose answer is known exactly."""
from __future__ import annotations

import json

import pytest
import torch

from bnbackdoor.evaluation.cam_fit import best_fit, cam_from_grid
from bnbackdoor.errors import UserError
from bnbackdoor.losses import dssim
from bnbackdoor.report.readme_blocks import cam_fit
from bnbackdoor.targets import target_mask


def test_a_map_made_from_an_8x8_grid_is_found_again():
    grid = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    target = cam_from_grid(grid, (32, 32))
    assert best_fit(target, 8, "mse", steps=300, restarts=1).loss < 1e-5  # from the pooled target
    # the same target is out of reach for a coarser grid
    assert best_fit(target, 2, "mse", steps=100, restarts=1).loss > 1e-3


def test_a_1x1_grid_can_only_be_all_ones_or_all_zeros():
    # normalised, a constant positive map is all ones and a non-positive one is all zeros: nothing else exists
    t = target_mask("square").double()
    exact = min(dssim(torch.ones_like(t), t).item(), dssim(torch.zeros_like(t), t).item())
    assert best_fit(t, 1, "ssim", steps=5).loss == pytest.approx(exact, abs=1e-9)


def test_at_full_resolution_every_fixed_target_is_reachable():
    for name in ("square", "cross"):
        assert best_fit(target_mask(name), 32, "mse", steps=300, restarts=1).loss < 1e-4


def test_an_8x8_grid_draws_the_triangle_far_better_than_a_4x4_one():
    # measured, not implied (an 8×8 grid reproduces an upsampled 4×4 one only approximately): the README table
    t = target_mask("triangle")
    assert best_fit(t, 8, steps=150, restarts=1).loss < best_fit(t, 4, steps=150, restarts=1).loss - 0.1


@pytest.mark.parametrize("resolution,shape,needle", [(0, (1, 1, 32, 32), "between 1"),
                                                     (33, (1, 1, 32, 32), "between 1"),
                                                     (8, (2, 1, 32, 32), "got shape")])
def test_bad_arguments_are_user_errors(resolution, shape, needle):
    with pytest.raises(UserError, match=needle):
        best_fit(torch.zeros(shape), resolution)


def test_readme_block_renders_the_stored_file_or_says_what_makes_it(tmp_path):
    assert "python scripts/cam_fit.py" in cam_fit(tmp_path)[0]
    (tmp_path / "results").mkdir()
    rows = [{"target": "square", "resolution": r, "loss": "ssim", "best": b} for r, b in ((4, 0.4041), (8, 0.0694))]
    (tmp_path / "results" / "cam_fit.json").write_text(json.dumps({"command": "python scripts/cam_fit.py",
                                                                   "steps": 600, "rows": rows}))
    text = "\n".join(cam_fit(tmp_path))
    assert "best DSSIM" in text and "| square   | 0.404     | 0.069     |" in text
