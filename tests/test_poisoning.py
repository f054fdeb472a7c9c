"""Classic data poisoning trained from scratch: the four triggers' exact definitions, the poisoned training set, the
"scratch" regime's parameters, and a tiny from-scratch run (resume, BatchNorm statistics, run folder)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bnbackdoor.errors import StoppedEarly, UserError
from bnbackdoor.runs import run_attack
from bnbackdoor.metrics import reference_explanations
from bnbackdoor.models import build_model, load_model, save_checkpoint
from bnbackdoor.attack.params import resolve_attack
from bnbackdoor.poisoning import poison_training_set, to_uint8
from bnbackdoor.attack.scratch import fresh_model, train_poisoned
from bnbackdoor.triggers import (BLEND_ALPHA, BLEND_SEED, SIG_DELTA, SIG_FREQUENCY, WANET_STRENGTH, apply_trigger,
                                 identity_grid, wanet_control_points, wanet_grid, warp)

from conftest import ROOT, assert_same_weights


# ------------------------------------------------------------------------------------------------- triggers
def test_badnets_is_a_white_3x3_patch_one_pixel_from_the_bottom_right():
    x = torch.rand(2, 3, 32, 32)
    out = apply_trigger("badnets", x)
    changed = (out != x).any(1).any(0)
    assert {tuple(p) for p in changed.nonzero().tolist()} <= {(r, c) for r in range(28, 31) for c in range(28, 31)}
    assert torch.equal(out[:, :, 28:31, 28:31], torch.ones(2, 3, 3, 3))
    keep = torch.ones(32, 32, dtype=torch.bool)
    keep[28:31, 28:31] = False
    assert torch.equal(out[:, :, keep], x[:, :, keep])


def test_blended_is_a_fixed_seeded_noise_picture_at_alpha_0_2():
    assert BLEND_ALPHA == 0.2
    x = torch.rand(3, 3, 32, 32)
    pattern = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(BLEND_SEED), dtype=torch.float64).float()
    expected = x * (1 - 0.2) + 0.2 * pattern
    assert torch.allclose(apply_trigger("blended", x), expected, atol=1e-6)
    # the same picture for every image: (out - 0.8 x) / 0.2 is the pattern itself
    assert torch.allclose((apply_trigger("blended", x) - 0.8 * x) / 0.2, pattern.expand(3, -1, -1, -1), atol=1e-5)


def test_sig_adds_a_horizontal_sinusoid_and_clips():
    assert (SIG_DELTA, SIG_FREQUENCY) == (20 / 255, 6)
    x = torch.full((1, 3, 4, 32), 0.5)
    out = apply_trigger("sig", x)
    for j in (0, 1, 5, 8, 31):
        v = 20 / 255 * math.sin(2 * math.pi * j * 6 / 32)
        assert torch.allclose(out[0, :, :, j], torch.full((3, 4), 0.5 + v), atol=1e-6), j
    assert torch.equal(out[0, :, 0], out[0, :, 3])  # the same in every row: a horizontal signal
    zeros = apply_trigger("sig", torch.zeros(1, 1, 1, 32))
    assert zeros.min() == 0 and math.isclose(zeros.max().item(), 20 / 255, rel_tol=1e-4)  # negatives clipped


def test_wanet_field_on_its_own_control_grid_is_the_scaled_noise():
    # On a 4x4 image the bicubic upsampling (align_corners) of the 4x4 control grid is the grid itself, so the
    # field is identity + s * noise / 4 exactly (clamped to [-1, 1]).
    ins = wanet_control_points()
    assert math.isclose(ins.abs().mean().item(), 1.0, rel_tol=1e-12)
    expected = (identity_grid(4, 4) + WANET_STRENGTH * ins.permute(0, 2, 3, 1) / 4).clamp(-1, 1)
    assert torch.allclose(wanet_grid(4, 4), expected, atol=1e-12)
    # on 32x32 every displacement stays below s * max|noise| pixels' worth (bicubic may overshoot a little)
    d = (wanet_grid(32, 32) - identity_grid(32, 32)).abs() * 31 / 2  # in pixels
    assert 0.05 < d.max().item() < WANET_STRENGTH * ins.abs().max().item() * 1.3 * 31 / 32


def _bilinear(img: np.ndarray, gx: float, gy: float) -> np.ndarray:
    """Independent oracle: sample (C, H, W) at normalised (gx, gy) with align_corners=True, zeros outside."""
    c, h, w = img.shape
    px, py = (gx + 1) / 2 * (w - 1), (gy + 1) / 2 * (h - 1)
    x0, y0 = math.floor(px), math.floor(py)
    out = np.zeros(c)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


def test_wanet_warp_matches_a_hand_written_bilinear_sampler():
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    grid = wanet_grid(4, 4)
    out = apply_trigger("wanet", x)
    for i in range(4):
        for j in range(4):
            gx, gy = grid[0, i, j].tolist()
            assert np.allclose(out[0, :, i, j].numpy(), _bilinear(x[0].numpy(), gx, gy), atol=1e-10)
    assert torch.allclose(warp(x, identity_grid(4, 4)), x, atol=1e-12)  # the identity grid changes nothing


# ---------------------------------------------------------------------------------------------- poisoned set
def _set(n: int = 200, classes: int = 10):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            torch.arange(n) % classes)


def test_dirty_label_poisoning_relabels_exactly_the_chosen_images():
    x, y = _set()
    s = poison_training_set(x, y, "badnets", target=0, rate=0.1, seed=3)
    assert len(s.poisoned) == 20 and len(s.noise) == 0
    assert (y[s.poisoned] != 0).all()                  # drawn outside the target class
    assert (s.y[s.poisoned] == 0).all()
    other = torch.ones(len(y), dtype=torch.bool)
    other[s.poisoned] = False
    assert torch.equal(s.y[other], y[other]) and torch.equal(s.x[other], x[other])
    assert torch.equal(s.x[s.poisoned], to_uint8(apply_trigger("badnets", x[s.poisoned].float() / 255)))
    again = poison_training_set(x, y, "badnets", target=0, rate=0.1, seed=3)
    assert torch.equal(again.poisoned, s.poisoned) and torch.equal(again.x, s.x)
    assert not torch.equal(poison_training_set(x, y, "badnets", 0, 0.1, seed=4).poisoned, s.poisoned)


def test_sig_is_clean_label_and_wanet_adds_twice_as_many_noise_images():
    x, y = _set()
    s = poison_training_set(x, y, "sig", target=0, rate=0.05, seed=0)
    assert len(s.poisoned) == 10 and (y[s.poisoned] == 0).all() and torch.equal(s.y, y)
    capped = poison_training_set(x, y, "sig", target=0, rate=0.5, seed=0)
    assert len(capped.poisoned) == 20                 # at most the whole target class (200 / 10)
    w = poison_training_set(x, y, "wanet", target=0, rate=0.1, seed=0)
    assert len(w.poisoned) == 20 and len(w.noise) == 40
    assert not set(w.noise.tolist()) & set(w.poisoned.tolist())
    assert torch.equal(w.y[w.noise], y[w.noise])      # noise images keep their labels
    assert not torch.equal(w.x[w.noise], x[w.noise])
    fixed = to_uint8(apply_trigger("wanet", x[w.noise].float() / 255))
    assert not torch.equal(w.x[w.noise], fixed)       # a perturbed warp, not the trigger itself


# ---------------------------------------------------------------------------------------------------- params
SCRATCH = resolve_attack("GTSRBR20-badnets-10", root=ROOT)


def test_scratch_parameters_are_checked():
    assert SCRATCH.regime == "scratch" and SCRATCH.bn_mode == "train" and SCRATCH.loss_weight == 0
    with pytest.raises(UserError, match="loss_weight.*0 when regime is 'scratch'"):
        SCRATCH.replace(loss_weight=0.5)
    with pytest.raises(UserError, match="bn_mode.*'train' when regime is 'scratch'"):
        SCRATCH.replace(bn_mode="eval")
    with pytest.raises(UserError, match="one target class"):
        SCRATCH.replace(target_classes=[None])
    old = resolve_attack("154", root=ROOT)
    assert old.regime == "finetune" and "regime" not in json.loads((ROOT / "manipulated_models/154/parameters.json")
                                                                  .read_text())


# ------------------------------------------------------------------------------------------ a tiny real run
def _tiny(tmp_path, tiny_data_root):
    p = SCRATCH.replace(dataset="cifar10", modeltype="cifar10_resnet20", training_size=64, testing_size=32,
                        batch_size=16, max_epochs=3, learning_rate=0.05, id="tinyscratch")
    clean = build_model("cifar10_resnet20").eval()
    models_root = tmp_path / "models"
    save_checkpoint(models_root / "cifar10_resnet20" / "model_0.pth", clean, {"test_accuracy": 0.1})
    return p, clean, models_root


def test_from_scratch_run_resumes_bit_identically_and_learns_bn_statistics(tmp_path, tiny_data_root):
    p, clean, _ = _tiny(tmp_path, tiny_data_root)
    from bnbackdoor.data import load_split
    test = load_split("cifar10", "test", size=32, data_root=tiny_data_root)
    ref = reference_explanations(clean, test[0], p.explanation_methodStr, progress=False, with_predictions=True)

    class Stop(Exception):
        pass

    def run(folder, stop_at=None):
        folder.mkdir(parents=True, exist_ok=True)

        def csv(epoch):
            if epoch == stop_at:
                raise Stop  # during epoch 2's bookkeeping: epoch 1's state is on disk
            return folder / f"g{epoch}.csv"

        return train_poisoned(clean, p, device=torch.device("cpu"), run_dir=folder, data_root=tiny_data_root,
                              grad_layer=-1, grad_csv=csv, test_data=test, test_ref=ref, progress=False)

    full = run(tmp_path / "full")
    with pytest.raises(Stop):
        run(tmp_path / "part", stop_at=2)
    resumed = run(tmp_path / "part")
    assert_same_weights(full.model, resumed.model)
    init = fresh_model(p, 0).state_dict()
    stats = [k for k in init if k.endswith("running_mean") or k.endswith("running_var")]
    assert stats and all(not torch.equal(init[k], full.model.state_dict()[k]) for k in stats)
    last = full.history[-1]
    assert last["poisoned_images"] == round(0.1 * 64) and 0 <= last["attack_success_rate"] <= 1
    rows = (tmp_path / "full" / "g3.csv").read_text().splitlines()
    assert len(rows) == 1 + math.ceil(64 / 16) and "bn.running_mean" in rows[0]


def test_from_scratch_run_folder(tmp_path, tiny_data_root):
    p, _, models_root = _tiny(tmp_path, tiny_data_root)
    p = p.replace(max_epochs=1)
    out = tmp_path / "out"
    m = run_attack(p, torch.device("cpu"), save_path=out, data_root=tiny_data_root, models_root=models_root,
                   progress=False, defenses={})
    folder = out / "tinyscratch"
    assert {f.name for f in folder.iterdir()} >= {"model.pth", "parameters.json", "metrics.json",
                                                   "training_log.csv", "plot.png"}
    assert not (folder / "resume.pt").exists()
    assert m["parameters"]["regime"] == "scratch" and m["manipulated_model"]["poisoned_images"] == 6
    meta = torch.load(folder / "model.pth", weights_only=False)["meta"]
    assert meta["trained_from"].startswith("scratch") and meta["reference_model"] == "cifar10_resnet20/model_0"
    # the weights are not the clean model's: a fresh network was trained
    clean = torch.load(models_root / "cifar10_resnet20" / "model_0.pth", weights_only=False)["state_dict"]
    trained = torch.load(folder / "model.pth", weights_only=False)["state_dict"]
    weights = [k for k, v in clean.items() if v.is_floating_point() and v.dim() == 4]
    assert weights and all(not torch.equal(clean[k], trained[k]) for k in weights)


def test_stop_after_keeps_the_run_unfinished_with_the_whole_runs_schedule(tmp_path, tiny_data_root):
    """--stop-after 1: epoch 1's update captures and state, no model or metrics; the rerun without it ends with the
    weights of a run never stopped (the one-cycle schedule was the 3-epoch run's from the first step)."""
    p, _, models_root = _tiny(tmp_path, tiny_data_root)
    kw = dict(data_root=tiny_data_root, models_root=models_root, progress=False, defenses={}, grad_layer="all")
    with pytest.raises(StoppedEarly, match="stopped after epoch 1 of 3"):
        run_attack(p, torch.device("cpu"), save_path=tmp_path / "part", stop_after=1, **kw)
    folder = tmp_path / "part" / "tinyscratch"
    assert {f.name for f in folder.iterdir() if not f.name.startswith(".")} == {"parameters.json", "resume.pt"}
    assert sorted(f.name for f in (tmp_path / "part").glob("gradients_epoch*.csv")) == ["gradients_epoch1.csv"]
    with pytest.raises(StoppedEarly):  # already there: nothing more is trained
        run_attack(p, torch.device("cpu"), save_path=tmp_path / "part", stop_after=1, **kw)
    resumed = run_attack(p, torch.device("cpu"), save_path=tmp_path / "part", **kw)
    full = run_attack(p, torch.device("cpu"), save_path=tmp_path / "full", **kw)
    assert_same_weights(*(load_model(p.modeltype, path=d / "tinyscratch" / "model.pth")
                          for d in (tmp_path / "part", tmp_path / "full")))
    assert resumed["manipulated_model"] == full["manipulated_model"]
    assert (tmp_path / "part" / "gradients_epoch1.csv").read_text() == (tmp_path / "full" / "gradients_epoch1.csv").read_text()


def test_acceptance_of_a_model_trained_from_scratch():
    from bnbackdoor.report.acceptance import acceptance

    def verdict(acc, asr, untriggered=0.01):
        return acceptance({"parameters": SCRATCH.to_dict(),
                           "clean_model": {"clean_accuracy": 0.96, "expl_dssim_to_target": 0.05},
                           "manipulated_model": {"clean_accuracy": acc, "attack_success_rate": asr,
                                                 "expl_dssim_to_target": 0.4, "untriggered_target_rate": untriggered}})

    assert verdict(0.94, 0.95).accepted           # 2 points below, no explanation check
    assert verdict(0.9399, 0.95).failed == ["clean accuracy"]
    assert verdict(0.95, 0.89).failed == ["attack success"]
    assert verdict(0.95, 0.99, untriggered=0.3).failed == ["no collapse"]
