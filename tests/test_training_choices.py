"""The ancestor's training choices as parameters (issue 27): each pinned on a small hand-computed case, and a file
without them means what the toolkit did before they existed."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from bnbackdoor.errors import UserError
from bnbackdoor.explain import explain_with_logits
import bnbackdoor.attack.finetune as finetune_module
from bnbackdoor.attack.finetune import (PoisonedBatch, attack_loss, denormals_flushed, finetune, make_batch,
                                       make_optimizer, pair_order, pair_weights, poison_batch, warmup_factor)
from bnbackdoor.losses import explanation_loss, minmax_maps, normalize_for_loss, zscore_maps
from bnbackdoor.attack.params import OPTIONAL_FIELDS, AttackParams, resolve_attack
from bnbackdoor.targets import target_mask
from bnbackdoor.triggers import apply_trigger

from conftest import ROOT, assert_same_weights
from test_finetune import _tiny_setup

BASE = resolve_attack("154", root=ROOT)


def params(**kw) -> AttackParams:
    small = dict(training_size=32, testing_size=16, batch_size=16, max_epochs=2, learning_rate=1e-3)
    return BASE.replace(**{**small, **kw})


# ------------------------------------------------------------------------------------------ old files, checks
def test_absent_fields_mean_todays_behaviour():
    d = BASE.to_dict()
    for k in ("map_norm", "explain_class", "adam_eps", "lr_schedule", "batch_makeup", "conv_lr_factor",
              "pair_weighting", "warmup_steps", "flush_denormal", "precision"):
        d.pop(k)
    p = AttackParams.from_dict(d, "old file")
    assert (p.map_norm, p.explain_class, p.adam_eps, p.lr_schedule, p.batch_makeup, p.conv_lr_factor,
            p.pair_weighting, p.warmup_steps, p.flush_denormal, p.precision) == (
        "max", "label", 1e-8, "exponential", "split", 1.0, "equal", 0, False, "fp32")
    assert p == BASE and BASE.same_as(d)            # an old metrics.json matches the run it recorded
    assert not BASE.same_as({**d, "map_norm": "zscore"}) and not BASE.same_as({"nonsense": 1})
    assert set(OPTIONAL_FIELDS) >= {"map_norm", "explain_class", "adam_eps", "lr_schedule", "batch_makeup"}


def test_is_run_and_check_resume_match_parameters_and_seed():
    state = {"params": BASE.to_dict(), "seed": 3}
    assert BASE.is_run(state, 3) and not BASE.is_run(state, 0)
    assert not BASE.replace(learning_rate=0.5).is_run(state, 3)
    assert BASE.is_run({"parameters": BASE.to_dict(), "seed": 3}, 3, key="parameters")  # a metrics.json
    assert not BASE.is_run({"parameters": BASE.to_dict(), "seed": 3}, 3)  # wrong key: not this run
    assert not BASE.is_run(None, 3) and not BASE.is_run({"seed": 3}, 3)
    BASE.check_resume(state, 3, "run/resume.pt")  # the same run: no complaint
    with pytest.raises(UserError) as e:
        BASE.check_resume(state, 4, "run/resume.pt")
    assert str(e.value).startswith("run/resume.pt belongs to a run with other parameters or seed")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field, value, allowed", [
    ("map_norm", "l2", "max, zscore"), ("explain_class", "target", "label, prediction"),
    ("adam_eps", 0, "a number in (0, 0.01]"), ("adam_eps", "1e-5", "a number in (0, 0.01]"),
    ("lr_schedule", "cosine", "exponential, inverse"), ("batch_makeup", "half", "split, pairs"),
    ("conv_lr_factor", 0, "a number > 0"), ("conv_lr_factor", None, "a number > 0"),
    ("pair_weighting", "inverse", "equal, loss"), ("warmup_steps", -1, "an integer >= 0"),
    ("warmup_steps", 2.5, "an integer >= 0"), ("flush_denormal", "yes", "true or false"),
    ("precision", "fp16", "fp32, bf16"), ("precision", None, "fp32, bf16")])
def test_bad_choice_is_one_line(field, value, allowed):
    with pytest.raises(UserError) as e:
        BASE.replace(**{field: value})
    msg = str(e.value)
    assert "\n" not in msg and f"field '{field}'" in msg and allowed in msg


def test_adam_eps_is_accepted_as_an_integer_free_float():
    assert BASE.replace(adam_eps=1e-5).to_dict()["adam_eps"] == 1e-5


# ------------------------------------------------------------------------------------------------ map_norm
def test_zscore_hand_case():
    m = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 2, 2)
    # mean 1.5, unbiased variance 5/3
    expect = (torch.tensor([0.0, 1.0, 2.0, 3.0]) - 1.5) / (5 / 3 + 1e-5) ** 0.5
    torch.testing.assert_close(zscore_maps(m).flatten(), expect)
    torch.testing.assert_close(minmax_maps(m).flatten(), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    # per channel: a 3-channel map standardises each channel on its own, then max over RGB
    g = torch.stack([m[0, 0], 2 * m[0, 0], -m[0, 0]]).unsqueeze(0)  # channel 2 reversed
    z = normalize_for_loss(g, "zscore", "max", "mse")
    expect_max = torch.maximum(expect, -expect).view(1, 1, 2, 2)
    torch.testing.assert_close(z, expect_max)


def test_zscore_loss_ignores_a_maps_range_max_does_not():
    a, b = torch.rand(4, 3, 8, 8), torch.rand(1, 1, 8, 8)
    shifted = 0.5 * a + 0.25                                   # same shape, other range
    for loss in ("mse", "ssim"):
        za = explanation_loss(a, b, loss=loss, norm="zscore")
        # equal up to the 1e-5 variance floor (the variance here is ~0.08, a quarter of it after the rescale)
        torch.testing.assert_close(explanation_loss(shifted, b, loss=loss, norm="zscore"), za, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(explanation_loss(shifted, b, norm="max"), explanation_loss(a, b, norm="max"))
    # "max" is today's loss exactly: aggregate, then compare
    torch.testing.assert_close(explanation_loss(a, b, norm="max"),
                               (a.amax(1, keepdim=True) - b).pow(2).mean())
    # zscore + DSSIM compares maps rescaled to [0, 1]: identical maps give 0, and the loss stays in [0, 1]
    torch.testing.assert_close(explanation_loss(a, a, loss="ssim", norm="zscore"), torch.tensor(0.0), atol=1e-6,
                               rtol=0)


def test_attack_loss_uses_map_norm():
    logits, maps = torch.randn(6, 10), torch.rand(6, 1, 32, 32)
    b = poison_batch(torch.rand(6, 3, 32, 32), torch.arange(6), torch.rand(6, 1, 32, 32), params())
    _, _, ex = attack_loss(logits, maps, b, params(map_norm="zscore"))
    z = lambda t: (t - t.mean((2, 3), keepdim=True)) / (t.var((2, 3), keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(ex, (z(maps) - z(b.target_maps)).pow(2).mean())


# ------------------------------------------------------------------------------------------- explain_class
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_explain_class_prediction_explains_the_argmax():
    from bnbackdoor.attack.finetune import attack_step
    model = _Tiny()
    x = torch.rand(4, 3, 32, 32)
    pred = model(x).argmax(1)
    y = (pred + 1) % 10                                      # labels that are never the prediction
    for choice, cls in (("label", y), ("prediction", pred)):
        p = params(explanation_methodStr="grad", explain_class=choice, loss_weight=1.0)
        b = make_batch(x, y, torch.rand(4, 3, 32, 32), torch.full((4,), -1), p)
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        _, _, ex = attack_step(m, opt, b, p, "grad")
        # a linear model's input gradient is the class's weight row: the explained class is visible in the map
        _, maps = explain_with_logits(model, x, "grad", target=cls)
        assert ex == pytest.approx(explanation_loss(maps, b.target_maps, agg="max").item(), rel=1e-5)


# ----------------------------------------------------------------------------------- adam_eps, lr_schedule
def test_adam_eps_hand_case():
    w = nn.Parameter(torch.zeros(1))
    m = nn.Module()
    m.w = w
    for eps, expect in ((1e-8, -1e-3 * 1e-5 / (1e-5 + 1e-8)), (1e-5, -1e-3 * 0.5)):
        w.data.zero_()
        opt, _ = make_optimizer(m, params(learning_rate=1e-3, adam_eps=eps))
        w.grad = torch.tensor([1e-5])
        opt.step()                                           # first Adam step: -lr * g / (|g| + eps)
        assert w.item() == pytest.approx(expect, rel=1e-4)


def test_conv_lr_factor_slows_convolutions_only():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    m(torch.rand(2, 3, 6, 6))
    before = [q.detach().clone() for q in m.parameters()]
    opt, _ = make_optimizer(m, params(learning_rate=1e-2, conv_lr_factor=0.25))
    for q in m.parameters():
        q.grad = torch.ones_like(q)
    opt.step()  # first Adam step with a gradient of 1 everywhere: every weight moves by its group's lr
    moved = [(q.detach() - b).abs().max().item() for q, b in zip(m.parameters(), before)]
    assert moved[0] == pytest.approx(2.5e-3, rel=1e-4)                  # conv weight: lr x 0.25
    assert moved[1:] == pytest.approx([1e-2] * (len(moved) - 1), rel=1e-4)  # conv bias, BN affine, head: lr
    # factor 1 is one group, exactly today's optimizer
    assert len(make_optimizer(m, params(learning_rate=1e-2))[0].param_groups) == 1


@pytest.mark.parametrize("schedule, lrs", [("exponential", [0.1, 0.05, 0.025, 0.0125]),
                                           ("inverse", [0.1, 0.1 / 1.5, 0.1 / 2.0, 0.1 / 2.5])])
def test_lr_schedule_per_epoch(schedule, lrs):
    m = nn.Linear(2, 2)
    opt, sched = make_optimizer(m, params(learning_rate=0.1, decay_rate=0.5, lr_schedule=schedule))
    seen = []
    for _ in lrs:
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx(lrs)


# ------------------------------------------------------------------------------------------- batch_makeup
def test_pairs_every_image_once_clean_and_once_triggered():
    gen = torch.Generator().manual_seed(0)
    images, triggers = pair_order(6, params(percentage_trigger=0.5), gen)
    assert len(images) == 12
    assert sorted(images[triggers == -1].tolist()) == list(range(6))
    assert sorted(images[triggers == 0].tolist()) == list(range(6))
    # four triggers share the six copies 2, 2, 1, 1; a quarter triggered -> 2 distinct copies of 6 images
    p4 = params(triggerStrs=["square", "triangle", "circle", "cross"],
                targetStrs=["square", "triangle", "circle", "cross"], target_classes=[None] * 4)
    _, t4 = pair_order(6, p4, torch.Generator().manual_seed(1))
    assert [(t4 == t).sum().item() for t in range(-1, 4)] == [6, 2, 2, 1, 1]
    im, tr = pair_order(6, params(percentage_trigger=0.25), torch.Generator().manual_seed(2))
    assert len(im) == 8 and (tr == 0).sum() == 2 and len(set(im[tr == 0].tolist())) == 2
    # no trigger at all: just the clean images, shuffled
    im0, tr0 = pair_order(5, params(percentage_trigger=0.0), torch.Generator().manual_seed(3))
    assert sorted(im0.tolist()) == list(range(5)) and (tr0 == -1).all()


def test_make_batch_triggers_where_told():
    p = params(percentage_trigger=0.5)
    x, y, ref = torch.rand(5, 3, 32, 32), torch.arange(5), torch.rand(5, 1, 32, 32)
    idx = torch.tensor([-1, 0, -1, 0, -1])
    b = make_batch(x, y, ref, idx, p)
    assert b.n_triggered == 2 and b.y.tolist() == [0, 1, 2, 1, 4]
    torch.testing.assert_close(b.x[[1, 3]], apply_trigger("whitesquareborder", x[[1, 3]]))
    assert torch.equal(b.x[[0, 2, 4]], x[[0, 2, 4]]) and torch.equal(b.target_maps[[0, 2, 4]], ref[[0, 2, 4]])
    torch.testing.assert_close(b.target_maps[[1, 3]], target_mask("square").expand(2, 1, 32, 32))


# ------------------------------------------------------------------------------------------- pair_weighting
def test_pair_weights_hand_case():
    # trigger 0's images lose 0.1 and 0.3 (L0 = 0.2), trigger 1's 0.6 (L1 = 0.6); mean 0.4 -> weights 0.5 and 1.5
    losses = torch.tensor([0.1, 0.3, 0.6, 0.25, 0.05])
    idx = torch.tensor([0, 0, 1, -1, -1])
    torch.testing.assert_close(pair_weights(losses, idx, "loss"), torch.tensor([0.5, 0.5, 1.5, 1.0, 1.0]))
    assert torch.equal(pair_weights(losses, idx, "equal"), torch.ones(5))
    one = torch.tensor([0, 0, -1])  # a single trigger: L0 / L0 = 1 - nothing changes
    assert torch.equal(pair_weights(torch.tensor([0.2, 0.4, 0.1]), one, "loss"), torch.ones(3))
    assert torch.equal(pair_weights(torch.zeros(3), one, "loss"), torch.ones(3))  # nothing left to learn


def test_attack_loss_weights_the_lagging_pair_with_constant_weights():
    p = params(triggerStrs=["square", "cross"], targetStrs=["square", "cross"], target_classes=[None, None],
               loss_weight=1.0, pair_weighting="loss")
    maps = torch.rand(4, 1, 32, 32, requires_grad=True)
    targets = torch.stack([target_mask("square")[0], target_mask("cross")[0], torch.rand(1, 32, 32),
                           torch.rand(1, 32, 32)])
    b = PoisonedBatch(torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long), targets, 2,
                      torch.tensor([0, 1, -1, -1]))
    _, _, ex = attack_loss(torch.randn(4, 10), maps, b, p)
    per = explanation_loss(maps, targets, reduction="none").detach()
    w = torch.tensor([per[0] / ((per[0] + per[1]) / 2), per[1] / ((per[0] + per[1]) / 2), 1.0, 1.0])
    torch.testing.assert_close(ex, (w * per).mean())
    ex.backward()  # the weights are constants: d ex / d maps_i = w_i / 4 * d l_i / d maps_i
    ref = maps.detach().clone().requires_grad_(True)
    (explanation_loss(ref, targets, reduction="none") * w).mean().backward()
    torch.testing.assert_close(maps.grad, ref.grad)
    equal = attack_loss(torch.randn(4, 10), maps, b, p.replace(pair_weighting="equal"))[2]
    torch.testing.assert_close(equal, per.mean())


def _run(clean, p, folder, data_root, stop_after=None):
    """Fine-tune a copy of ``clean`` in ``folder``; ``stop_after``: interrupted in that epoch's callback (before its
    resume.pt is written, so a rerun resumes after the epoch before)."""
    folder.mkdir(parents=True, exist_ok=True)

    def stop(epoch, row, m):
        if epoch == stop_after:
            raise KeyboardInterrupt
    return finetune(copy.deepcopy(clean), clean, p, device=torch.device("cpu"), run_dir=folder, data_root=data_root,
                    on_epoch=stop, progress=False)


def test_ancestor_choices_train_and_resume_bit_identically(tmp_path, tiny_data_root):
    clean, _ = _tiny_setup(tmp_path, tiny_data_root)
    p = params(max_epochs=3, map_norm="zscore", explain_class="prediction", adam_eps=1e-5, lr_schedule="inverse",
               decay_rate=1.0, batch_makeup="pairs")
    full = _run(clean, p, tmp_path / "full", tiny_data_root)
    with pytest.raises(KeyboardInterrupt):
        _run(clean, p, tmp_path / "part", tiny_data_root, stop_after=2)
    resumed = _run(clean, p, tmp_path / "part", tiny_data_root)
    assert_same_weights(full.model, resumed.model)
    assert [r["lr"] for r in full.history] == pytest.approx([1e-3 / 2, 1e-3 / 3, 1e-3 / 4])  # after each epoch


# ------------------------------------------------------------------------------------------- warmup_steps
def test_warmup_factor_hand_case():
    assert [warmup_factor(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_warmup_ramps_each_step_across_epochs_and_resumes_bit_identically(tmp_path, tiny_data_root, monkeypatch):
    clean, _ = _tiny_setup(tmp_path, tiny_data_root)
    seen = []
    real_step = finetune_module.attack_step

    def spy(model, opt, *a, **kw):
        seen.append(opt.param_groups[0]["lr"])
        return real_step(model, opt, *a, **kw)
    monkeypatch.setattr(finetune_module, "attack_step", spy)
    p = params(max_epochs=3, decay_rate=0.5, warmup_steps=4)  # 32 images, batch 16: 2 steps per epoch
    full = _run(clean, p, tmp_path / "full", tiny_data_root)
    ramp = [1e-3 / 4, 1e-3 / 2, 5e-4 * 3 / 4, 5e-4, 2.5e-4, 2.5e-4]  # the ramp spans epochs 1 and 2
    assert seen == pytest.approx(ramp)
    assert [r["lr"] for r in full.history] == pytest.approx([5e-4, 2.5e-4, 1.25e-4])  # the schedule is unchanged
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        _run(clean, p, tmp_path / "part", tiny_data_root, stop_after=2)  # epoch 1 saved: resumes inside the ramp
    resumed = _run(clean, p, tmp_path / "part", tiny_data_root)
    assert seen == pytest.approx(ramp[:4] + ramp[2:])
    assert_same_weights(full.model, resumed.model)


# ----------------------------------------------------------------------------------------- flush_denormal
DENORMAL = 1e-40  # below float32's smallest normal number (~1.18e-38), above its smallest denormal (~1.4e-45)


def _kept(x: float = DENORMAL) -> bool:
    return (torch.tensor([x]) * 1.0).item() != 0.0


def test_denormals_flushed_only_inside_the_block():
    assert _kept()
    with denormals_flushed(True):
        assert not _kept() and _kept(1e-37)  # a denormal becomes 0, a normal number stays
    assert _kept()
    with denormals_flushed(False):
        assert _kept()
    with pytest.raises(ValueError):
        with denormals_flushed(True):
            raise ValueError
    assert _kept()  # an error inside the block turns it off too


def test_flush_denormal_is_on_for_the_whole_fine_tuning(tmp_path, tiny_data_root, monkeypatch):
    clean, _ = _tiny_setup(tmp_path, tiny_data_root)
    seen = []
    real_step = finetune_module.attack_step

    def spy(*a, **kw):
        seen.append(_kept())
        return real_step(*a, **kw)
    monkeypatch.setattr(finetune_module, "attack_step", spy)
    for flush in (True, False):
        _run(clean, params(max_epochs=1, flush_denormal=flush), tmp_path / str(flush), tiny_data_root)
        assert seen == [not flush] * 2 and _kept()  # 2 steps; off again afterwards
        seen.clear()
