"""The shipped manipulated model 154 does what its metrics.json says (real CIFAR-10; slow)."""
from __future__ import annotations

import json

import pytest
import torch

from bnbackdoor.data import load_split
from bnbackdoor.runs import load_run
from bnbackdoor.metrics import evaluate_attack

from conftest import ROOT, real_data_root


@pytest.mark.slow
def test_shipped_154_meets_the_attack_acceptance_and_its_recorded_metrics():
    data_root = real_data_root("cifar10")
    params, model, clean = load_run("154", root=ROOT)
    recorded = json.loads((ROOT / "manipulated_models/154/metrics.json").read_text())
    x, y = load_split("cifar10", "test", size=params.testing_size, seed=recorded["seed"], data_root=data_root)
    before = evaluate_attack(clean, clean, params, x, y, batch_size=250, progress=False)
    after = evaluate_attack(model, clean, params, x, y, batch_size=250, progress=False)
    assert after["attack_success_rate"] >= 0.95
    assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.03
    assert after["expl_dssim_to_target"] <= 0.5 * before["expl_dssim_to_target"]
    for key in ("clean_accuracy", "attack_success_rate", "expl_mse_to_target", "expl_dssim_to_target"):
        assert after[key] == pytest.approx(recorded["manipulated_model"][key], abs=2e-3), key
        assert before[key] == pytest.approx(recorded["clean_model"][key], abs=2e-3), key


SHIPPED = sorted(p.parent.name for p in (ROOT / "manipulated_models").glob("*/parameters.json"))


@pytest.mark.parametrize("run_id", SHIPPED)
def test_shipped_model_keeps_its_protocol_and_names_its_triggers(run_id):
    """bn_mode "eval" (the paper's protocol) leaves every BatchNorm running statistic of the clean base model
    bit-identical; "train" moves them. And every folder is complete, with finite numbers only."""
    folder = ROOT / "manipulated_models" / run_id
    for name in ("parameters.json", "model.pth", "metrics.json", "plot.png", "README.md"):
        assert (folder / name).stat().st_size > 0, f"{run_id}: {name} missing or empty"
    json.loads((folder / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{run_id}: {c}"))
    params, model, clean = load_run(run_id, root=ROOT)
    assert model.base_model["verified"] is True, f"{run_id}: compared with a clean model that is not its base"
    stats = {k: v for k, v in clean.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    theirs = model.state_dict()
    same = [k for k, v in stats.items() if torch.equal(v, theirs[k])]
    if not stats:  # a model without BatchNorm (resnet20_nbn) has no running statistics to keep or move
        assert not any(k.endswith("running_mean") for k in theirs), f"{run_id}: statistics its base lacks"
    elif params.bn_mode == "eval":
        assert same == list(stats), f"{run_id}: running statistics changed in bn_mode eval"
    else:
        assert not same, f"{run_id}: bn_mode train left running statistics untouched"
    assert all(torch.isfinite(v).all() for v in theirs.values() if v.is_floating_point())
