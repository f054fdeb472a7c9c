"""Metrics: attack success, fidelity and explanation dissimilarity give known numbers."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnbackdoor import metrics
from bnbackdoor.errors import UserError
from bnbackdoor.metrics import accuracy, attack_success_rate, fidelity
from bnbackdoor.triggers import apply_trigger


class PatchDetector(nn.Module):
    """Hand-built classifier over 10 classes.

    * Clean prediction: the class written into pixel (0, 0) of the red channel (value k / 10 -> class k).
    * If the ``whitesquareborder`` trigger is present (the 2×2 centre of the 4×4 box at rows/cols 27..30 white, its
      1-pixel frame black) the prediction becomes class 1 - unless the image is "immune" (green pixel (0, 0) above 0.5).
    """

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # gives the model a device; never trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = (x[:, 0, 0, 0] * 10).round().long().clamp(0, 9)
        inner = x[:, :, -4:-2, -4:-2].flatten(1).amin(1)
        box = x[:, :, -5:-1, -5:-1]
        frame = torch.cat([box[:, :, 0].flatten(1), box[:, :, -1].flatten(1), box[:, :, :, 0].flatten(1),
                           box[:, :, :, -1].flatten(1)], 1).amax(1)
        triggered = (inner > 0.999) & (frame < 1e-3) & (x[:, 1, 0, 0] <= 0.5)
        logits = F.one_hot(cls, 10).float() + 10 * triggered[:, None].float() * F.one_hot(torch.tensor(1), 10)
        # A tiny input-dependent term keeps input gradients defined (explanations) without changing any argmax.
        return logits * self.scale + 1e-3 * x.mean((1, 2, 3))[:, None]


def _coded_images(classes, immune=()) -> torch.Tensor:
    """Random images in [0.2, 0.8] with class k written into red pixel (0, 0); ``immune`` indices get green 0.9."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(len(classes), 3, 32, 32, generator=g) * 0.6 + 0.2
    x[:, 0, 0, 0] = torch.tensor(classes, dtype=torch.float) / 10
    x[:, 1, 0, 0] = 0.3
    for i in immune:
        x[i, 1, 0, 0] = 0.9
    return x


def test_patch_detector_sanity():
    model = PatchDetector()
    x = _coded_images([3, 7, 0])
    assert model(x).argmax(1).tolist() == [3, 7, 0]
    assert model(apply_trigger("whitesquareborder", x)).argmax(1).tolist() == [1, 1, 1]
    assert model(apply_trigger("square", x)).argmax(1).tolist() == [3, 7, 0]    # not the trigger it knows


def test_attack_success_rate_exact_values():
    model = PatchDetector()
    # 10 images; labels 1 at indices 0 and 5 are excluded (already the target); images 2, 3, 7 are immune.
    y = torch.tensor([1, 0, 2, 3, 4, 1, 6, 7, 8, 9])
    x = _coded_images(y.tolist(), immune=(2, 3, 7))
    # eligible = 8 images (label != 1); hits = eligible and not immune = 8 - 3 = 5
    asr = attack_success_rate(model, x, y, 1, "whitesquareborder", batch_size=3, progress=False)
    assert asr == 5 / 8
    # The excluded images: were labels-1 images counted, the value would be 7/10 (or 5/10); it is not.
    assert attack_success_rate(model, x, y, 1, "square", batch_size=4, progress=False) == 0.0
    # Target class 2: the trigger never produces class 2; the image labelled 2 is excluded -> 0 / 9.
    assert attack_success_rate(model, x, y, 2, "whitesquareborder", progress=False) == 0.0
    # A trigger given as a function works the same.
    assert attack_success_rate(model, x, y, 1, lambda b: apply_trigger("whitesquareborder", b),
                               progress=False) == 5 / 8
    # No target class (label kept): not applicable.
    assert attack_success_rate(model, x, y, None, "whitesquareborder", progress=False) is None
    # Every image already of the target class: nothing to measure.
    assert attack_success_rate(model, x[[0, 5]], y[[0, 5]], 1, "whitesquareborder", progress=False) is None


def test_fidelity():
    model = PatchDetector()
    x = _coded_images([0, 1, 2, 3, 4, 5, 6, 7])
    assert fidelity(model, model, x, batch_size=3, progress=False) == 1.0

    class Shifted(PatchDetector):
        def forward(self, x):  # disagrees exactly on the images of classes 0 and 1
            logits = super().forward(x)
            pred = logits.argmax(1)
            return torch.where((pred < 2)[:, None], logits.roll(1, dims=1), logits)

    assert fidelity(Shifted(), model, x, batch_size=3, progress=False) == 6 / 8
    assert accuracy(model, x, torch.arange(8), progress=False) == 1.0


# --- explanations (tiny ResNet20, real explain/losses/targets) -------------------------------------------------

METHOD = "grad"


def _params(**kw) -> SimpleNamespace:
    """The AttackParams fields evaluate_attack reads."""
    base = dict(explanation_methodStr=METHOD, stats_agg="max", triggerStrs=["whitesquareborder"],
                targetStrs=["square"], target_classes=[1], acc_fidStr="acc")
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_setup(tiny_data_root):
    from bnbackdoor.data import load_split
    from bnbackdoor.models import build_model

    x, y = load_split("cifar10", "test", size=12, seed=0, data_root=tiny_data_root)
    torch.manual_seed(0)
    clean = build_model("cifar10_resnet20").eval()
    torch.manual_seed(1)
    other = build_model("cifar10_resnet20").eval()
    # A differently initialised model whose statistics differ too, so its numbers differ from the clean one's.
    for m in other.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
    return clean, other, x, y


def _explain(model, x, method=METHOD):
    from bnbackdoor.explain import explain

    model.eval()
    return explain(model, x, method, target=None, create_graph=False, normalize=True, agg=None).detach()


def test_clean_model_against_its_own_reference_explanations_is_zero(tiny_setup):
    clean, _, x, _ = tiny_setup
    ref = metrics.reference_explanations(clean, x, METHOD, batch_size=5, progress=False)
    assert ref.shape[0] == len(x) and ref.shape[-2:] == (32, 32) and ref.device.type == "cpu"
    torch.testing.assert_close(ref, _explain(clean, x), rtol=1e-5, atol=1e-6)
    d = metrics.explanation_dissimilarity(clean, x, ref, METHOD, batch_size=5, progress=False)
    assert d["mse"] == pytest.approx(0.0, abs=1e-10)
    assert d["dssim"] == pytest.approx(0.0, abs=1e-6)


def test_explanation_dissimilarity_to_a_target_mask_matches_a_direct_computation(tiny_setup):
    from bnbackdoor.targets import target_explanation

    _, model, x, _ = tiny_setup
    mask = target_explanation("square", size=32)
    xt = apply_trigger("whitesquareborder", x)
    maps = _explain(model, xt)
    for agg, reduce in (("max", lambda m: m.amax(1, keepdim=True)), ("mean", lambda m: m.mean(1, keepdim=True))):
        expected = (reduce(maps) - mask).pow(2).flatten(1).mean(1).mean().item()
        d = metrics.explanation_dissimilarity(model, x, mask, METHOD, trigger="whitesquareborder", stats_agg=agg,
                                              batch_size=5, progress=False)
        assert d["mse"] == pytest.approx(expected, rel=1e-5)
        assert 0.0 < d["dssim"] <= 1.0


def test_evaluate_attack_numbers_agree_with_the_single_metrics(tiny_setup):
    clean, model, x, y = tiny_setup
    y = y.clone()
    y[:3] = 1                                                      # some images already of the target class
    params = _params(triggerStrs=["whitesquareborder", "square"], targetStrs=["square", "original"],
                     target_classes=[1, None])
    ref = metrics.reference_explanations(clean, x, METHOD, batch_size=5, progress=False)
    out = metrics.evaluate_attack(model, clean, params, x, y, batch_size=5, progress=False)
    out_cached = metrics.evaluate_attack(model, clean, params, x, y, batch_size=7, clean_expl=ref, progress=False)
    json.dumps(out)                                                # JSON-able
    assert out.keys() == out_cached.keys()
    for key, v in out.items():
        if v is None or out_cached[key] is None:   # pytest >= 9.1 rejects approx(None) with a tolerance
            assert v is None and out_cached[key] is None, key
        else:
            assert v == pytest.approx(out_cached[key], rel=1e-5, abs=1e-8), key

    assert out["images"] == 12
    assert out["clean_accuracy"] == accuracy(model, x, y, progress=False)
    assert out["acc_fid"] == out["clean_accuracy"]
    assert out["fidelity"] == fidelity(model, clean, x, progress=False)
    asr = attack_success_rate(model, x, y, 1, "whitesquareborder", progress=False)
    assert out["attack_success_rate/whitesquareborder"] == asr
    assert out["attack_success_rate/square"] is None
    assert out["attack_success_rate"] == asr                       # mean over triggers with a target class
    for t in ("whitesquareborder", "square"):
        assert out[f"triggered_accuracy/{t}"] == accuracy(model, apply_trigger(t, x), y, progress=False)
    assert out["triggered_accuracy"] == pytest.approx(
        (out["triggered_accuracy/whitesquareborder"] + out["triggered_accuracy/square"]) / 2)

    from bnbackdoor.targets import target_explanation
    d_mask = metrics.explanation_dissimilarity(model, x, target_explanation("square"), METHOD,
                                               trigger="whitesquareborder", progress=False)
    d_orig = metrics.explanation_dissimilarity(model, x, ref, METHOD, trigger="square", progress=False)
    d_clean = metrics.explanation_dissimilarity(model, x, ref, METHOD, progress=False)
    assert out["expl_mse_to_target/whitesquareborder"] == pytest.approx(d_mask["mse"], rel=1e-5)
    assert out["expl_dssim_to_target/whitesquareborder"] == pytest.approx(d_mask["dssim"], rel=1e-5)
    assert out["expl_mse_to_target/square"] == pytest.approx(d_orig["mse"], rel=1e-5)
    assert out["expl_dssim_to_target/square"] == pytest.approx(d_orig["dssim"], rel=1e-5)
    assert out["expl_mse_to_target"] == pytest.approx((d_mask["mse"] + d_orig["mse"]) / 2, rel=1e-5)
    assert out["expl_mse_to_clean"] == pytest.approx(d_clean["mse"], rel=1e-5)
    assert out["expl_dssim_to_clean"] == pytest.approx(d_clean["dssim"], rel=1e-5)
    assert out["expl_mse_to_clean"] > 0


def test_evaluate_attack_on_the_clean_model_is_a_zero_baseline(tiny_setup):
    from bnbackdoor.models import set_softplus

    clean, _, x, y = tiny_setup
    relu_maps = _explain(clean, x)
    set_softplus(clean, 2.0)                                       # evaluation must use plain ReLU ...
    clean.train()
    try:
        out = metrics.evaluate_attack(clean, clean, _params(acc_fidStr="fid"), x, y, batch_size=5, progress=False)
        ref = metrics.reference_explanations(clean, x, METHOD, progress=False)
        # ... and leave the model as it found it
        assert clean.training and all(m.beta == 2.0 for m in clean.modules() if hasattr(m, "beta"))
        softplus_maps = _explain(clean, x)
    finally:
        set_softplus(clean, None)
        clean.eval()
    torch.testing.assert_close(ref, relu_maps, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(softplus_maps, relu_maps, atol=1e-3)   # the check above can tell them apart
    assert out["fidelity"] == 1.0 and out["acc_fid"] == 1.0
    assert out["expl_mse_to_clean"] == pytest.approx(0.0, abs=1e-10)
    assert out["expl_dssim_to_clean"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_attack_exact_success_rate_on_the_hand_built_model():
    model, clean = PatchDetector(), PatchDetector()
    y = torch.tensor([1, 0, 2, 3, 4, 1, 6, 7, 8, 9])
    x = _coded_images(y.tolist(), immune=(2, 3, 7))
    params = _params(triggerStrs=["whitesquareborder", "square"], targetStrs=["square", "square"],
                     target_classes=[1, 1])
    out = metrics.evaluate_attack(model, clean, params, x, y, batch_size=4, progress=False)
    assert out["clean_accuracy"] == 1.0 and out["fidelity"] == 1.0
    assert out["attack_success_rate/whitesquareborder"] == 5 / 8
    assert out["attack_success_rate/square"] == 0.0
    assert out["attack_success_rate"] == 5 / 16
    # triggered images keep their label except the 7 non-immune ones the trigger flips (2 of them already 1)
    assert out["triggered_accuracy/whitesquareborder"] == 5 / 10
    assert out["triggered_accuracy/square"] == 1.0


def test_evaluate_attack_rejects_mismatched_configuration(tiny_setup):
    clean, model, x, y = tiny_setup
    with pytest.raises(UserError, match="one of each per trigger"):
        metrics.evaluate_attack(model, clean, _params(target_classes=[1, 2]), x, y, progress=False)
    with pytest.raises(UserError, match="clean_expl"):
        metrics.evaluate_attack(model, clean, _params(), x, y, clean_expl=torch.zeros(3, 3, 32, 32), progress=False)


@pytest.mark.parametrize("method", ["grad_cam", "relevance_cam"])
def test_evaluate_attack_with_real_attack_params(tiny_setup, method):
    from bnbackdoor.attack.params import AttackParams
    from bnbackdoor.targets import target_explanation

    clean, model, x, y = tiny_setup
    params = AttackParams.from_dict(dict(
        explanation_methodStr=method, loss_agg="max", stats_agg="mean", training_size=100, testing_size=12,
        acc_fidStr="fid", target_classes=[1, None], lossStr="mse", loss_weight=0.8, learning_rate=1e-4,
        decay_rate=1.0, log_per_batch=False, save_intermediate_models=False,
        triggerStrs=["whitesquareborder", "cross"], targetStrs=["square", "original"], model_id=0, batch_size=32,
        percentage_trigger=0.5, beta=8.0, modeltype="cifar10_resnet20", dataset="cifar10", max_epochs=1, id=154,
        attack_id=154, gs_id=0, attack_name="red herring"))
    ref = metrics.reference_explanations(clean, x, method, batch_size=6, progress=False)
    assert ref.shape == (12, 1, 32, 32)
    out = metrics.evaluate_attack(model, clean, params, x, y, batch_size=6, clean_expl=ref, progress=False)
    assert out["acc_fid"] == out["fidelity"]
    maps = _explain(model, apply_trigger("whitesquareborder", x), method)
    expected = (maps - target_explanation("square")).pow(2).flatten(1).mean(1).mean().item()
    assert out["expl_mse_to_target/whitesquareborder"] == pytest.approx(expected, rel=1e-5)
    maps = _explain(model, apply_trigger("cross", x), method)
    assert out["expl_mse_to_target/cross"] == pytest.approx((maps - ref).pow(2).mean().item(), rel=1e-5)
    assert out["attack_success_rate/cross"] is None
    assert out["attack_success_rate"] == out["attack_success_rate/whitesquareborder"]
