"""The paper's two protocols told apart (issue 12): the attack's BatchNorm mode, Re-BN vs test-batch BatchNorm
(``batchstats``), the composition of transductive test batches, and the command line that picks defenses."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from bnbackdoor.attack.finetune import finetune
from bnbackdoor.models import build_model
from bnbackdoor.attack.params import AttackParams, load_attack_file, resolve_attack

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


# ---------------------------------------------------------------------------------------------- defenses
from bnbackdoor.defenses.evaluate import composition, triggered_per_batch  # noqa: E402
from bnbackdoor.defenses import CleanSet, apply_defense  # noqa: E402
from bnbackdoor.defenses.rebn import bn_layers  # noqa: E402


def scrambled(seed: int = 0) -> nn.Module:
    """A ResNet20 whose running statistics are far from its inputs' (so batch statistics make a difference)."""
    torch.manual_seed(seed)
    model = build_model("cifar10_resnet20").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in bn_layers(model):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 3 + 0.2)
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def reference_batch_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An eval-mode copy whose BN outputs are replaced, through forward hooks, by an explicit batch-statistics
    normalisation ((x - mean) / sqrt(biased var + eps) * γ + β over N, H, W) - independent of PyTorch's BN."""
    ref = copy.deepcopy(model).eval()

    def hook(m, inp, out):
        a = inp[0].double()
        mean = a.mean((0, 2, 3), keepdim=True)
        var = a.var((0, 2, 3), unbiased=False, keepdim=True)
        w, b = m.weight.double()[None, :, None, None], m.bias.double()[None, :, None, None]
        return ((a - mean) / torch.sqrt(var + m.eps) * w + b).to(out.dtype)

    for _, m in bn_layers(ref):
        m.register_forward_hook(hook)
    with torch.no_grad():
        return ref(x)


def test_batchstats_equals_reference_forward_and_leaves_buffers(tiny_data_root):
    model = scrambled()
    before = bn_buffers(model)
    x = torch.rand(12, 3, 32, 32)
    out = apply_defense("batchstats", model, CleanSet(x[:0], None, "cifar10"), progress=False)
    defended = out.model
    defended.eval()                                     # every evaluation routine calls eval(): must not matter
    with torch.no_grad():
        got = defended(x)
        got2 = defended(x)
    want = reference_batch_forward(model, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got, got2)
    with torch.no_grad():                               # ... and it really differs from running statistics
        assert not torch.allclose(model(x), got, atol=1e-2)
    for k, v in bn_buffers(defended).items():            # buffers untouched (num_batches_tracked too)
        assert torch.equal(v, before[k]), k
    for k, v in bn_buffers(model).items():               # and the caller's model is not changed at all
        assert torch.equal(v, before[k]), k
    assert not model.bn1.training and defended.bn1.training and not defended.training
    assert isinstance(defended.bn1, nn.BatchNorm2d) and out.info["clean_images"] == 0
    # an explanation pass (gradients through the batch statistics) leaves the buffers alone too
    from bnbackdoor.explain import explain_with_logits

    explain_with_logits(defended, x, "grad_cam")
    for k, v in bn_buffers(defended).items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("n,B,f", [(100, 100, 1.0), (100, 100, 0.01), (50, 16, 0.1), (50, 16, 0.25), (37, 64, 0.1),
                                   (300, 256, 0.1), (20, 16, 1 / 16), (10, 16, 0.001)])
def test_composition_batches_hold_exactly_round_fB_triggered(n, B, f):
    t = max(1, int(f * B + 0.5))
    assert triggered_per_batch(B, f) == t
    batches = composition(n, B, f, seed=3)
    for b in batches:
        assert len(b.triggered) == t and b.size == B           # exactly round(f·B) triggered, always B images
        assert not set(b.triggered.tolist()) & set(b.clean.tolist()) or n <= t
    scored = torch.cat([b.triggered[b.scored] for b in batches])
    assert sorted(scored.tolist()) == list(range(n))           # each test image triggered (scored) exactly once
    assert composition(n, B, f, seed=3)[0].clean.tolist() == batches[0].clean.tolist()   # seeded
    capped = composition(n, B, f, seed=3, max_triggered=5)
    assert sum(int(b.scored.sum()) for b in capped) == min(5, n)


def test_composition_plot_writes_its_figure(tmp_path):
    from PIL import Image

    from bnbackdoor.plots import composition_plot

    points = [{"test_batch": b, "trigger_fraction": f, "attack_success_rate": 1 - f, "clean_accuracy": 0.9}
              for b in (16, 64) for f in (1 / b, 0.5, 1.0)]
    out = composition_plot(points, tmp_path / "c.png", baseline={"attack_success_rate": 1.0, "clean_accuracy": 0.92},
                           title="attack 154: test-batch BN")
    assert out == tmp_path / "c.png"
    with Image.open(out) as im:
        assert im.size[0] > 600 and im.size[1] > 200
