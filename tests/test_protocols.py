"""The paper's two protocols told apart (issue 12): the attack's BatchNorm mode, Re-BN vs test-batch BatchNorm
(``batchstats``), the composition of transductive test batches, and the command line that picks defenses."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from bnbackdoor.finetune import finetune
from bnbackdoor.models import build_model
from bnbackdoor.params import AttackParams, load_attack_file, resolve_attack

from conftest import ROOT

BASE = resolve_attack("154", root=ROOT)
CPU = torch.device("cpu")


def small(**kw) -> AttackParams:
    return BASE.replace(**{**dict(training_size=32, testing_size=16, batch_size=16, max_epochs=1,
                                  learning_rate=1e-3), **kw})


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


# ------------------------------------------------------------------------------------------------- bn_mode
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bn_mode_running_statistics(mode, tmp_path, tiny_data_root):
    torch.manual_seed(0)
    clean = build_model("cifar10_resnet20").eval()
    model = copy.deepcopy(clean)
    before = bn_buffers(model)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    finetune(model, clean, small(bn_mode=mode), device=CPU, run_dir=tmp_path, data_root=tiny_data_root,
             progress=False)
    after = bn_buffers(model)
    assert after.keys() == before.keys() and any("running_mean" in k for k in after)
    if mode == "eval":   # the paper's protocol: every buffer bit-identical to the clean model's
        for k in before:
            assert torch.equal(before[k], after[k]), k
    else:                # batch statistics: every running statistic absorbed the (poisoned) batches
        for k in before:
            if "running" in k:
                assert not torch.equal(before[k], after[k]), k
    # either way the weights (conv, BN affine, head) were trained
    for n, p in model.named_parameters():
        assert not torch.equal(p, weights[n]), n


def test_old_parameters_without_bn_mode_load_as_eval(tmp_path):
    d = json.loads((ROOT / "manipulated_models" / "154" / "parameters.json").read_text())
    d.pop("bn_mode", None)
    (tmp_path / "parameters.json").write_text(json.dumps(d))
    p = load_attack_file(tmp_path / "parameters.json")
    assert p.bn_mode == "eval" and p.to_dict()["bn_mode"] == "eval"
    assert load_attack_file(tmp_path / "parameters.json").replace(bn_mode="train").bn_mode == "train"


def test_bn_mode_validated_in_concrete_and_grid_files(tmp_path):
    from bnbackdoor.errors import UserError

    d = BASE.to_dict()
    with pytest.raises(UserError, match=r"field 'bn_mode' is 'batch'; allowed: eval, train"):
        AttackParams.from_dict({**d, "bn_mode": "batch"}, "t")
    grid = json.loads((ROOT / "experimentsettings" / "154.json").read_text())
    grid.pop("bn_mode", None)
    (tmp_path / "g.json").write_text(json.dumps(grid))
    assert load_attack_file(tmp_path / "g.json").bn_mode == "eval"
    (tmp_path / "g.json").write_text(json.dumps({**grid, "bn_mode": "train"}))
    assert load_attack_file(tmp_path / "g.json").bn_mode == "train"
    (tmp_path / "g.json").write_text(json.dumps({**grid, "bn_mode": True}))
    with pytest.raises(UserError, match=r"field 'bn_mode' is true; allowed: eval, train"):
        load_attack_file(tmp_path / "g.json")
