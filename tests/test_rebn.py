"""Re-BN: the re-estimated statistics are the numbers they should be, and nothing else changes."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from bnbackdoor.data import load_split
from bnbackdoor.errors import UserError
from bnbackdoor.models import build_model
from bnbackdoor.defenses.rebn import NO_BN_NOTICE, bn_layers, rebn


def _scramble_stats(model: nn.Module, seed: int = 1) -> None:
    """Give every BN layer arbitrary 'poisoned' statistics, so a missing reset would show."""
    g = torch.Generator().manual_seed(seed)
    for _, m in bn_layers(model):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 3)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 5 + 0.1)
        m.num_batches_tracked.fill_(1234)


def _resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("cifar10_resnet20")
    _scramble_stats(model)
    return model.eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _bn_inputs_full_batch(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each BN layer's input when the whole set passes as one batch with BN using batch statistics.

    That is what "the layer's inputs" are during Re-BN: a later BN layer sees activations normalised by the
    earlier layers' *batch* statistics. Computed on a copy, through forward pre-hooks, independently of rebn.
    """
    ref = copy.deepcopy(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=n: seen.__setitem__(name, inp[0].detach().clone()))
             for n, m in bn_layers(ref)]
    ref.train()
    with torch.no_grad():
        ref(x)
    for h in hooks:
        h.remove()
    return seen


def _stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in bn_layers(model)}


def test_single_batch_gives_exact_mean_and_unbiased_variance_of_layer_inputs():
    model, x = _resnet(), _images(24)
    inputs = _bn_inputs_full_batch(model, x)
    report = rebn(model, x, batch_size=len(x), progress=False)

    layers = bn_layers(model)
    assert len(layers) == 19 and report.layers == [n for n, _ in layers]
    assert report.images == 24 and report.batches == 1
    for name, m in layers:
        a = inputs[name].double().transpose(0, 1).flatten(1)          # (C, N*H*W)
        torch.testing.assert_close(m.running_mean.double(), a.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.running_var.double(), a.var(1, unbiased=True), rtol=1e-5, atol=1e-6)
        assert m.num_batches_tracked.item() == 1


def test_multi_batch_matches_swa_update_bn_with_uneven_last_batch():
    model, x = _resnet(), _images(30)
    expected = copy.deepcopy(model)
    loader = DataLoader(TensorDataset(x), batch_size=8)          # 8, 8, 8, 6
    update_bn(loader, expected)

    rep_loader = rebn(model, loader, progress=False)
    assert rep_loader.images == 30 and rep_loader.batches == 4
    got_loader = _stats(model)

    model2 = _resnet()
    rebn(model2, x, batch_size=8, progress=False)                 # a tensor sliced the same way
    for name, m in bn_layers(expected):
        torch.testing.assert_close(got_loader[name][0], m.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got_loader[name][1], m.running_var, rtol=1e-6, atol=1e-7)
        assert torch.equal(_stats(model2)[name][0], got_loader[name][0])
        assert torch.equal(_stats(model2)[name][1], got_loader[name][1])


def test_statistics_are_the_mean_of_per_batch_statistics():
    """Cumulative averaging weighs batches equally: first BN layer (input fixed by frozen conv1) checks it."""
    model, x = _resnet(), _images(12)
    rebn(model, x, batch_size=4, progress=False)
    with torch.no_grad():
        a = model.conv1(model.normalize(x)).double()                # bn1's inputs, independent of any BN
    per_batch = [a[i:i + 4].transpose(0, 1).flatten(1) for i in range(0, 12, 4)]
    mean = torch.stack([b.mean(1) for b in per_batch]).mean(0)
    var = torch.stack([b.var(1, unbiased=True) for b in per_batch]).mean(0)
    torch.testing.assert_close(model.bn1.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_parameters_untouched_momenta_restored_and_eval_mode():
    model, x = _resnet(), _images(16)
    model.bn1.momentum = 0.3
    model.layer2[1].bn2.momentum = None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    rebn(model, x, batch_size=5, progress=False)

    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n                        # bitwise
        assert p.grad is None
    assert model.bn1.momentum == 0.3
    assert model.layer2[1].bn2.momentum is None
    assert all(m.momentum == 0.1 for n, m in bn_layers(model) if n not in ("bn1", "layer2.1.bn2"))
    assert not any(m.training for m in model.modules())


def test_report_shifts_and_serialisation():
    model, x = _resnet(), _images(8)
    old = _stats(model)
    report = rebn(model, x, progress=False)
    new = _stats(model)
    by_name = {s.name: s for s in report.shifts}
    for name, (om, ov) in old.items():
        s = by_name[name]
        assert s.channels == om.numel()
        assert s.mean_shift == pytest.approx((new[name][0].double() - om.double()).norm().item(), rel=1e-9)
        assert s.var_shift == pytest.approx((new[name][1].double() - ov.double()).norm().item(), rel=1e-9)
        assert s.rel_mean_shift == pytest.approx(s.mean_shift / om.double().norm().item(), rel=1e-9)
        assert s.mean_shift > 0
    d = json.loads(json.dumps(report.to_dict()))
    assert d["images"] == 8 and d["notice"] is None and len(d["shifts"]) == 19
    assert "layer3.2.bn2" in report.table()


def test_bn_free_model_gets_a_notice_not_a_silent_pass(capsys):
    model = build_model("cifar10_resnet20_nbn").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = rebn(model, _images(4), progress=False)
    err = capsys.readouterr().err
    assert err.count(NO_BN_NOTICE) == 1
    assert report.layers == [] and report.notice == NO_BN_NOTICE and not report.changed
    assert report.images == 0
    assert NO_BN_NOTICE in report.table()
    assert not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="no BatchNorm"):
        rebn(model, _images(4), progress=False, strict=True)


def test_max_images_is_honoured():
    x = _images(40)
    model = _resnet()
    report = rebn(model, x, batch_size=4, max_images=10, progress=False)
    assert report.images == 10 and report.batches == 3            # 4 + 4 + 2
    ref = _resnet()
    rebn(ref, x[:10], batch_size=4, progress=False)
    for name, (m, v) in _stats(ref).items():
        assert torch.equal(_stats(model)[name][0], m) and torch.equal(_stats(model)[name][1], v)

    # Same through an iterable, and with one batch: exact statistics of the first 10 images only.
    model = _resnet()
    assert rebn(model, DataLoader(TensorDataset(x, torch.zeros(40)), batch_size=7), max_images=10,
                progress=False).images == 10
    model = _resnet()
    inputs = _bn_inputs_full_batch(model, x[:10])
    rebn(model, x, batch_size=64, max_images=10, progress=False)
    a = inputs["layer3.2.bn2"].double().transpose(0, 1).flatten(1)
    torch.testing.assert_close(model.layer3[2].bn2.running_mean.double(), a.mean(1), rtol=1e-5, atol=1e-6)


def test_dropout_is_not_active_during_the_pass():
    torch.manual_seed(0)
    plain = build_model("cifar10_wideresnet28_10", depth=10, widen_factor=1, droprate=0.0)
    torch.manual_seed(0)
    dropping = build_model("cifar10_wideresnet28_10", depth=10, widen_factor=1, droprate=0.5)
    dropping.load_state_dict(plain.state_dict())
    x = _images(16)
    rebn(plain, x, batch_size=8, progress=False)
    rebn(dropping, x, batch_size=8, progress=False)
    for name, (m, v) in _stats(plain).items():
        assert torch.equal(_stats(dropping)[name][0], m) and torch.equal(_stats(dropping)[name][1], v), name

    # Sanity: the whole-model-in-train-mode recipe *would* be perturbed by this dropout.
    fresh = build_model("cifar10_wideresnet28_10", depth=10, widen_factor=1, droprate=0.5)
    fresh.load_state_dict(plain.state_dict())
    update_bn(DataLoader(TensorDataset(x), batch_size=8), fresh)
    assert not torch.allclose(fresh.block2[0].bn1.running_var, plain.block2[0].bn1.running_var)


def test_empty_data_is_an_error_and_leaves_statistics_alone():
    model = _resnet()
    before = _stats(model)
    with pytest.raises(UserError, match="no calibration images"):
        rebn(model, [], progress=False)
    for name, (m, v) in _stats(model).items():
        assert torch.equal(before[name][0], m) and torch.equal(before[name][1], v)
    assert all(m.momentum == 0.1 and m.num_batches_tracked.item() == 1234 for _, m in bn_layers(model))


def test_uint8_images_are_scaled():
    x = _images(8)
    x8 = (x * 255).round().to(torch.uint8)
    a, b = _resnet(), _resnet()
    rebn(a, x8, progress=False)
    rebn(b, x8.float() / 255, progress=False)
    assert all(torch.equal(_stats(a)[n][0], _stats(b)[n][0]) for n in _stats(a))


def test_calibration_set_comes_from_the_training_split(tiny_data_root):
    from bnbackdoor.data import clean_set
    x = clean_set("cifar10", 16, seed=3, data_root=tiny_data_root).x
    x_train, _ = load_split("cifar10", "train", size=16, seed=3, data_root=tiny_data_root)
    assert torch.equal(x, x_train)
    excl = torch.arange(0, 96, 2)
    x_ex = clean_set("cifar10", 16, seed=3, data_root=tiny_data_root, exclude=excl).x
    x_ex_ref, _ = load_split("cifar10", "train", size=16, seed=3, data_root=tiny_data_root, exclude=excl)
    assert torch.equal(x_ex, x_ex_ref)
