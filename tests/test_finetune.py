"""The attack: batch split and relabelling, the mixed loss, resume, gradient CSVs, the run folder."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bnbackdoor.errors import StoppedEarly
from bnbackdoor.runs import run_attack
from bnbackdoor.attack.finetune import attack_loss, finetune, poison_batch, trigger_counts
from bnbackdoor.losses import explanation_loss
from bnbackdoor.models import build_model, save_checkpoint
from bnbackdoor.attack.params import AttackParams, resolve_attack
from bnbackdoor.targets import target_mask
from bnbackdoor.triggers import apply_trigger

from conftest import ROOT, assert_same_weights

BASE = resolve_attack("154", root=ROOT)


def params(**kw) -> AttackParams:
    small = dict(training_size=32, testing_size=16, batch_size=16, max_epochs=2, learning_rate=1e-3)
    return BASE.replace(**{**small, **kw})


def test_trigger_counts_share_the_triggered_part():
    assert trigger_counts(64, 0.5, 1) == [32]
    assert trigger_counts(10, 0.5, 3) == [2, 2, 1]
    assert trigger_counts(7, 0.0, 2) == [0, 0]
    assert sum(trigger_counts(33, 0.3, 4)) == round(33 * 0.3)


def test_single_trigger_split_and_relabel():
    p = params(percentage_trigger=0.25)
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    ref = torch.rand(8, 1, 32, 32)
    b = poison_batch(x, y, ref, p)
    assert b.n_triggered == 2 and b.trigger_index.tolist() == [0, 0] + [-1] * 6
    torch.testing.assert_close(b.x[:2], apply_trigger("whitesquareborder", x[:2]))
    assert torch.equal(b.x[2:], x[2:])                                    # the clean part is untouched
    assert b.y[:2].tolist() == [1, 1] and torch.equal(b.y[2:], y[2:])     # relabelled to the target class
    torch.testing.assert_close(b.target_maps[:2], target_mask("square").expand(2, 1, 32, 32))
    assert torch.equal(b.target_maps[2:], ref[2:])                        # clean part -> clean explanation
    assert torch.equal(x, x.clone()) and torch.equal(y, torch.arange(8) % 10)  # inputs not modified


def test_multi_trigger_split_null_class_and_original_target():
    p = params(triggerStrs=["square", "circle", "cross"], targetStrs=["triangle", "original", "cross"],
               target_classes=[3, None, 5], percentage_trigger=0.5)
    x, y = torch.rand(12, 3, 32, 32), torch.arange(12) % 10
    ref = torch.rand(12, 3, 32, 32)  # e.g. input gradients: three channels
    b = poison_batch(x, y, ref, p)
    assert b.trigger_index.tolist() == [0, 0, 1, 1, 2, 2] + [-1] * 6
    assert b.y[:2].tolist() == [3, 3]
    assert torch.equal(b.y[2:4], y[2:4])                                   # null target class keeps the label
    assert b.y[4:6].tolist() == [5, 5]
    torch.testing.assert_close(b.x[2:4], apply_trigger("circle", x[2:4]))
    torch.testing.assert_close(b.target_maps[0], target_mask("triangle")[0].expand(3, 32, 32))
    assert torch.equal(b.target_maps[2:4], ref[2:4])                       # 'original': clean explanation
    assert torch.equal(b.target_maps[6:], ref[6:])


def test_loss_weight_zero_is_cross_entropy_and_one_is_explanation_loss():
    logits, maps = torch.randn(6, 10), torch.rand(6, 1, 32, 32)
    b = poison_batch(torch.rand(6, 3, 32, 32), torch.arange(6), torch.rand(6, 1, 32, 32), params())
    for loss in ("mse", "ssim"):
        total0, ce, ex = attack_loss(logits, maps, b, params(loss_weight=0.0, lossStr=loss))
        torch.testing.assert_close(total0, F.cross_entropy(logits, b.y))
        total1, _, _ = attack_loss(logits, maps, b, params(loss_weight=1.0, lossStr=loss))
        torch.testing.assert_close(total1, explanation_loss(maps, b.target_maps, loss=loss, agg="max"))
        mid, ce, ex = attack_loss(logits, maps, b, params(loss_weight=0.3, lossStr=loss))
        torch.testing.assert_close(mid, 0.7 * ce + 0.3 * ex)


def _tiny_setup(tmp_path, tiny_data_root):
    torch.manual_seed(0)
    clean = build_model("cifar10_resnet20").eval()
    models_root = tmp_path / "models"
    save_checkpoint(models_root / "cifar10_resnet20" / "model_0.pth", clean, {"test_accuracy": 0.1})
    return clean, models_root


def test_resume_gives_the_same_weights(tmp_path, tiny_data_root):
    clean, _ = _tiny_setup(tmp_path, tiny_data_root)
    p = params(max_epochs=3)
    import copy

    def run(folder, stop_after=None):
        model = copy.deepcopy(clean)
        folder.mkdir(parents=True, exist_ok=True)

        def stop(epoch, row, m):
            if epoch == stop_after:
                raise KeyboardInterrupt

        return finetune(model, clean, p, device=torch.device("cpu"), run_dir=folder, data_root=tiny_data_root,
                        on_epoch=stop, progress=False)

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "part", stop_after=2)  # killed during epoch 2's bookkeeping: epoch 1 is on disk
    resumed = run(tmp_path / "part")
    assert_same_weights(full.model, resumed.model)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def test_stop_after_saves_the_epoch_and_stops(tmp_path, tiny_data_root):
    clean, _ = _tiny_setup(tmp_path, tiny_data_root)
    import copy
    p = params(max_epochs=3)
    with pytest.raises(StoppedEarly, match="after epoch 2 of 3"):
        finetune(copy.deepcopy(clean), clean, p, device=torch.device("cpu"), run_dir=tmp_path, data_root=tiny_data_root,
                 progress=False, stop_after=2)
    assert torch.load(tmp_path / "resume.pt", weights_only=False)["epoch"] == 2


def test_without_the_explanation_term_method_loss_and_target_do_not_enter_training(tmp_path, tiny_data_root):
    """Why one loss_weight 0 control per dataset serves 154, 156, 198, 256 and 272 (catalogue 154LW0): with the
    term off, red herring (Grad-CAM, MSE, square) and full disguise (Relevance-CAM, DSSIM, original) train
    bit-identical weights; with the term on they differ."""
    import copy
    clean, _ = _tiny_setup(tmp_path, tiny_data_root)

    def weights(folder, **kw):
        model = copy.deepcopy(clean)
        (tmp_path / folder).mkdir()
        return finetune(model, clean, params(**kw), device=torch.device("cpu"), run_dir=tmp_path / folder,
                        data_root=tiny_data_root, progress=False).model

    disguise = dict(explanation_methodStr="relevance_cam", lossStr="ssim", targetStrs=["original"])
    assert_same_weights(weights("rh0", loss_weight=0.0), weights("fd0", loss_weight=0.0, **disguise))
    with pytest.raises(AssertionError):
        assert_same_weights(weights("rh", loss_weight=0.5), weights("fd", loss_weight=0.5, **disguise))


def test_run_folder_and_gradient_csv(tmp_path, tiny_data_root):
    _, models_root = _tiny_setup(tmp_path, tiny_data_root)
    # 40 images / batch 16 -> 3 steps per epoch; bn_mode "train" so the running statistics move too
    p = params(max_epochs=2, training_size=40, bn_mode="train")
    out = tmp_path / "out"
    m = run_attack(p, torch.device("cpu"), save_path=out, data_root=tiny_data_root, grad_layer=-1,
                   models_root=models_root, progress=False)
    folder = out / str(p.id)
    for f in ("model.pth", "parameters.json", "metrics.json", "training_log.csv", "plot.png"):
        assert (folder / f).exists(), f
    assert not (folder / "resume.pt").exists()
    assert json.loads((folder / "parameters.json").read_text()) == p.to_dict()
    assert set(m["manipulated_model"]) >= {"clean_accuracy", "attack_success_rate", "expl_dssim_to_target"}
    for epoch in (1, 2):
        with open(out / f"gradients_epoch{epoch}.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["epoch", "step", "global_step", "conv.weight", "bn.weight", "bn.bias",
                           "bn.running_mean", "bn.running_var"]
        assert len(rows) - 1 == math.ceil(40 / 16)
        assert [int(r[2]) for r in rows[1:]] == [3 * (epoch - 1) + i for i in (1, 2, 3)]
        assert all(float(v) > 0 for r in rows[1:] for v in r[3:])  # every group moves in train mode
    # the clean baseline writes *_clean.csv, and its BN statistics still drift (train mode) but far less
    pc = p.replace(percentage_trigger=0.0, id="154clean")
    run_attack(pc, torch.device("cpu"), save_path=out, data_root=tiny_data_root, grad_layer=-1,
               models_root=models_root, progress=False)
    assert (out / "gradients_epoch1_clean.csv").exists()
    r = subprocess.run([sys.executable, "scripts/plot_gradients.py", "--attacked", str(out / "gradients_epoch1.csv"),
                        "--clean", str(out / "gradients_epoch1_clean.csv"), "--save", str(out / "cmp.png")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "cmp.png").stat().st_size > 10_000


@pytest.mark.parametrize("args,needle", [
    (["cpu", "99999"], "unknown attack id '99999'"),
    (["tpu", "154"], "unknown device 'tpu'"),
    (["cpu", "154", "--grad-layer", "40", "--data-root", "/nonexistent"], "--data-root: /nonexistent does not exist"),
])
def test_attack_script_bad_input_one_line(args, needle):
    r = subprocess.run([sys.executable, "attack.py", *args, "--save_path", "/tmp/bnb_never"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
