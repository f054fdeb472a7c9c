"""Stronger baseline defenses (RNP, FT-SAM, I-BAU, NAD) and ``finetune(freeze_bn_stats)``: each one's defining
property on tiny constructed networks and synthetic tensors, against hand computations."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from conftest import state_copy, toy_clean_set
from bnbackdoor.defenses import CleanSet, apply_defense
from bnbackdoor.defenses.common import clean_loss
from bnbackdoor.errors import UserError

STRONG = ["rnp", "ft_sam", "i_bau", "nad"]
FAST = {"rnp": {"unlearn_epochs": 1, "recover_epochs": 1}, "ft_sam": {"epochs": 1},
        "i_bau": {"rounds": 1}, "nad": {"teacher_epochs": 1, "epochs": 1}}


pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    def __init__(self, bn: bool = True, width: int = 8):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.layer1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), norm(width), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), norm(width), nn.ReLU())
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.layer2(self.layer1(x)).mean((2, 3)))


def _model(bn: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny(bn).eval()




@pytest.mark.parametrize("name", STRONG)
def test_strong_defenses_leave_the_input_model_alone_and_run_without_bn(name):
    model, clean = _model(), toy_clean_set()
    before = state_copy(model)
    out = apply_defense(name, model, clean, device="cpu", progress=False, **FAST[name])
    assert out.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in out.model.modules())        # no leftover helper hooks
    assert all(p.requires_grad for p in out.model.parameters())
    nbn = apply_defense(name, _model(bn=False), clean, device="cpu", progress=False, **FAST[name])
    assert torch.isfinite(nbn.model(clean.x[:4])).all()
    with pytest.raises(UserError, match="has no option"):
        apply_defense(name, model, clean, device="cpu", progress=False, epochz=3)


# --- finetune(freeze_bn_stats) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("freeze", [True, False])
def test_finetune_freeze_bn_stats_keeps_running_statistics_bit_identical(freeze):
    model, clean = _model(), toy_clean_set()
    before = state_copy(model)
    out = apply_defense("finetune", model, clean, device="cpu", progress=False, epochs=2, freeze_bn_stats=freeze)
    after = out.model.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 4
    same = [torch.equal(before[k], after[k]) for k in stats]
    assert all(same) if freeze else not any(same)
    for k in ("layer1.0.weight", "layer2.1.weight", "head.weight"):
        assert not torch.equal(before[k], after[k]), k


# --- FT-SAM ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_equals_the_hand_computed_update_on_a_quadratic(adaptive):
    from bnbackdoor.defenses.ft_sam import sam_step

    a = torch.tensor([[3.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    w0 = torch.tensor([0.7, -0.4], dtype=torch.float64)
    rho, lr = 0.3, 0.1
    w = nn.Parameter(w0.clone())
    opt = torch.optim.SGD([w], lr=lr)
    loss = sam_step(lambda first: 0.5 * w @ a @ w + b @ w, [w], opt, rho, adaptive)
    # by hand: g = A w + b; e = rho g / |g| (SAM) or rho w^2 g / |w g| (ASAM); w' = w - lr (A (w + e) + b)
    g = a @ w0 + b
    e = rho * w0 ** 2 * g / torch.linalg.norm(w0.abs() * g) if adaptive else rho * g / torch.linalg.norm(g)
    expected = w0 - lr * (a @ (w0 + e) + b)
    assert torch.allclose(w.detach(), expected, atol=1e-6, rtol=0)
    assert loss == pytest.approx(float(0.5 * w0 @ a @ w0 + b @ w0), abs=1e-9)
    assert not torch.allclose(expected, w0 - lr * g, atol=1e-3)         # the perturbation mattered


def test_ft_sam_lowers_the_clean_loss_of_a_tiny_resnet():
    from bnbackdoor.models import build_model

    torch.manual_seed(0)
    model = build_model("cifar10_resnet20").eval()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(24) % 10
    x = torch.rand(24, 3, 32, 32, generator=g) * 0.5
    x = x + 0.05 * y.view(-1, 1, 1, 1).float()                          # a learnable class signature
    clean = CleanSet(x, y, "cifar10", 0)
    for m in model.modules():             # stored statistics of these images, so eval-mode losses are meaningful
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    model.eval()
    out = apply_defense("ft_sam", model, clean, device="cpu", progress=False, epochs=4, batch_size=12)
    assert out.info["clean_loss_after"] < out.info["clean_loss_before"] - 0.1
    assert out.info["clean_loss_after"] == pytest.approx(clean_loss(out.model, clean))


# --- RNP -------------------------------------------------------------------------------------------------------------

class Planted(nn.Module):
    """Three clean channels (channel k: colour k above 0.5 -> class k) and one planted backdoor channel 3: it fires
    on white pixels (colours 1 and 2 both high; weakly on some clean pixels of classes 1 and 2, never of class 0) and
    drives the target logit 0."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.head.weight.zero_()
            self.head.bias.zero_()
            for k in range(3):
                self.conv.weight[k, k] = 1.0
                self.conv.bias[k] = -0.5
                self.head.weight[k, k] = 12.0
            self.conv.weight[3, 1:] = 1.0
            self.conv.bias[3] = -1.0
            self.head.weight[0, 3] = 10.0

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def test_rnp_prunes_exactly_the_planted_backdoor_channel_and_keeps_clean_accuracy():
    clean = toy_clean_set(60)
    model = Planted().eval()
    x_trig = clean.x.clone()
    x_trig[:, :, :4, :4] = 1.0                                   # the planted pattern
    assert _accuracy(model, clean.x, clean.y) == 1.0
    assert _accuracy(model, x_trig, torch.zeros(60, dtype=torch.long)) == 1.0      # the backdoor works
    out = apply_defense("rnp", model, clean, device="cpu", progress=False)        # the paper's settings
    assert out.info["unlearn"][-1]["clean_set_accuracy"] < 0.5          # unlearning broke the clean task
    assert out.info["pruned"] == {"conv": [3]}
    assert out.info["masks"]["conv"][3] < 0.2 and min(out.info["masks"]["conv"][:3]) > 0.9
    w = out.model.conv.weight
    assert torch.equal(w[3], torch.zeros_like(w[3])) and out.model.conv.bias[3] == 0
    assert torch.equal(w[:3], model.conv.weight[:3]) and torch.equal(out.model.head.weight, model.head.weight)
    assert _accuracy(out.model, clean.x, clean.y) == 1.0
    assert _accuracy(out.model, x_trig, torch.zeros(60, dtype=torch.long)) == pytest.approx(1 / 3)   # class 0 only


def test_rnp_masks_batchnorm_channels_when_there_are_any():
    from bnbackdoor.defenses.rnp import neuron_layers

    assert [n for n, _ in neuron_layers(_model())] == ["layer1.1", "layer2.1"]
    assert [n for n, _ in neuron_layers(_model(bn=False))] == ["layer1.0", "layer2.0"]
    with pytest.raises(UserError, match="rnp"):
        neuron_layers(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))


# --- NAD -------------------------------------------------------------------------------------------------------------

def test_attention_map_matches_a_hand_computed_example():
    from bnbackdoor.defenses.nad import attention_loss, attention_map

    a = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])                # (1, 2 channels, 1, 2 positions)
    expected = torch.tensor([[5.0, 2.0]]) / 29 ** 0.5                # mean_c |a|^2 = (1+9)/2, (4+0)/2; L2-normalised
    assert torch.allclose(attention_map(a), expected)
    b = torch.tensor([[[[0.0, 1.0]], [[0.0, 1.0]]]])                 # map (0, 1)
    ref = ((expected - torch.tensor([[0.0, 1.0]])) ** 2).mean()
    assert torch.allclose(attention_loss(a, b), ref)


def _attention_distance(student, teacher, x, stage="layer2") -> float:
    from bnbackdoor.defenses.nad import attention_loss

    got = {}
    hs = [m.get_submodule(stage).register_forward_hook(lambda mod, i, o, k=k: got.__setitem__(k, o))
          for k, m in (("s", student), ("t", teacher))]
    with torch.no_grad():
        student.eval()(x)
        teacher.eval()(x)
    for h in hs:
        h.remove()
    return float(attention_loss(got["s"], got["t"]))


def test_nad_with_a_huge_beta_moves_the_students_attention_to_the_teachers():
    from bnbackdoor.defenses.nad import attention_stages

    model, clean = _model(bn=False), toy_clean_set()      # no BatchNorm: eval-mode maps move only with the weights
    assert attention_stages(model, clean.x[:2]) == ["layer1", "layer2"]
    # the teacher is exactly `finetune` with the same epochs (same loop, same seed)
    teacher = apply_defense("finetune", model, clean, device="cpu", progress=False, epochs=3).model
    before = _attention_distance(model, teacher, clean.x)
    kw = dict(device="cpu", progress=False, teacher_epochs=3, epochs=4, lr=1e-3)
    huge = apply_defense("nad", model, clean, beta3=1e3, **kw)     # beta*lr = 1: the attention term dominates
    none = apply_defense("nad", model, clean, beta3=0.0, **kw)
    assert huge.info["betas"] == [0.0, 1e3]
    after, plain = _attention_distance(huge.model, teacher, clean.x), _attention_distance(none.model, teacher, clean.x)
    assert after < 0.5 * before and after < 0.5 * plain


# --- I-BAU -----------------------------------------------------------------------------------------------------------

class ColourNet(nn.Module):
    """logits = W · (mean colour): an additive colour pattern flips its prediction."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 3)
        with torch.no_grad():
            self.head.weight.copy_(8.0 * torch.eye(3))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(x.mean((2, 3)))


def test_i_bau_perturbation_raises_the_loss_and_unlearning_lowers_it_again():
    import torch.nn.functional as F

    from bnbackdoor.defenses.i_bau import hypergradient, universal_perturbation

    model, clean = ColourNet().eval(), toy_clean_set(60)
    base = float(F.cross_entropy(model(clean.x), clean.y).detach())
    delta = universal_perturbation(model, clean.x, clean.y, lr=1e4, radius=4.0)     # one batch: one big step
    assert float(delta.norm()) == pytest.approx(4.0, rel=1e-5)          # the bound is active
    adv = float(F.cross_entropy(model(clean.x + delta), clean.y).detach())
    assert adv > base + 0.5
    # K = 1: the hypergradient is the plain gradient of the outer loss plus (dPhi/dtheta)^T dL/ddelta
    params = list(model.parameters())
    mask = torch.ones(60, 1, 1, 1)
    g = hypergradient(model, params, delta, clean.x, clean.y, mask, K=1)
    d = delta.clone().requires_grad_(True)
    outer = F.cross_entropy(model(clean.x + d), clean.y)
    *gw, gd = torch.autograd.grad(outer, [*params, d])
    gi = torch.autograd.grad(-F.cross_entropy(model(clean.x + d), clean.y) + 0.001 * d.pow(2).sum(), d,
                             create_graph=True)[0]
    cross = torch.autograd.grad((d - 0.1 * gi), params, grad_outputs=gd)
    assert all(torch.allclose(a, b + c, atol=1e-6) for a, b, c in zip(g, gw, cross))
    out = apply_defense("i_bau", model, clean, device="cpu", progress=False, rounds=5, lr=0.3, radius=4.0, inner_lr=1e4,
                        outer_fraction=1.0)
    after = float(F.cross_entropy(out.model(clean.x + delta), clean.y).detach())
    assert after < adv - 0.1
    assert out.info["rounds"][0]["clean_set_loss_at_delta"] == pytest.approx(adv, rel=1e-4)
