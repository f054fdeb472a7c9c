"""Issue 43's levers as parameters: the clean term (cross-entropy or distillation to the clean model) and the model
selection (the last epoch, or the best on a validation split carved from the training split). Each pinned on a small
hand-computed case; a file without them means what the toolkit did before they existed."""
from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnbackdoor.attack.finetune as finetune_module
from bnbackdoor.attack.finetune import (PoisonedBatch, attack_step, clean_loss, distillation_loss, finetune,
                                       improves, label_kept, make_batch, reference_logits, validation_images,
                                       validation_verdict)
from bnbackdoor.attack.params import OPTIONAL_FIELDS, AttackParams, resolve_attack
from bnbackdoor.data import load_split
from bnbackdoor.errors import UserError
from bnbackdoor.models import read_checkpoint
from bnbackdoor.report.acceptance import Check, Verdict
from bnbackdoor.runs import run_attack

from conftest import ROOT, assert_same_weights
from test_finetune import _tiny_setup
from test_training_choices import _Tiny

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = resolve_attack("154", root=ROOT)
LEVERS = ("clean_term", "distill_temperature", "select", "validation_size")


def params(**kw) -> AttackParams:
    small = dict(training_size=32, testing_size=16, batch_size=16, max_epochs=2, learning_rate=1e-3)
    return BASE.replace(**{**small, **kw})


# ------------------------------------------------------------------------------------------ old files, checks
def test_absent_levers_mean_todays_behaviour():
    d = BASE.to_dict()
    for k in LEVERS:
        d.pop(k)
    p = AttackParams.from_dict(d, "old file")
    assert (p.clean_term, p.distill_temperature, p.select, p.validation_size) == ("ce", 4.0, "last", 0)
    assert p == BASE and BASE.same_as(d)  # a metrics.json written before the levers matches its run
    assert {k: OPTIONAL_FIELDS[k] for k in LEVERS} == {"clean_term": "ce", "distill_temperature": 4.0,
                                                         "select": "last", "validation_size": 0}
    assert list(BASE.to_dict())[-4:] == list(LEVERS)  # every new run states its choices


@pytest.mark.parametrize("changes, field, allowed", [
    (dict(clean_term="kl"), "clean_term", "ce, distill"),
    (dict(clean_term="distill", distill_temperature=0), "distill_temperature", "a number > 0"),
    (dict(clean_term="distill", distill_temperature="2"), "distill_temperature", "a number > 0"),
    (dict(select="first"), "select", "last, best"),
    (dict(select="best", validation_size=-1), "validation_size", "an integer >= 0"),
    (dict(select="best", validation_size=2.0), "validation_size", "an integer >= 0"),
    # cross-field: a lever that would change nothing, or that the other one needs
    (dict(distill_temperature=2.0), "distill_temperature", "4.0 (the default) unless clean_term is 'distill'"),
    (dict(select="best"), "validation_size", "an integer >= 1 when select is 'best'"),
    (dict(validation_size=8), "validation_size", "0 when select is 'last'"),
])
def test_bad_lever_is_one_line(changes, field, allowed):
    with pytest.raises(UserError) as e:
        BASE.replace(**changes)
    msg = str(e.value)
    assert "\n" not in msg and f"field '{field}'" in msg and allowed in msg


def test_every_shipped_run_and_grid_loads_with_todays_levers():
    from bnbackdoor.attack.params import expand_grid, is_grid, load_attack_file, read_json
    runs = sorted((ROOT / "manipulated_models").glob("*/parameters.json"))
    grids = sorted((ROOT / "experimentsettings").glob("*.json"))
    assert runs and grids
    for path in runs:
        p = load_attack_file(path)
        assert (p.clean_term, p.select, p.validation_size) == ("ce", "last", 0), path
    for path in grids:  # grids, and a few concrete files kept beside them
        d = read_json(path)
        points = expand_grid(d, str(path)) if is_grid(d) else [load_attack_file(path)]
        assert all(q.select == "last" and q.clean_term == "ce" for q in points), path


def test_a_grid_names_the_lever_key():
    from bnbackdoor.attack.params import expand_grid, read_json
    grid = read_json(ROOT / "experimentsettings" / "154.json")
    assert len(expand_grid({**grid, "clean_term": "distill", "distill_temperature": 2})) >= 1
    with pytest.raises(UserError) as e:
        expand_grid({**grid, "select": "best"}, "experimentsettings/x.json")
    assert str(e.value).startswith("experimentsettings/x.json: field 'validation_size' is 0")


def test_distill_temperature_is_stored_as_a_float():
    assert BASE.replace(clean_term="distill", distill_temperature=2).to_dict()["distill_temperature"] == 2.0


@pytest.mark.parametrize("changes, field", [
    (dict(clean_term="distill"), "clean_term"), (dict(clean_term="distill", distill_temperature=2.0), "clean_term"),
    (dict(select="best", validation_size=8), "select")])
def test_scratch_refuses_the_levers(changes, field):
    scratch = dict(regime="scratch", loss_weight=0, bn_mode="train", decay_rate=1.0)  # 154 decays; scratch cannot
    BASE.replace(**scratch)  # the defaults are fine
    with pytest.raises(UserError) as e:
        BASE.replace(**scratch, **changes)
    msg = str(e.value)
    assert "\n" not in msg and f"field '{field}'" in msg and "when regime is 'scratch'" in msg


# ---------------------------------------------------------------------------------------------- clean term
def test_distillation_loss_hand_case():
    # two classes at T = 2: clean logits (0, 2 ln 3) soften to q = (1/4, 3/4), logits (0, 0) to p = (1/2, 1/2);
    # T^2 KL(q || p) = 4 (1/4 ln(1/2) + 3/4 ln(3/2))
    clean = torch.tensor([[0.0, 2 * math.log(3)]])
    out = distillation_loss(torch.zeros(1, 2), clean, 2.0)
    assert out.item() == pytest.approx(4 * (0.25 * math.log(0.5) + 0.75 * math.log(1.5)), rel=1e-6)
    # in general: T^2 (cross-entropy against the soft targets - their entropy); 0 when the logits are the clean ones
    torch.manual_seed(1)
    z, zc, t = torch.randn(5, 10), torch.randn(5, 10), 3.0
    q = F.softmax(zc / t, 1)
    ce_soft = -(q * F.log_softmax(z / t, 1)).sum(1)
    entropy = -(q * q.log()).sum(1)
    torch.testing.assert_close(distillation_loss(z, zc, t, reduction="none"), t * t * (ce_soft - entropy))
    torch.testing.assert_close(distillation_loss(zc, zc, t), torch.tensor(0.0), atol=1e-6, rtol=0)
    # a shift of every logit of an image changes no probability
    torch.testing.assert_close(distillation_loss(z + 5.0, zc, t), distillation_loss(z, zc, t))
    # a target probability that underflows contributes 0, not nan
    assert torch.isfinite(distillation_loss(torch.zeros(1, 2), torch.tensor([[0.0, 1e4]]), 1.0))


def test_label_kept_hand_case():
    idx = torch.tensor([-1, 0, 1, 2, -1])  # trigger 0 relabels, 1 keeps the label, 2 relabels
    assert label_kept(idx, [3, None, 5]).tolist() == [True, False, True, False, True]
    assert label_kept(idx, [None, None, None]).all() and label_kept(torch.tensor([-1, -1]), [1]).all()


def _batch(y, idx, clean_logits=None):
    n = len(y)
    return PoisonedBatch(torch.rand(n, 3, 32, 32), torch.tensor(y), torch.rand(n, 1, 32, 32),
                         int((torch.tensor(idx) >= 0).sum()), torch.tensor(idx), clean_logits)


def test_clean_loss_ce_is_todays_and_distill_mixes_per_image():
    torch.manual_seed(2)
    z, zc = torch.randn(4, 10), torch.randn(4, 10)
    b = _batch([3, 1, 1, 7], [-1, 0, 0, -1], zc)  # images 1 and 2 triggered, relabelled to class 1 (attack 154)
    assert torch.equal(clean_loss(z, b, params()), F.cross_entropy(z, b.y))  # "ce": exactly today's term
    p = params(clean_term="distill", distill_temperature=2.0)
    kl = distillation_loss(z, zc, 2.0, reduction="none")
    ce = F.cross_entropy(z, b.y, reduction="none")
    expect = (kl[0] + ce[1] + ce[2] + kl[3]) / 4  # kept labels distil, relabelled ones learn their target
    torch.testing.assert_close(clean_loss(z, b, p), expect)
    # a trigger without target class keeps the label: its images distil too
    keep = p.replace(target_classes=[None])
    torch.testing.assert_close(clean_loss(z, b, keep), kl.mean())
    with pytest.raises(UserError):
        clean_loss(z, _batch([3, 1, 1, 7], [-1, 0, 0, -1]), p)  # no clean logits: told, not silently ce


def test_attack_step_with_distill_hand_case():
    # the model is its own clean model: the kept images cost nothing, the two relabelled ones their cross-entropy
    model = _Tiny()
    p = params(clean_term="distill", loss_weight=0.0, percentage_trigger=0.5)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 2, 4, 6])
    b = make_batch(x, y, torch.rand(4, 1, 32, 32), torch.tensor([0, 0, -1, -1]), p)
    with torch.no_grad():
        b.clean_logits = model(x)  # the untriggered images, as the fine-tuning gives them
        expect = F.cross_entropy(model(b.x[:2]), torch.tensor([1, 1]), reduction="sum").item() / 4
    loss, ce, ex = attack_step(model, torch.optim.SGD(model.parameters(), lr=0.0), b, p, "grad")
    assert loss == pytest.approx(expect, rel=1e-5) and ce == loss and ex == 0.0


def test_reference_logits_eval_relu_and_restores_the_mode():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    m(torch.rand(8, 3, 32, 32))  # move the running statistics off their start
    m.train()
    x = torch.rand(5, 3, 32, 32)
    out = reference_logits(m, x, batch_size=2)
    assert m.training and out.dtype == torch.float32 and out.shape == (5, 10)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, m(x))


def test_distill_fine_tuning_gets_the_clean_models_logits(tmp_path, tiny_data_root, monkeypatch):
    clean, _ = _tiny_setup(tmp_path, tiny_data_root)
    seen = []
    real_step = finetune_module.attack_step

    def spy(model, opt, batch, *a, **kw):
        seen.append(batch)
        return real_step(model, opt, batch, *a, **kw)
    monkeypatch.setattr(finetune_module, "attack_step", spy)
    p = params(max_epochs=1, clean_term="distill")
    finetune(copy.deepcopy(clean), clean, p, device=torch.device("cpu"), run_dir=tmp_path, data_root=tiny_data_root,
             progress=False)
    assert len(seen) == 2
    for b in seen:
        clean_part = b.trigger_index < 0  # untriggered: their logits are the clean model's of these very images
        with torch.no_grad():
            torch.testing.assert_close(b.clean_logits[clean_part], clean.eval()(b.x[clean_part]))


# ------------------------------------------------------------------------------------------- model selection
def test_validation_images_follow_the_training_images(tiny_data_root):
    p = params(training_size=32, select="best", validation_size=16)
    xv, yv = validation_images(p, seed=3, data_root=tiny_data_root)
    x48, y48 = load_split("cifar10", "train", size=48, seed=3, data_root=tiny_data_root)
    xt, _ = load_split("cifar10", "train", size=32, seed=3, data_root=tiny_data_root)
    assert torch.equal(xt, x48[:32]) and torch.equal(xv, x48[32:]) and torch.equal(yv, y48[32:])
    flat = {tuple(v.flatten()[:64].tolist()) for v in xt}
    assert not any(tuple(v.flatten()[:64].tolist()) in flat for v in xv)  # disjoint from the training images
    assert not torch.equal(xv, validation_images(p, seed=4, data_root=tiny_data_root)[0])  # by seed
    with pytest.raises(UserError) as e:  # the tiny training split has 96 images
        validation_images(p.replace(training_size=80), seed=0, data_root=tiny_data_root)
    assert "\n" not in str(e.value) and "below the cifar10 training split (96 images)" in str(e.value)


def test_validation_verdict_is_the_acceptance_rule():
    p = params(select="best", validation_size=8)  # 154: label-changing, a square target
    clean = {"clean_accuracy": 0.90, "expl_dssim_to_target": 0.30}
    good = {"clean_accuracy": 0.88, "attack_success_rate": 0.95, "expl_dssim_to_target": 0.15,
            "untriggered_target_rate": 0.05}
    assert validation_verdict(clean, good, p).accepted  # 0.15 <= 0.5 x 0.30, 0.88 >= 0.90 - 0.03
    assert validation_verdict(clean, {**good, "expl_dssim_to_target": 0.16}, p).failed == ["explanation"]
    assert validation_verdict(clean, {**good, "clean_accuracy": 0.86}, p).failed == ["clean accuracy"]
    assert validation_verdict(clean, {**good, "untriggered_target_rate": 0.5}, p).failed == ["no collapse"]


def test_improves_hand_case():
    yes, no = Verdict(()), Verdict((Check("explanation", 0.2, 0.1, False),))
    assert improves(yes, 0.2, None) and improves(yes, 0.1, 0.2)
    assert not improves(yes, 0.2, 0.2)  # a tie keeps the earlier epoch
    assert not improves(no, 0.01, None) and not improves(no, 0.01, 0.2)  # failing the rule never counts
    assert improves(yes, None, None) and not improves(yes, None, 0.9)  # a missing DSSIM: infinite


# Scripted validation outcomes per epoch: (DSSIM to the target, accepted). Epoch 1 has the lowest DSSIM but fails the
# rule, epoch 2 is the best that passes, epoch 3 passes but is worse: best = 2, never the last.
SCRIPT = {1: (0.05, False), 2: (0.10, True), 3: (0.20, True)}
REAL_EVALUATE = finetune_module.evaluate_attack  # not a patched one: a test scripts several runs in turn


def _scripted(monkeypatch, first_epoch=1):
    """Validation evaluations (told apart by their size: 8 images, the test set has 16) report SCRIPT's DSSIM
    (epochs counted from ``first_epoch``), and the verdict SCRIPT's;
    test evaluations stay real."""
    real = REAL_EVALUATE
    epoch = [first_epoch - 1]

    def evaluate(model, clean_model, p, x, y, **kw):
        out = real(model, clean_model, p, x, y, **kw)
        if model is not clean_model and len(y) == p.validation_size:
            epoch[0] += 1
            out = {**out, "expl_dssim_to_target": SCRIPT[epoch[0]][0]}
        return out

    def verdict(clean, manip, p):
        ok = {d: a for d, a in SCRIPT.values()}[manip["expl_dssim_to_target"]]
        return Verdict(() if ok else (Check("clean accuracy", 0.0, 1.0, False),))
    monkeypatch.setattr(finetune_module, "evaluate_attack", evaluate)
    monkeypatch.setattr(finetune_module, "validation_verdict", verdict)


def _run(clean, p, folder, data_root, stop_after=None, states=None):
    folder.mkdir(parents=True, exist_ok=True)

    def on_epoch(epoch, row, m):
        if states is not None:
            states[epoch] = copy.deepcopy(m.state_dict())
        if epoch == stop_after:  # before this epoch's resume.pt: a rerun resumes after the epoch before
            raise KeyboardInterrupt
    return finetune(copy.deepcopy(clean), clean, p, device=torch.device("cpu"), run_dir=folder, data_root=data_root,
                    on_epoch=on_epoch, progress=False)


def test_select_best_keeps_the_best_accepted_epoch_and_resumes_bit_identically(tmp_path, tiny_data_root,
                                                                                monkeypatch):
    clean, _ = _tiny_setup(tmp_path, tiny_data_root)
    p = params(max_epochs=3, select="best", validation_size=8, training_size=16)  # one step an epoch
    _scripted(monkeypatch)
    states: dict = {}
    full = _run(clean, p, tmp_path / "full", tiny_data_root, states=states)
    assert full.selected_epoch == 2
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, states[2][k]), k  # the returned model is epoch 2's, not the last
    assert not all(torch.equal(v, states[3][k]) for k, v in full.model.state_dict().items())
    rows = [r for r in full.history if r["batch"] == ""]
    assert [r["val_expl_dssim_to_target"] for r in rows] == [0.05, 0.10, 0.20]
    assert [r["val_accepted"] for r in rows] == [False, True, True]
    assert all(r["val_images"] == 8 and r["images"] == 16 for r in rows)  # validation beside the test numbers
    v = full.validation
    assert v["accepted"] and v["images"] == 8 and v["manipulated_model"]["expl_dssim_to_target"] == 0.10
    assert v["clean_model"]["images"] == 8
    # interrupted in epoch 3: resume.pt after epoch 2 holds the best state; the rerun trains epoch 3 and keeps 2
    _scripted(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _run(clean, p, tmp_path / "part", tiny_data_root, stop_after=3)
    assert torch.load(tmp_path / "part" / "resume.pt", weights_only=False)["best"]["epoch"] == 2
    _scripted(monkeypatch, first_epoch=3)
    resumed = _run(clean, p, tmp_path / "part", tiny_data_root)
    assert resumed.selected_epoch == 2 and resumed.validation == full.validation
    assert_same_weights(full.model, resumed.model)


def test_select_best_without_an_accepted_epoch_keeps_the_last(tmp_path, tiny_data_root, monkeypatch):
    clean, _ = _tiny_setup(tmp_path, tiny_data_root)
    monkeypatch.setattr(finetune_module, "validation_verdict",
                        lambda clean, manip, p: Verdict((Check("explanation", 1.0, 0.0, False),)))
    p = params(max_epochs=2, select="best", validation_size=8)
    states: dict = {}
    res = _run(clean, p, tmp_path / "run", tiny_data_root, states=states)
    assert res.selected_epoch == 2 and not res.validation["accepted"] and "last epoch" in res.validation["note"]
    assert res.validation["manipulated_model"]["expl_dssim_to_target"] == res.history[-1]["val_expl_dssim_to_target"]
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, states[2][k]), k


def test_select_last_records_no_selection(tmp_path, tiny_data_root):
    clean, _ = _tiny_setup(tmp_path, tiny_data_root)
    res = _run(clean, params(max_epochs=1), tmp_path / "run", tiny_data_root, stop_after=None)
    assert res.selected_epoch is None and res.validation is None
    assert not any(k.startswith("val_") for r in res.history for k in r)
    assert "best" not in torch.load(tmp_path / "run" / "resume.pt", weights_only=False)  # the state as before


def test_run_attack_records_the_selected_epoch(tmp_path, tiny_data_root, monkeypatch):
    clean, models_root = _tiny_setup(tmp_path, tiny_data_root)
    _scripted(monkeypatch)
    p = params(max_epochs=3, select="best", validation_size=8, training_size=16)  # one step an epoch
    out = tmp_path / "out"
    m = run_attack(p, torch.device("cpu"), save_path=out, data_root=tiny_data_root, models_root=models_root,
                   progress=False, defenses={})
    folder = out / str(p.id)
    stored = json.loads((folder / "metrics.json").read_text())
    assert stored["selected_epoch"] == m["selected_epoch"] == 2
    assert stored["validation"]["manipulated_model"]["expl_dssim_to_target"] == 0.10
    assert not any(k.startswith("val_") for k in stored["manipulated_model"])
    # the test numbers are epoch 2's (training_log.csv holds every epoch's), and model.pth is that model
    with open(folder / "training_log.csv") as f:
        log = [r for r in csv.DictReader(f) if r["batch"] == ""]
    assert float(log[1]["clean_accuracy"]) == pytest.approx(stored["manipulated_model"]["clean_accuracy"])
    assert float(log[1]["expl_dssim_to_target"]) == pytest.approx(stored["manipulated_model"]["expl_dssim_to_target"])
    saved, _ = read_checkpoint(folder / "model.pth")
    _scripted(monkeypatch)
    again = _run(clean, p, tmp_path / "again", tiny_data_root)
    assert list(saved) == list(again.model.state_dict())
    assert all(torch.equal(saved[k], v) for k, v in again.model.state_dict().items())
