"""Where the backdoor lives: parameter groups, restore / only (exact identities), the ablation rows, the
whole-model gradient capture (--grad-layer all) and the update-share figure's numbers."""
from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from bnbackdoor.evaluation.anatomy import (check_partition, locate_backdoor, only, parameter_groups, relative_change,
                                restore)
from bnbackdoor.errors import UserError
from bnbackdoor.runs import run_name
from bnbackdoor.attack.gradlog import (ALL, GradLogger, fold_groups, model_blocks, parse_grad_layer, read_csv,
                                update_summary)
from bnbackdoor.metrics import evaluate_attack
from bnbackdoor.models import build_model, save_checkpoint
from bnbackdoor.attack.params import resolve_attack

from conftest import ROOT

BASE = resolve_attack("154", root=ROOT)

ARCHS = [("cifar10_resnet20", {}), ("cifar10_resnet20_nbn", {}), ("cifar10_vgg13", {}), ("cifar10_vgg13bn", {}),
         ("cifar10_mobilenetv3small", {}), ("gtsrb_resnet20", {}),
         ("cifar10_wideresnet28_10", {"depth": 10, "widen_factor": 1})]  # a tiny WRN: same structure


def perturbed(model: nn.Module, seed: int = 1) -> nn.Module:
    """A copy with every floating tensor (parameters and running statistics) changed, counters advanced."""
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for k, t in m.state_dict().items():
            if t.is_floating_point():
                t.add_(0.01 * torch.randn(t.shape, generator=g))
                if "running_var" in k:
                    t.abs_()  # a variance stays positive
            else:
                t.add_(7)
    return m


@pytest.mark.parametrize("modeltype,kw", ARCHS, ids=[a for a, _ in ARCHS])
def test_groups_partition_the_state_dict(modeltype, kw):
    model = build_model(modeltype, **kw)
    sd = model.state_dict()
    groups = parameter_groups(model)
    flat = [k for keys in groups.values() for k in keys]
    left_out = sorted(set(sd) - set(flat))
    assert not left_out, f"{modeltype}: keys in no group: {left_out}"
    assert len(flat) == len(set(flat)) == len(sd), f"{modeltype}: a key is in two groups"
    # BN tensors are exactly the BN groups; everything else is a stage or the head
    bn = {f"{n}.{a}" for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
          for a in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert set(groups.get("bn_stats", [])) | set(groups.get("bn_affine", [])) == bn
    assert all(k.rsplit(".", 1)[1] in ("weight", "bias") for k in groups.get("bn_affine", []))


def test_resnet20_groups_are_named_by_its_structure():
    model = build_model("cifar10_resnet20")
    groups = parameter_groups(model)
    assert list(groups) == ["bn_stats", "bn_affine", "conv:stem", "conv:layer1", "conv:layer2", "conv:layer3",
                            "classifier"]
    assert groups["conv:stem"] == ["conv1.weight"]
    assert groups["classifier"] == ["linear.weight", "linear.bias"]
    assert groups["conv:layer2"] == [f"layer2.{b}.conv{c}.weight" for b in range(3) for c in (1, 2)]
    assert len(groups["bn_stats"]) == 19 * 3 and len(groups["bn_affine"]) == 19 * 2
    nbn = parameter_groups(build_model("cifar10_resnet20_nbn"))
    assert list(nbn) == ["conv:stem", "conv:layer1", "conv:layer2", "conv:layer3", "classifier"]
    assert nbn["conv:stem"] == ["conv1.weight", "conv1.bias"]
    vgg = parameter_groups(build_model("cifar10_vgg13bn"))
    assert list(vgg)[2:] == [f"conv:features.block{i}" for i in range(1, 6)] + ["classifier"]


def test_check_partition_names_what_is_left_out_or_doubled():
    sd = build_model("cifar10_resnet20").state_dict()
    groups = parameter_groups(build_model("cifar10_resnet20"))
    broken = {g: [k for k in keys if k != "layer2.1.conv1.weight"] for g, keys in groups.items()}
    with pytest.raises(UserError, match=r"in no group: layer2\.1\.conv1\.weight"):
        check_partition(broken, sd)
    doubled = {**groups, "extra": ["linear.bias"]}
    with pytest.raises(UserError, match=r"in two groups: linear\.bias \(classifier, extra\)"):
        check_partition(doubled, sd)


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_restore_and_only_are_exact():
    clean = build_model("cifar10_resnet20").eval()
    manip = perturbed(clean)
    c_sd, m_sd = clean.state_dict(), manip.state_dict()
    c_copy = {k: v.clone() for k, v in c_sd.items()}
    m_copy = {k: v.clone() for k, v in m_sd.items()}
    groups = parameter_groups(manip)
    assert all(not torch.equal(c_sd[k], m_sd[k]) for k in c_sd)  # every tensor really differs
    # restoring every group, one after another, gives the clean model bit for bit
    sd = m_sd
    for keys in groups.values():
        sd = restore(sd, c_sd, keys)
    assert _equal(sd, c_sd)
    assert _equal(only(c_sd, m_sd, []), c_sd)                          # only(no group) = clean
    assert _equal(only(c_sd, m_sd, list(m_sd)), m_sd)                  # only(every group) = manipulated
    assert _equal(restore(m_sd, c_sd, []), m_sd)
    for g, keys in groups.items():  # restore G = only(everything but G); only G changes exactly G
        rest = [k for k in m_sd if k not in keys]
        assert _equal(restore(m_sd, c_sd, keys), only(c_sd, m_sd, rest)), g
        o = only(c_sd, m_sd, keys)
        assert all(torch.equal(o[k], m_sd[k] if k in keys else c_sd[k]) for k in o), g
    assert _equal(c_sd, c_copy) and _equal(m_sd, m_copy)              # inputs untouched
    # and the loaded model computes exactly what the clean one computes
    model = copy.deepcopy(manip)
    model.load_state_dict(sd)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), clean(x))
    with pytest.raises(UserError, match="not in the state dict: nope"):
        restore(m_sd, c_sd, ["nope"])
    with pytest.raises(UserError, match="different architectures"):
        restore(m_sd, build_model("cifar10_resnet20_nbn").state_dict(), [])


def test_relative_change_against_a_hand_computation():
    clean = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[0.0, 12.0]]), "n": torch.tensor(5)}
    manip = {"a": torch.tensor([3.0, 5.0]), "b": torch.tensor([[2.0, 12.0]]), "n": torch.tensor(9)}
    r = relative_change(clean, manip, ["a", "b", "n"])  # the integer counter is left out
    assert r["elements"] == 4
    assert r["delta_norm"] == pytest.approx(math.sqrt(1 + 4))
    assert r["clean_norm"] == pytest.approx(13.0)
    assert r["rel_change"] == pytest.approx(math.sqrt(5) / 13)
    assert relative_change({"z": torch.zeros(3)}, {"z": torch.ones(3)}, ["z"])["rel_change"] is None


def _tiny_params(**kw):
    return BASE.replace(**{"testing_size": 12, "training_size": 16, "batch_size": 8, "max_epochs": 1, **kw})


def test_locate_backdoor_rows_match_independent_evaluations(tiny_data_root):
    from bnbackdoor.data import load_split

    p = _tiny_params()
    x, y = load_split("cifar10", "test", size=12, data_root=tiny_data_root)
    clean = build_model("cifar10_resnet20").eval()
    manip = copy.deepcopy(clean)
    with torch.no_grad():  # the "backdoor": the head and the first BN's running mean; the rest unchanged
        manip.linear.weight.add_(0.5 * torch.randn_like(manip.linear.weight))
        manip.bn1.running_mean.add_(0.3)
    rows = locate_backdoor(p, clean, manip, x, y, batch_size=5, progress=False)
    by = {(r["variant"], r["group"]): r for r in rows}
    groups = parameter_groups(manip)
    assert len(rows) == 2 + 2 * len(groups)

    def ev(model):
        return evaluate_attack(model, clean, p, x, y, batch_size=5, progress=False)

    metrics = ("clean_accuracy", "attack_success_rate", "expl_mse_to_target", "expl_dssim_to_target",
               "expl_mse_to_clean", "expl_dssim_to_clean", "fidelity")
    ref_m, ref_c = ev(manip), ev(clean)
    for k in metrics:
        assert by[("manipulated", None)][k] == pytest.approx(ref_m[k], abs=1e-6), k
        assert by[("clean", None)][k] == pytest.approx(ref_c[k], abs=1e-6), k
    assert by[("clean", None)]["expl_mse_to_clean"] == pytest.approx(0.0, abs=1e-9)
    # restore the head: only the BN statistic is left, the same model as "only bn_stats" (evaluated first);
    # check it against an independent evaluation
    m = copy.deepcopy(manip)
    m.load_state_dict(restore(manip.state_dict(), clean.state_dict(), groups["classifier"]))
    ref = ev(m)
    row = by[("restore", "classifier")]
    assert by[("only", "bn_stats")]["same_as"] is None and row["same_as"] == "only bn_stats"
    assert by[("restore", "bn_stats")]["same_as"] is None and by[("only", "classifier")]["same_as"] == "restore bn_stats"
    for k in metrics:
        assert row[k] == pytest.approx(ref[k], abs=1e-6), k
        assert by[("only", "bn_stats")][k] == row[k]
    # groups that did not change are the same model as a reference: reused, and identical
    for g in ("bn_affine", "conv:stem", "conv:layer1", "conv:layer2", "conv:layer3"):
        assert by[("restore", g)]["same_as"] == "manipulated"
        assert by[("only", g)]["same_as"] == "clean"
        assert by[("only", g)]["rel_change"] == 0.0
        for k in metrics:
            assert by[("restore", g)][k] == by[("manipulated", None)][k]
            assert by[("only", g)][k] == by[("clean", None)][k]
    assert by[("only", "classifier")]["rel_change"] > 0


def test_locate_backdoor_script_end_to_end(tmp_path, tiny_data_root):
    p = _tiny_params(id="tinyrun")
    clean = build_model("cifar10_resnet20").eval()
    models_root = tmp_path / "models"
    save_checkpoint(models_root / "cifar10_resnet20" / "model_0.pth", clean, {"test_accuracy": 0.1})
    run = tmp_path / "tinyrun"
    save_checkpoint(run / "model.pth", perturbed(clean), {"attack_id": 154})
    p.save(run / "parameters.json")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "scripts/locate_backdoor.py", str(run), "cpu", "--save_path", str(out),
                        "--models-root", str(models_root), "--data-root", str(tiny_data_root),
                        "--testing-size", "6", "--batch-size", "6"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "restore" in r.stdout and "conv:layer3" in r.stdout and "attack success" in r.stdout
    name = run_name(str(run))  # a run folder is not the stored model of its id: its own output name
    assert name.startswith("tinyrun@") and sorted(f.name for f in out.iterdir()) == [
        f"{name}_anatomy.{ext}" for ext in ("csv", "json", "png")]
    data = json.loads((out / f"{name}_anatomy.json").read_text())
    assert data["testing_size"] == 6 and len(data["rows"]) == 2 + 2 * 7
    with open(out / f"{name}_anatomy.csv") as f:
        assert len(list(csv.DictReader(f))) == 16
    assert (out / f"{name}_anatomy.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "scripts/locate_backdoor.py", "nosuchrun", "cpu"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


# --- --grad-layer all ------------------------------------------------------------------------------------------

def test_parse_grad_layer():
    assert parse_grad_layer("all") == ALL and parse_grad_layer("ALL") == ALL
    assert parse_grad_layer("-1") == -1 and parse_grad_layer("3") == 3
    with pytest.raises(UserError, match="block index .* or 'all'"):
        parse_grad_layer("last")


def _train_with_loggers(model, loggers, steps=3, bn_train=True):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train(bn_train)
    outside_before = []
    for s in range(steps):
        x, y = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        for lg in loggers:
            lg.before_step()
        outside_before.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for lg in loggers:
            lg.after_step(1, s + 1)
    return outside_before


@pytest.mark.parametrize("bn_train", [True, False], ids=["bn_train", "bn_eval"])
def test_grad_layer_all_is_the_sum_of_squares_of_the_blocks(tmp_path, bn_train):
    torch.manual_seed(0)
    model = build_model("cifar10_resnet20")
    n_blocks = len(model_blocks(model))
    everything = GradLogger(model, ALL)
    per_block = [GradLogger(model, i) for i in range(n_blocks)]
    before = _train_with_loggers(model, [everything, *per_block], bn_train=bn_train)
    after = before[1:] + [model.state_dict()]  # the state before step t+1 is the state after step t
    everything.write_epoch(tmp_path / "all.csv")
    for i, lg in enumerate(per_block):
        lg.write_epoch(tmp_path / f"b{i}.csv")
    cols_all, all_vals = read_csv(tmp_path / "all.csv")
    assert cols_all == ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                        "linear.weight", "linear.bias"]
    # single-block CSVs keep their format
    assert read_csv(tmp_path / "b0.csv")[0] == ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                                "bn.running_var"]
    blocks = [read_csv(tmp_path / f"b{i}.csv")[1] for i in range(n_blocks)]
    # outside the blocks: the stem (conv1, bn1) and the head (linear), measured directly here
    outside = {"conv.weight": ["conv1.weight"], "bn.weight": ["bn1.weight"], "bn.bias": ["bn1.bias"],
               "bn.running_mean": ["bn1.running_mean"], "bn.running_var": ["bn1.running_var"],
               "linear.weight": ["linear.weight"], "linear.bias": ["linear.bias"]}
    for t in range(3):
        for col, keys in outside.items():
            out_sq = sum(float(((after[t][k] - before[t][k]).double() ** 2).sum()) for k in keys)
            block_sq = sum(b[col][t] ** 2 for b in blocks if col in b)
            assert all_vals[col][t] ** 2 == pytest.approx(block_sq + out_sq, rel=5e-5, abs=1e-12), (col, t)
    running = all_vals["bn.running_mean"] + all_vals["bn.running_var"]
    assert all(v > 0 for v in running) if bn_train else all(v == 0 for v in running)
    summary = update_summary(fold_groups(all_vals))
    assert sum(s["share"] for s in summary.values()) == pytest.approx(1.0)
    if not bn_train:  # eval mode: running statistics frozen, share 0, no division by zero
        assert summary["running mean"]["zero_throughout"] and summary["running mean"]["share"] == 0.0


def test_attack_writes_the_whole_model_capture(tmp_path, tiny_data_root):
    from bnbackdoor.runs import run_attack

    clean = build_model("cifar10_resnet20").eval()
    models_root = tmp_path / "models"
    save_checkpoint(models_root / "cifar10_resnet20" / "model_0.pth", clean, {"test_accuracy": 0.1})
    p = _tiny_params(testing_size=4)
    run_attack(p, torch.device("cpu"), save_path=tmp_path / "out", data_root=tiny_data_root, grad_layer="all",
               models_root=models_root, progress=False)
    groups, cols = read_csv(tmp_path / "out" / "gradients_epoch1.csv")
    assert groups == ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                      "linear.weight", "linear.bias"]
    assert len(cols["step"]) == 2


def test_update_summary_against_a_hand_computation():
    sizes = {"a": [3.0, 0.0, 1.0], "b": [4.0, 0.0, 0.0], "z": [0.0, 0.0, 0.0]}
    s = update_summary(sizes)
    assert s["a"]["share"] == pytest.approx(10 / 26) and s["b"]["share"] == pytest.approx(16 / 26)
    assert s["z"]["share"] == 0.0 and s["z"]["zero_throughout"]
    assert s["a"]["median"] == 1.0 and s["b"]["mean"] == pytest.approx(4 / 3)
    assert s["a"]["median_step_share"] == pytest.approx((9 / 25 + 1.0) / 2)  # the all-zero step is skipped
    nothing = update_summary({"a": [0.0, 0.0]})
    assert nothing["a"]["share"] is None and nothing["a"]["median_step_share"] is None
    folded = fold_groups({"conv.weight": [3.0], "conv.bias": [4.0], "bn.weight": [1.0]})
    assert folded == {"conv weights": [5.0], "BN γ": [1.0]}


def _write_capture(path, cols: dict[str, list[float]]):
    n = len(next(iter(cols.values())))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "global_step", *cols])
        for t in range(n):
            w.writerow([1, t + 1, t + 1, *[cols[c][t] for c in cols]])


def test_plot_update_shares_script(tmp_path):
    bn = {"conv.weight": [1.0, 2.0, 3.0], "bn.weight": [2.0, 2.0, 2.0], "bn.bias": [1.0, 1.0, 1.0],
          "bn.running_mean": [0.0, 0.0, 0.0], "bn.running_var": [0.0, 0.0, 0.0],  # eval mode: frozen
          "linear.weight": [0.5, 0.5, 0.5], "linear.bias": [0.0, 0.0, 0.0]}
    nbn = {"conv.weight": [3.0, 3.0, 3.0], "conv.bias": [4.0, 4.0, 4.0], "linear.weight": [0.0, 0.0, 0.0],
           "linear.bias": [0.0, 0.0, 0.0]}
    _write_capture(tmp_path / "clean.csv", bn)
    _write_capture(tmp_path / "nbn.csv", nbn)
    _write_capture(tmp_path / "bn1.csv", bn)
    _write_capture(tmp_path / "bn2.csv", bn)
    out = tmp_path / "fig" / "shares.png"
    r = subprocess.run([sys.executable, "scripts/plot_update_shares.py", "--clean", str(tmp_path / "clean.csv"),
                        "--nbn", str(tmp_path / "nbn.csv"), "--bn", str(tmp_path / "bn1.csv"),
                        str(tmp_path / "bn2.csv"), "--save", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 10_000
    data = json.loads(out.with_suffix(".json").read_text())["panels"]
    assert data["bn"]["steps"] == 6 and data["nbn"]["steps"] == 3
    assert data["nbn"]["groups"]["conv weights"]["median"] == pytest.approx(5.0)
    assert data["nbn"]["groups"]["conv weights"]["share"] == pytest.approx(1.0)
    assert "BN γ" not in data["nbn"]["groups"]
    total = (1 + 4 + 9) + 3 * 4 + 3 * 1 + 3 * 0.25
    assert data["clean"]["groups"]["BN γ"]["share"] == pytest.approx(12 / total)
    assert data["bn"]["groups"]["running var"]["share"] == 0.0
    assert data["clean"]["title"] == "(a) clean fine-tuning, ResNet20"
    r = subprocess.run([sys.executable, "scripts/plot_update_shares.py", "--clean", str(tmp_path / "clean.csv"),
                        "--nbn", str(tmp_path / "nbn.csv"), "--bn", str(tmp_path / "bn1.csv"), "--regime", "scratch",
                        "--save", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.with_suffix(".json").read_text())["panels"]
    assert [p["title"] for p in data.values()] == ["(a) clean training from scratch, ResNet20",
                                                   "(b) poisoned from scratch, ResNet20 without BatchNorm",
                                                   "(c) poisoned from scratch, ResNet20"]
