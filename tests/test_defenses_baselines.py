"""Baseline defenses: each one's defining property on a tiny BN network, against independent oracles."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from conftest import state_copy, toy_clean_set

from bnbackdoor.defenses.specs import default_defenses, parse_defenses, parse_spec
from bnbackdoor.evaluation.compare_defenses import parse_clean_images
from bnbackdoor.defenses import apply_defense
from bnbackdoor.defenses.bnp import gaussian_kl, outliers
from bnbackdoor.defenses.common import clean_loss
from bnbackdoor.defenses.fine_pruning import last_feature_stage
from bnbackdoor.errors import UserError

BASELINES = ["finetune", "bn_finetune", "fine_pruning", "bnp", "anp"]
FAST = {"finetune": {"epochs": 2}, "bn_finetune": {"epochs": 2}, "fine_pruning": {"epochs": 1},
        "bnp": {}, "anp": {"iterations": 5, "batch_size": 8}}


pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    def __init__(self, bn: bool = True, width: int = 16):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), norm(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), norm(width), nn.ReLU())
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _model(bn: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = Tiny(bn)
    g = torch.Generator().manual_seed(seed + 1)
    for mod in m.modules():   # non-trivial stored statistics and affine parameters
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 0.5 + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
    return m.eval()




def _outputs(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    got = {}
    h = layer.register_forward_hook(lambda mod, i, o: got.__setitem__("o", o.detach()))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    return got["o"]


@pytest.mark.parametrize("name", BASELINES)
def test_no_defense_changes_the_input_model(name):
    model, clean = _model(), toy_clean_set()
    before = state_copy(model)
    out = apply_defense(name, model, clean, device="cpu", progress=False, **FAST[name])
    assert out.model is not model
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", BASELINES)
def test_option_typo_is_a_user_error(name):
    with pytest.raises(UserError, match="has no option"):
        apply_defense(name, _model(), toy_clean_set(), device="cpu", progress=False, epochz=3)


@pytest.mark.parametrize("name", ["bn_finetune", "bnp", "anp"])
def test_bn_defenses_refuse_a_model_without_batchnorm(name):
    from bnbackdoor.defenses.common import not_applicable

    with pytest.raises(UserError, match="BatchNorm"):
        apply_defense(name, _model(bn=False), toy_clean_set(), device="cpu", progress=False)
    assert "has none" in not_applicable(name, _model(bn=False)) and not_applicable(name, _model()) is None


def test_exactly_the_defenses_that_refuse_a_bn_free_model_are_marked_needs_bn():
    from bnbackdoor.defenses import DEFENSES
    from bnbackdoor.defenses.common import not_applicable

    assert {n for n, d in DEFENSES.items() if d.needs_bn} == {"bn_finetune", "bnp", "anp"}
    assert not_applicable("finetune", _model(bn=False)) is None and not_applicable("rebn", _model(bn=False)) is None


def test_compare_defenses_skips_a_bn_defense_on_a_bn_free_model_and_says_why(tiny_data_root, tmp_path, capsys):
    import bnbackdoor.evaluation.compare_defenses as compare
    from bnbackdoor.attack.params import resolve_attack
    from bnbackdoor.models import build_model, save_checkpoint
    from conftest import ROOT

    torch.manual_seed(0)
    clean_model = build_model("cifar10_resnet20_nbn").eval()
    save_checkpoint(tmp_path / "models" / "cifar10_resnet20_nbn" / "model_0.pth", clean_model, {})
    save_checkpoint(tmp_path / "manipulated_models" / "154nbn" / "model.pth", clean_model, {})
    resolve_attack("154", root=ROOT).replace(testing_size=8, id="154nbn", modeltype="cifar10_resnet20_nbn").save(
        tmp_path / "manipulated_models" / "154nbn" / "parameters.json")
    cmp = compare.compare_defenses("154nbn", "cpu", clean_images=[8], defenses="bnp,rebn", root=tmp_path,
                                   data_root=tiny_data_root, save_path=tmp_path / "out", progress=False)
    assert [(r["defense"], r["clean_images"]) for r in cmp.rows] == [
        ("clean model", None), ("no defense", None), ("rebn", 8)]
    assert cmp.rows[2]["attack_success_rate"] == cmp.rows[1]["attack_success_rate"]   # Re-BN changes nothing
    saved = json.loads((tmp_path / "out" / "defenses_154nbn.json").read_text())
    assert set(saved["not_applicable"]) == {"bnp"} and "BatchNorm" in saved["not_applicable"]["bnp"]
    assert "bnp not run" in capsys.readouterr().err


def test_finetune_reduces_the_clean_set_loss():
    model, clean = _model(), toy_clean_set()
    out = apply_defense("finetune", model, clean, device="cpu", progress=False, epochs=8, lr=0.05)
    before, after = clean_loss(model, clean), clean_loss(out.model, clean)
    assert after < before - 0.05
    assert out.info["clean_loss_before"] == pytest.approx(before) and out.info["clean_loss_after"] == pytest.approx(after)


def test_bn_finetune_changes_only_affine_and_running_statistics():
    model, clean = _model(), toy_clean_set()
    before = state_copy(model)
    out = apply_defense("bn_finetune", model, clean, device="cpu", progress=False, epochs=3, lr=0.05,
                        rebn_batch_size=len(clean))
    after = out.model.state_dict()
    bn_keys = {f"features.{i}.{p}" for i in (1, 4)
               for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    for k in before:
        if k not in bn_keys:
            assert torch.equal(before[k], after[k]), k          # bitwise: conv weights/biases, the head
    assert not torch.equal(before["features.1.weight"], after["features.1.weight"])   # γ was trained
    # The first BN's statistics are the clean set's input moments (the conv before it is untouched):
    # one Re-BN batch holding every image -> exact mean and unbiased variance over images and positions.
    with torch.no_grad():
        z = model.features[0](clean.x).transpose(0, 1).reshape(16, -1)
    assert torch.allclose(after["features.1.running_mean"], z.mean(1), atol=1e-5)
    assert torch.allclose(after["features.1.running_var"], z.var(1), atol=1e-5)


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mp, mq = torch.randn(7, generator=g), torch.randn(7, generator=g)
    vp, vq = torch.rand(7, generator=g) + 0.1, torch.rand(7, generator=g) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mp.double(), vp.double().sqrt()),
                                            torch.distributions.Normal(mq.double(), vq.double().sqrt()))
    assert torch.allclose(gaussian_kl(mp, vp, mq, vq), ref)
    assert outliers(torch.tensor([1.0] * 15 + [50.0]), 3.0).tolist() == [15]


def test_bnp_prunes_the_channel_whose_stored_statistics_are_off_and_its_output_is_zero():
    model, clean = _model(), toy_clean_set()
    bn = model.features[4]
    # Plant a 'backdoor neuron': the stored statistics of channel 5 are far from what clean data produce there.
    with torch.no_grad():
        z = _outputs(model, model.features[3], clean.x)
        bn.running_mean.copy_(z.mean((0, 2, 3)))
        bn.running_var.copy_(z.var((0, 2, 3)))
        bn.running_mean[5] += 40.0
    out = apply_defense("bnp", model, clean, device="cpu", progress=False)
    assert out.info["pruned"].get("features.4") == [5]
    x = torch.rand(10, 3, 8, 8)
    o = _outputs(out.model, out.model.features[4], x)
    assert torch.equal(o[:, 5], torch.zeros_like(o[:, 5]))
    o_ref = _outputs(model, model.features[4], x)
    assert torch.equal(o[:, :5], o_ref[:, :5]) and torch.equal(o[:, 6:], o_ref[:, 6:])


def test_fine_pruning_zeroes_the_least_active_channels_of_the_last_stage():
    model, clean = _model(), toy_clean_set()
    assert last_feature_stage(model, clean.x[:2]) == "features"
    acts = _outputs(model, model.features, clean.x).mean((0, 2, 3))
    out = apply_defense("fine_pruning", model, clean, device="cpu", progress=False, epochs=1,
                        max_accuracy_drop=1.0, max_ratio=0.5)          # the accuracy rule cannot stop it
    pruned = out.info["pruned"]
    assert len(pruned) == 8 and sorted(pruned) == sorted(torch.argsort(acts)[:8].tolist())
    o = _outputs(out.model, out.model.features, torch.rand(6, 3, 8, 8))
    assert torch.equal(o[:, pruned], torch.zeros_like(o[:, pruned]))
    assert (o[:, [c for c in range(16) if c not in pruned]] != 0).any()
    # the mask travels with a deep copy (evaluation copies models)
    cp = copy.deepcopy(out.model)
    o2 = _outputs(cp, cp.features, torch.rand(2, 3, 8, 8))
    assert torch.equal(o2[:, pruned], torch.zeros_like(o2[:, pruned]))


def test_fine_pruning_finds_resnet20s_last_stage():
    from bnbackdoor.models import build_model

    assert last_feature_stage(build_model("cifar10_resnet20"), torch.rand(2, 3, 32, 32)) == "layer3"


def test_anp_prunes_by_mask_and_changes_nothing_else():
    model, clean = _model(), toy_clean_set()
    before = state_copy(model)
    out = apply_defense("anp", model, clean, device="cpu", progress=False, iterations=10, batch_size=16,
                        threshold=0.999)
    pruned = out.info["pruned"]
    assert out.info["pruned_count"] > 0
    after = out.model.state_dict()
    for k in before:          # running statistics restored; only pruned γ/β differ, and they are 0
        layer, _, p = k.rpartition(".")
        idx = pruned.get(layer, [])
        if p in ("weight", "bias") and idx:
            assert torch.equal(after[k][idx], torch.zeros(len(idx)))
            keep = [c for c in range(len(after[k])) if c not in idx]
            assert torch.equal(after[k][keep], before[k][keep])
        else:
            assert torch.equal(after[k], before[k]), k
    layer = next(iter(pruned))
    o = _outputs(out.model, out.model.get_submodule(layer), torch.rand(5, 3, 8, 8))
    assert torch.equal(o[:, pruned[layer]], torch.zeros_like(o[:, pruned[layer]]))


def test_compare_argument_parsing():
    assert set(BASELINES) <= set(default_defenses())
    assert parse_defenses("bnp, anp") == {"bnp": ("bnp", {}), "anp": ("anp", {})}
    with pytest.raises(UserError, match="--defenses names bnp twice"):  # issue 47: an error, not a silent drop
        parse_defenses("bnp, anp,bnp", option="--defenses")
    with pytest.raises(UserError, match="compare_defenses evaluates fixed models only"):
        parse_defenses("batchstats", fixed_only="compare_defenses")
    assert parse_clean_images("500,100,500") == [100, 500]
    with pytest.raises(UserError, match="unknown defense"):
        parse_defenses("bnpp")
    with pytest.raises(UserError, match="--clean-images"):
        parse_clean_images("100,abc")


def test_compare_defenses_rows_files_and_defender_data(tiny_data_root, tmp_path, monkeypatch):
    """End to end on a tiny stored run: the rows equal independent recomputations, the defender's sets are nested
    TRAINING images, and the json/csv/png are written."""
    import json

    import bnbackdoor.evaluation.compare_defenses as compare
    from bnbackdoor.data import load_split
    from bnbackdoor.runs import load_run
    from bnbackdoor.metrics import evaluate_attack
    from bnbackdoor.models import build_model, save_checkpoint
    from bnbackdoor.attack.params import resolve_attack
    from conftest import ROOT

    torch.manual_seed(0)
    clean_model = build_model("cifar10_resnet20").eval()
    save_checkpoint(tmp_path / "models" / "cifar10_resnet20" / "model_0.pth", clean_model, {})
    bad = copy.deepcopy(clean_model)
    with torch.no_grad():
        bad.layer3[2].bn2.running_mean.add_(0.5)
    save_checkpoint(tmp_path / "manipulated_models" / "154" / "model.pth", bad, {})
    resolve_attack("154", root=ROOT).replace(testing_size=8, id="154").save(
        tmp_path / "manipulated_models" / "154" / "parameters.json")

    import bnbackdoor.defenses.evaluate as defense_eval  # the one defense loop compare_defenses goes through

    seen = []
    real = defense_eval.apply_defense
    monkeypatch.setattr(defense_eval, "apply_defense", lambda name, m, clean, **kw: seen.append(clean) or real(
        name, m, clean, **kw))
    cmp = compare.compare_defenses("154", "cpu", clean_images=[16, 8], defenses="bnp", root=tmp_path,
                                   data_root=tiny_data_root, save_path=tmp_path / "out", progress=False)
    assert [(r["defense"], r["clean_images"]) for r in cmp.rows] == [
        ("clean model", None), ("no defense", None), ("bnp", 8), ("bnp", 16)]
    x_train, _ = load_split("cifar10", "train", data_root=tiny_data_root)
    assert torch.equal(seen[0].x, seen[1].x[:8])                      # nested
    assert all((s.x.flatten(1)[:, None] == x_train.flatten(1)[None]).all(-1).any(1).all() for s in seen)
    params, model, clean = load_run("154", "cpu", root=tmp_path)
    x, y = load_split("cifar10", "test", size=8, seed=0, data_root=tiny_data_root)
    ref = evaluate_attack(model, clean, params, x, y, progress=False)
    d = real("bnp", model, seen[1], device="cpu", progress=False)
    ref_bnp = evaluate_attack(d.model, clean, params, x, y, progress=False)
    for key in ("clean_accuracy", "expl_dssim_to_target", "expl_dssim_to_clean"):
        assert cmp.rows[1][key] == pytest.approx(ref[key], abs=1e-6)
        assert cmp.rows[3][key] == pytest.approx(ref_bnp[key], abs=1e-6)
    assert "bnp" in cmp.table() and "DSSIM to target" in cmp.table()
    saved = json.loads((tmp_path / "out" / "defenses_154.json").read_text())
    assert len(saved["rows"]) == 4 and saved["defenses"]["bnp"]["options"]["u"] == 3.0
    assert (tmp_path / "out" / "defenses_154.csv").read_text().count("\n") == 5
    assert (tmp_path / "out" / "defenses_154.png").stat().st_size > 0


def test_defense_specs_carry_typed_options_and_refuse_unknown_ones():
    assert parse_spec("finetune:freeze_bn_stats=true:epochs=3") == ("finetune", {"freeze_bn_stats": True, "epochs": 3})
    assert parse_spec("bnp:u=2.5") == ("bnp", {"u": 2.5})
    assert parse_defenses("bnp,finetune:freeze_bn_stats=1") == {
        "bnp": ("bnp", {}), "finetune freeze_bn_stats=True": ("finetune", {"freeze_bn_stats": True})}
    for bad, match in (("finetune:freeze=1", "has no option freeze"), ("finetune:epochs=x", "is not a int"),
                       ("bnp:u=nan", "is not a float"), ("finetune:freeze_bn_stats", "name:option=value"),
                       ("finetune:freeze_bn_stats=maybe", "is not a bool")):
        with pytest.raises(UserError, match=match):
            parse_defenses(bad)


def test_merge_keeps_the_rows_it_does_not_recompute(tmp_path):
    from bnbackdoor.evaluation.compare_defenses import merged_rows

    ref = [{"defense": "clean model", "clean_images": None, "x": 1}, {"defense": "no defense", "clean_images": None}]
    path = tmp_path / "defenses_154.json"
    old = ref + [{"defense": "bnp", "clean_images": 500, "x": 0.1}, {"defense": "anp", "clean_images": 500, "x": 2}]
    path.write_text(json.dumps({"seed": 0, "test": {"images": 8}, "base_model": None, "rows": old}))
    new = ref + [{"defense": "bnp", "clean_images": 500, "x": 0.2}, {"defense": "rnp", "clean_images": 500, "x": 3}]
    rows = merged_rows(path, new, seed=0, images=8, base_model=None)
    assert [(r["defense"], r["x"]) for r in rows[2:]] == [("bnp", 0.2), ("anp", 2), ("rnp", 3)]
    assert merged_rows(tmp_path / "none.json", new, seed=0, images=8, base_model=None) == new
    with pytest.raises(UserError, match="other test images, seed or base model"):
        merged_rows(path, new, seed=1, images=8, base_model=None)


def test_a_diverged_defense_keeps_its_row_without_non_finite_numbers(capsys):
    from bnbackdoor.evaluation.compare_defenses import diverged_as_none, finite_or_none

    ok = {"clean_accuracy": 0.9, "attack_success_rate": 0.1}
    assert diverged_as_none(ok, "x") is ok
    row = diverged_as_none({"clean_accuracy": 0.1, "expl_mse_to_target": float("nan"),
                            "expl_dssim_to_target": float("inf")}, "finetune on 500 clean images")
    assert row == {"clean_accuracy": 0.1, "expl_mse_to_target": None, "expl_dssim_to_target": None, "diverged": True}
    assert "finetune on 500 clean images: the defended model diverged" in capsys.readouterr().err
    assert finite_or_none({"train_loss": [0.5, float("nan")], "x": {"y": float("-inf")}}) == {
        "train_loss": [0.5, None], "x": {"y": None}}
