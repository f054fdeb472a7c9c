"""Evaluation scripts: clean / manipulated / manipulated + Re-BN numbers, the Re-BN sweep, explanation grids,
and the scripts' one-line errors. Tiny synthetic data and a temp root holding a 'stored' manipulated model."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bnbackdoor.data import clean_set, load_split
from bnbackdoor.defenses import DEFAULT_DEFENSES
from bnbackdoor.defenses.specs import parse_defenses
from bnbackdoor.evaluation.common import (ROW_CLEAN, ROW_MANIPULATED, ROW_REBN, defense_row, parse_sizes,
                                          rebn_batch_size)
from bnbackdoor.evaluation.defense_table import defense_metrics
from bnbackdoor.evaluation.explanations import generate_explanations
from bnbackdoor.evaluation.stored import evaluate_stored_model
from bnbackdoor.errors import UserError
from bnbackdoor.runs import load_run
from bnbackdoor.metrics import evaluate_attack
from bnbackdoor.models import build_model, save_checkpoint
from bnbackdoor.attack.params import resolve_attack
from bnbackdoor.defenses.rebn import bn_layers, rebn

from conftest import ROOT

KEYS = ("clean_accuracy", "fidelity", "attack_success_rate", "expl_mse_to_target", "expl_dssim_to_target",
        "expl_mse_to_clean", "expl_dssim_to_clean")


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """A root with models/cifar10_resnet20/model_0.pth, a stored manipulated_models/154 (the clean model with
    'poisoned' BN statistics and nudged weights) and the grid-only experimentsettings/272.json."""
    root = tmp_path_factory.mktemp("eval_root")
    torch.manual_seed(0)
    clean = build_model("cifar10_resnet20").eval()
    save_checkpoint(root / "models" / "cifar10_resnet20" / "model_0.pth", clean, {"test_accuracy": 0.1})
    bad = copy.deepcopy(clean)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in bn_layers(bad):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 3 + 0.2)
        bad.linear.weight.add_(0.05 * torch.randn(bad.linear.weight.shape, generator=g))
    folder = root / "manipulated_models" / "154"
    save_checkpoint(folder / "model.pth", bad, {"attack_id": 154})
    resolve_attack("154", root=ROOT).replace(testing_size=24, id="154").save(folder / "parameters.json")
    (root / "experimentsettings").mkdir()
    shutil.copy(ROOT / "experimentsettings" / "272.json", root / "experimentsettings" / "272.json")
    return root


def _found_in(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image of ``a``: is it pixel-for-pixel one of the images ``b``?"""
    return (a.flatten(1)[:, None] == b.flatten(1)[None]).all(-1).any(1)


def _close(a: dict, b: dict, keys=KEYS) -> None:
    for k in keys:
        if a[k] is None or b[k] is None:
            assert a[k] is b[k], k
        else:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_parse_sizes_and_rebn_batches():
    assert parse_sizes("512, 32,128,32") == [32, 128, 512]
    for bad in ("", "32,x", "0,5", "-3"):
        with pytest.raises(UserError, match="--sweep"):
            parse_sizes(bad)
    assert rebn_batch_size(5000, 100) == 100
    assert rebn_batch_size(512, 100) == 86          # 6 batches: 5 x 86 + 82
    assert rebn_batch_size(32, 100) == 32
    assert rebn_batch_size(48, 64) == 48


def test_calibration_comes_from_train_and_holds_no_test_image(run_root, tiny_data_root):
    params = resolve_attack("154", root=run_root)
    cal = clean_set(params.dataset, 40, seed=3, data_root=tiny_data_root)
    x_cal, info = cal.x, cal.record()
    assert info == {"split": "train", "requested": 40, "images": 40, "seed": 3, "excluded": 0}
    x_train, _ = load_split("cifar10", "train", data_root=tiny_data_root)
    x_test, _ = load_split("cifar10", "test", data_root=tiny_data_root)
    assert not _found_in(x_cal, x_test).any()       # no calibration image is a test image
    assert _found_in(x_cal, x_train).all()          # each one is a training image
    assert len(torch.unique(x_cal.flatten(1), dim=0)) == 40
    # exclude keeps other training data out of the calibration set
    cal = clean_set(params.dataset, 40, seed=3, data_root=tiny_data_root, exclude=torch.arange(50))
    x_ex, info = cal.x, cal.record()
    assert info["excluded"] == 50
    assert not _found_in(x_ex, x_train[:50]).any() and _found_in(x_ex, x_train[50:]).all()


def test_defense_rows_and_sweep_match_independent_recomputation(run_root, tiny_data_root, tmp_path, monkeypatch):
    # Spy on Re-BN: every image it is given must be a training image, never a test image.
    import bnbackdoor.defenses.rebn as rebn_module

    seen = []
    real_rebn = rebn_module.rebn

    def spy(model, data, **kw):
        if not isinstance(data, torch.Tensor):   # rebn+augment hands over a generator of augmented batches
            data = torch.cat(list(data))
        seen.append(data.clone())
        return real_rebn(model, data, **kw)

    monkeypatch.setattr(rebn_module, "rebn", spy)
    ev = defense_metrics("154", "cpu", datasize=20, batch_size=64, clean_images=48, sweep=[16, 48], root=run_root,
                         data_root=tiny_data_root, save_path=tmp_path, progress=False)
    rows = [ROW_CLEAN, ROW_MANIPULATED, *(defense_row(label) for label in DEFAULT_DEFENSES)]
    assert list(ev.rows) == rows and ROW_REBN == defense_row("rebn")
    x_test, _ = load_split("cifar10", "test", data_root=tiny_data_root)
    assert len(seen) == 4  # Re-BN, Re-BN augmented and one per sweep size
    for data in seen:
        assert not _found_in(data, x_test).any()

    # Independent recomputation: the same calibration set through rebn on a copy, evaluate_attack with another
    # batch size and without shared reference explanations.
    params, model, clean = load_run("154", "cpu", root=run_root, data_root=tiny_data_root)
    x, y = load_split(params.dataset, "test", size=20, seed=0, data_root=tiny_data_root)
    fixed = copy.deepcopy(model)
    report = rebn(fixed, clean_set(params.dataset, 48, seed=0, data_root=tiny_data_root).x, batch_size=48,
                  progress=False)
    assert report.images == 48 and ev.rebn.images == 48 and ev.calibration["split"] == "train"
    want = evaluate_attack(fixed, clean, params, x, y, batch_size=7, progress=False)
    _close(ev.rows[ROW_REBN], want)
    _close(ev.rows[ROW_MANIPULATED], evaluate_attack(model, clean, params, x, y, batch_size=7, progress=False))
    _close(ev.rows[ROW_CLEAN], evaluate_attack(clean, clean, params, x, y, batch_size=7, progress=False))
    assert ev.rows[ROW_CLEAN]["fidelity"] == 1.0 and ev.rows[ROW_CLEAN]["expl_mse_to_clean"] == 0.0
    assert ev.rows[ROW_REBN] != ev.rows[ROW_MANIPULATED]  # the poisoned statistics were replaced
    # the stored model is untouched by Re-BN (it ran on copies)
    stored = torch.load(run_root / "manipulated_models" / "154" / "model.pth", weights_only=True)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, stored[k]), k

    # the sweep's largest size is the single Re-BN result
    assert [r["size"] for r in ev.sweep] == [16, 48]
    _close(ev.sweep[-1], ev.rows[ROW_REBN])

    for suffix in ("_defense.json", "_defense.csv", "_defense.png", "_rebn_sweep.json", "_rebn_sweep.png"):
        assert (tmp_path / f"154{suffix}").stat().st_size > 0, suffix
    saved = json.loads((tmp_path / "154_defense.json").read_text())
    assert list(saved["rows"]) == rows
    assert saved["calibration"]["split"] == "train" and saved["test"] == {"split": "test", "images": 20, "seed": 0}
    assert saved["rebn"]["images"] == 48 and saved["rebn"]["layers"]
    csv_lines = (tmp_path / "154_defense.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,") and len(csv_lines) == 1 + len(rows)
    sweep = json.loads((tmp_path / "154_rebn_sweep.json").read_text())
    assert [r["calibration_images"] for r in sweep["sweep"]] == [16, 48]
    assert all(r["images"] == 20 for r in sweep["sweep"])  # test images
    assert "MSE to target" in ev.table() and "attack success" in ev.sweep_table()


def test_evaluate_stored_model(run_root, tiny_data_root, tmp_path):
    ev = evaluate_stored_model("154", "cpu", robust=True, clean_images=32, testing_size=12, batch_size=16,
                               root=run_root, data_root=tiny_data_root, save_path=tmp_path, progress=False)
    assert list(ev.rows) == [ROW_CLEAN, ROW_MANIPULATED, ROW_REBN]
    assert ev.test["images"] == 12 and ev.calibration["images"] == 32 and ev.calibration["batch_size"] == 16
    saved = json.loads((tmp_path / "154" / "evaluation_robust.json").read_text())
    assert saved["rebn"]["batches"] == 2 and len(saved["rebn"]["shifts"]) == len(saved["rebn"]["layers"]) > 0
    assert (tmp_path / "154" / "evaluation_robust.png").stat().st_size > 0
    assert "attack_success_rate" in ev.table(by="metric")

    plain = evaluate_stored_model("154", "cpu", testing_size=12, root=run_root, data_root=tiny_data_root,
                                  save_path=tmp_path, progress=False)
    assert list(plain.rows) == [ROW_CLEAN, ROW_MANIPULATED] and plain.rebn is None
    _close(plain.rows[ROW_MANIPULATED], ev.rows[ROW_MANIPULATED])
    assert json.loads((tmp_path / "154" / "evaluation.json").read_text())["rebn"] is None
    assert (tmp_path / "154" / "evaluation.png").exists()



def test_robust_and_defense_rebn_give_the_same_numbers(run_root, tiny_data_root, tmp_path):
    common = dict(clean_images=32, testing_size=12, batch_size=16, root=run_root, data_root=tiny_data_root,
                  progress=False)
    robust = evaluate_stored_model("154", "cpu", robust=True, save_path=tmp_path / "a", **common)
    named = evaluate_stored_model("154", "cpu", defenses=parse_defenses("rebn"),
                                  save_path=tmp_path / "b", **common)
    assert ROW_REBN in robust.rows and ROW_REBN in named.rows
    a, b = ({k: v for k, v in ev.rows[ROW_REBN].items() if k != "seconds"} for ev in (robust, named))
    assert a == b  # same calibration images, same numbers, bit for bit (only the timing differs)
    assert robust.rows[ROW_REBN]["attack_success_rate"] is not None

def test_generate_explanations_with_and_without_manipulated_model(run_root, tiny_data_root, tmp_path):
    rep = generate_explanations("154", "cpu", metric="ssim", batch_size=8, n_images=10, root=run_root,
                                data_root=tiny_data_root, save_path=tmp_path, progress=False)
    assert rep.notice is None and list(rep.rows) == [ROW_CLEAN, ROW_MANIPULATED]
    saved = json.loads((tmp_path / "154_explanations.json").read_text())
    assert saved["metric"] == "ssim" and saved["images"] == 10
    table = saved["table"][ROW_MANIPULATED]
    assert table["DSSIM: triggered vs target"] == rep.rows[ROW_MANIPULATED]["expl_dssim_to_target"]
    assert saved["table"][ROW_CLEAN]["DSSIM: clean vs clean model's expl."] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "154_explanations.png").stat().st_size > 0

    notices = []
    rep = generate_explanations("272", "cpu", metric="mse", batch_size=8, n_images=10, root=run_root,
                                data_root=tiny_data_root, save_path=tmp_path, progress=False,
                                on_notice=notices.append)
    assert len(notices) == 1 and "no manipulated model" in notices[0] and "\n" not in notices[0]
    assert list(rep.rows) == [ROW_CLEAN] and rep.params.explanation_methodStr == "relevance_cam"
    assert "MSE: triggered vs target" in rep.table()
    assert (tmp_path / "272_explanations.png").exists() and (tmp_path / "272_explanations.json").exists()


# ---------------------------------------------------------------------------------------------- the scripts
def _run(script: str, args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("BNBACKDOOR_DATA", None)
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("script,args", [
    ("evaluate_models.py", ["154", "cpu", "--robust"]),
    ("evaluate_attack_defense_metrics.py", ["154", "--device", "cpu", "--datasize", "10", "--batchsize", "10"]),
])
def test_script_without_stored_model(script, args, tmp_path):
    _one_line_error(_run(script, args, tmp_path), "no stored manipulated model", "154")


@pytest.mark.parametrize("script,args", [
    ("evaluate_models.py", ["154", "cpu", "--robust"]),
    ("evaluate_attack_defense_metrics.py", ["154", "--device", "cpu", "--datasize", "10", "--batchsize", "10"]),
    ("run_generate_explanations.py", ["272", "--metric", "mse", "--batchsize", "10", "--device", "cpu"]),
])
def test_script_without_data(script, args, run_root, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")   # a data root below a file: refused before any work, nothing created or downloaded
    r = _run(script, [*args, "--data-root", str(blocker / "data"), "--save_path", str(tmp_path / "out")], run_root)
    _one_line_error(r, "--data-root", "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


def test_explanations_script_unknown_id(tmp_path):
    _one_line_error(_run("run_generate_explanations.py", ["nosuchattack", "--device", "cpu"], tmp_path),
                    "unknown attack id")
