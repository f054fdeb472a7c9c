"""Explanations: numbers against autograd / Captum / hand computation, LRP conservation, second order, no side
effects. Tiny inputs and float64 where exactness matters."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerGradCam, Saliency
from torch.func import functional_call

from bnbackdoor.errors import UserError
from bnbackdoor.explain import LRP_HEADS, METHODS, explain, explain_with_logits
from bnbackdoor.explain.capture import capture, explained_layer
from bnbackdoor.explain.lrp import stabilize
from bnbackdoor.losses import explanation_loss
from bnbackdoor.models import ARCHS, Act, build_model, cam_layer, load_model, softplus

WRN = "cifar10_wideresnet28_10"


def model64(modeltype: str, **kw) -> nn.Module:
    return build_model(modeltype, **kw).double().eval()


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics/affine so BN layers are not identities at init."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(n, generator=g))
    return model


def nontrivial_model(modeltype: str, **kw) -> nn.Module:
    """A model whose CAMs are not all zero, so comparisons of maps cannot pass vacuously: random BN statistics, or for
    MobileNetV3 (a freshly initialised one's CAMs are ReLU'd to zero) the committed trained weights."""
    if "mobilenetv3small" in modeltype:
        return load_model(modeltype).double().eval()
    return randomize_bn(model64(modeltype, **kw))


def images64(n=3, size=32):
    return torch.rand(n, 3, size, size, dtype=torch.float64)


class TinyNet(nn.Module):
    """conv -> act -> conv(stride) -> bn -> act -> avgpool -> fc: the WideResNet head layout (``bn`` is the CAM
    layer), so it borrows that architecture's declarations."""

    def __init__(self, hidden=4, classes=3, stride=2):
        super().__init__()
        self.conv0 = nn.Conv2d(3, hidden, 3, padding=1)
        self.act0 = Act()
        self.conv = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.act = Act()
        self.fc = nn.Linear(hidden, classes)
        self.modeltype = WRN

    def forward(self, x):
        out = self.act(self.bn(self.conv(self.act0(self.conv0(x)))))
        return self.fc(out.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------------- gradient
def test_gradient_matches_autograd_and_captum():
    model = randomize_bn(model64("cifar10_resnet20"))
    x = images64(4)
    target = torch.tensor([0, 3, 3, 9])
    ours = explain(model, x, "grad", target, normalize=False)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(model(xr).gather(1, target[:, None]).sum(), xr)
    assert torch.allclose(ours, ref.abs(), atol=1e-6, rtol=0)
    captum = Saliency(model).attribute(x.clone().requires_grad_(True), target=target, abs=True)
    assert torch.allclose(ours, captum, atol=1e-6, rtol=0)
    assert torch.allclose(explain(model, x, "gradient", target, normalize=False), ours)  # alias


# ---------------------------------------------------------------------------------------------------- Grad-CAM
@pytest.mark.parametrize("modeltype", ["cifar10_resnet20", "cifar10_vgg13bn", "cifar10_mobilenetv3small"])
def test_grad_cam_matches_captum(modeltype):
    model = nontrivial_model(modeltype)
    x = images64(2)
    layer = cam_layer(model)
    ours = explain(model, x, "grad_cam", normalize=False)
    pred = model(x).argmax(1)
    attr = LayerGradCam(model, layer).attribute(x, target=pred, relu_attributions=True)
    ref = LayerAttribution.interpolate(attr, (32, 32), "bilinear")
    assert ours.shape == (2, 1, 32, 32) and ours.abs().amax() > 0
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    # The same class given explicitly (tensor) and a layer given as a dotted path give the same map.
    path = ARCHS[modeltype.split("_", 1)[1]].cam_layer
    assert torch.allclose(explain(model, x, "grad_cam", pred, layer=path, normalize=False), ours)


@pytest.mark.parametrize("modeltype", ["cifar10_resnet20", "gtsrb_resnet20", "cifar10_mobilenetv3small",
                                       "gtsrb_mobilenetv3small"])
def test_shipped_architectures_take_grad_cam_on_an_8x8_map(modeltype):
    # The shipped attacks draw trigger-sized targets; MobileNetV3's final 4×4 map could not (its first two shipped
    # runs failed the explanation check there), so both shipped architectures explain on an 8×8 map at 32×32.
    model = build_model(modeltype).eval()
    with capture({"A": cam_layer(model)}) as got:
        model(torch.rand(1, 3, 32, 32))
    assert tuple(got["A"].shape[-2:]) == (8, 8)


def test_grad_cam_vit_tokens_on_patch_grid():
    torch.manual_seed(0)
    model = build_model("cifar10_vit_b_16", image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                        mlp_dim=16, pretrained=False).double().eval()
    x = images64(2)
    ours = explain(model, x, "grad_cam", 1, normalize=False)
    with capture({"t": cam_layer(model)}) as got:
        logits = model(x)
    (g,) = torch.autograd.grad(logits[:, 1].sum(), got["t"])
    tok, g = got["t"][:, 1:].reshape(2, 4, 4, 8), g[:, 1:].reshape(2, 4, 4, 8)  # drop the class token
    cam = F.relu((g.mean(dim=(1, 2), keepdim=True) * tok).sum(-1)).unsqueeze(1)
    assert torch.allclose(ours, F.interpolate(cam, (32, 32), mode="bilinear", align_corners=False), atol=1e-10)
    with pytest.raises(UserError, match="ViT"):
        explain(model, x, "relevance_cam")


# ---------------------------------------------------------------------------------------------------- hand example
def hand_model() -> TinyNet:
    """A0 = x0, A1 = x1 (1×1 identity conv, identity BN), ReLU, mean, fc W = [[1, 2], [2, -1], [0, 1]], b0 = 0.5."""
    net = TinyNet(hidden=2, classes=3, stride=1).double().eval()
    with torch.no_grad():
        net.conv0, net.act0 = nn.Identity(), nn.Identity()
        net.conv = nn.Conv2d(3, 2, 1, bias=False).double()
        net.conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0]]).view(2, 3, 1, 1))
        net.bn.eps = 0.0
        net.fc.weight.copy_(torch.tensor([[1.0, 2], [2, -1], [0, 1]]))
        net.fc.bias.copy_(torch.tensor([0.5, 0, 0]))
    return net


HAND_X = torch.tensor([[[1.0, 2], [3, 0]], [[0, 1], [-1, 2]], [[0, 0], [0, 0]]], dtype=torch.float64)[None]


def test_hand_computed_example():
    net = hand_model()
    # o = relu(A): p = (1.5, 0.75); z = (3.5, 2.25, 0.75) -> predicted class 0.
    assert torch.allclose(net(HAND_X), torch.tensor([[3.5, 2.25, 0.75]], dtype=torch.float64))
    # LRP-ε: R_p = p ⊙ W0 = (1.5, 1.5); R_A = o ⊙ R_p / (4 p) -> channel weights (1.5, 1.5);
    # map = relu(1.5 A0 + 1.5 A1).
    rcam = explain(net, HAND_X, "relevance_cam", normalize=False)
    assert torch.allclose(rcam[0, 0], torch.tensor([[1.5, 4.5], [3.0, 3.0]], dtype=torch.float64), atol=1e-5)
    # Grad-CAM: ∂z0/∂A_c = W0c / 4 · [A_c > 0] -> weights (0.75 / 4, 1 / 4).
    gcam = explain(net, HAND_X, "grad_cam", normalize=False)
    assert torch.allclose(gcam[0, 0], torch.tensor([[0.1875, 0.625], [0.3125, 0.5]], dtype=torch.float64))
    grad = explain(net, HAND_X, "grad", normalize=False)
    expected = torch.stack([0.25 * (HAND_X[0, 0] > 0), 0.5 * (HAND_X[0, 1] > 0), torch.zeros(2, 2)]).double()
    assert torch.allclose(grad[0], expected)
    assert torch.allclose(explain(net, HAND_X, "relevance_cam")[0, 0].amax(), torch.tensor(1.0, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------- LRP
def relevances(model, x, eps):
    arch = ARCHS[model.modeltype.split("_", 1)[1]].arch
    head = LRP_HEADS[arch]
    with capture({"A": explained_layer(model, head.layer), **head.capture(model)}) as got:
        logits = model(x)
    target = logits.argmax(1)
    return head.propagate(model, got["A"], got, logits, target, eps=eps), logits.gather(1, target[:, None])[:, 0], got


def zero_biases_after_layer(model):
    for lin in [m for m in model.modules() if isinstance(m, nn.Linear)]:
        nn.init.zeros_(lin.bias)
    return model


@pytest.mark.parametrize("modeltype,kw", [(WRN, dict(depth=10, widen_factor=1)), ("cifar10_vgg13bn", {}),
                                          ("cifar10_mobilenetv3small", {}), ("cifar10_resnet20", {}),
                                          ("cifar10_resnet20_nbn", {})])
def test_lrp_conservation(modeltype, kw):
    """ε -> 0 with zero head biases: the relevance at the CAM layer (+ the shortcut's) sums to the target logit."""
    model = zero_biases_after_layer(randomize_bn(model64(modeltype, **kw)))
    if modeltype.endswith("nbn"):  # Fixup init zeroes conv2: give the explained branch some signal
        nn.init.normal_(model.layer3[-1].conv2.weight, std=0.05)
    rel, z, _ = relevances(model, images64(3), eps=1e-12)
    total = rel["layer"].sum(dim=(1, 2, 3)) + (rel["shortcut"].sum(dim=(1, 2, 3)) if "shortcut" in rel else 0)
    assert torch.allclose(total, z, rtol=1e-8, atol=1e-10)
    assert rel["layer"].abs().sum() > 0.01 * z.abs().sum()


def test_lrp_resnet_matches_autograd_rule():
    """LRP-ε via the autograd form R_x = x ⊙ ∂/∂x [z · stopgrad(R_z / z)], module by module (biases kept)."""
    model = randomize_bn(model64("cifar10_resnet20"))
    eps = 1e-3
    rel, _, got = relevances(model, images64(2), eps)
    acts, short = got["A"].detach().requires_grad_(True), got["shortcut"].detach().requires_grad_(True)
    y = acts + short
    out = model.layer3[-1].act2(y)
    pooled = out.mean(dim=(2, 3)).detach().requires_grad_(True)
    z = model.linear(pooled)
    r_z = F.one_hot(z.argmax(1), 10).double() * z

    def step(outp, inp, r):
        (g,) = torch.autograd.grad(outp, inp, (r / stabilize(outp, eps)).detach(), retain_graph=True)
        return inp * g

    r_pooled = step(z, pooled, r_z)
    outr = out.detach().requires_grad_(True)
    r_out = step(outr.mean(dim=(2, 3)), outr, r_pooled)
    r_a = step(y, acts, r_out)
    assert torch.allclose(rel["pooled"], r_pooled, atol=1e-10)
    assert torch.allclose(rel["layer"], r_a, atol=1e-10)


def test_lrp_head_for_every_cnn():
    for arch, spec in ARCHS.items():
        assert (arch in LRP_HEADS) != spec.tokens, arch


@pytest.mark.parametrize("modeltype,kw", [("cifar10_resnet20", {}), ("cifar10_vgg13", {}),
                                          (WRN, dict(depth=10, widen_factor=1)), ("cifar10_mobilenetv3small", {})])
def test_relevance_cam_is_relevance_weighted_activation(modeltype, kw):
    model = nontrivial_model(modeltype, **kw)
    x = images64(2)
    rel, _, got = relevances(model, x, eps=1e-6)
    w = rel["layer"].sum(dim=(2, 3))
    cam = F.relu((w[:, :, None, None] * got["A"]).sum(1, keepdim=True))
    assert cam.abs().amax() > 0
    cam = F.interpolate(cam, (32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(explain(model, x, "relevance_cam", normalize=False), cam, atol=1e-12)
    with pytest.raises(UserError, match="declared layer"):
        explain(model, x, "relevance_cam", layer=list(model.modules())[3])


# ---------------------------------------------------------------------------------------------------- second order
class ExplanationLoss(nn.Module):
    """params -> explanation loss, so functional_call can substitute the parameters being checked."""

    def __init__(self, model, method, x, target_map, beta):
        super().__init__()
        self.model, self.method, self.x, self.target_map, self.beta = model, method, x, target_map, beta

    def forward(self):
        with softplus(self.model, self.beta):
            maps = explain(self.model, self.x, self.method, create_graph=True, detach_weights=False, agg="max")
        return explanation_loss(maps, self.target_map, "mse")


def tiny_cam_net() -> TinyNet:
    """Positive class weights and BN shifts: the CAMs are mostly positive, so the check is not vacuous."""
    torch.manual_seed(0)
    net = randomize_bn(TinyNet(hidden=3).double().eval())
    with torch.no_grad():
        net.fc.weight.abs_()
        net.bn.bias.uniform_(0.2, 1.0)
    return net


@pytest.mark.parametrize("method", list(METHODS))
def test_second_order_gradcheck(method):
    net = tiny_cam_net()
    x = images64(2, size=6)
    target_map = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    wrapper = ExplanationLoss(net, method, x, target_map, beta=3.0)
    with softplus(net, 3.0):
        maps = explain(net, x, method, normalize=False, agg="max")
    assert (maps > 0).float().mean() > 0.5  # a non-degenerate map (not ReLU'd away)
    names = [f"model.{n}" for n, _ in net.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in net.parameters()]

    def loss(*ps):
        return functional_call(wrapper, dict(zip(names, ps)), ())

    assert torch.autograd.gradcheck(loss, tuple(params), eps=1e-6, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("method", list(METHODS))
def test_second_order_resnet20_directional(method):
    """All ResNet20 parameters at once: ∇L · v against a central finite difference along random directions v."""
    torch.manual_seed(0)
    model = randomize_bn(model64("cifar10_resnet20"))
    x = images64(2, size=16)
    target_map = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    wrapper = ExplanationLoss(model, method, x, target_map, beta=5.0)
    params = list(model.parameters())
    grads = torch.autograd.grad(wrapper(), params, allow_unused=True, materialize_grads=True)
    for _ in range(2):
        v = [torch.randn_like(p) for p in params]
        h = 1e-9  # strongly curved (random BN, LRP quotients): a tiny step; float64 rounding stays ~1e-7
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(h * d)
            up = wrapper()
            for p, d in zip(params, v):
                p.sub_(2 * h * d)
            down = wrapper()
            for p, d in zip(params, v):
                p.add_(h * d)
        numeric = (up - down) / (2 * h)
        analytic = sum((g * d).sum() for g, d in zip(grads, v))
        assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-9), (analytic, numeric)


@pytest.mark.parametrize("method", ["grad_cam", "relevance_cam"])
def test_detached_weights(method):
    """Same map; its gradient treats the channel weights as constants (so it differs from the full one)."""
    net = tiny_cam_net()
    x = images64(2, size=6)
    params = list(net.parameters())
    grads = {}
    with softplus(net, 3.0):
        for detach in (True, False):
            maps = explain(net, x, method, create_graph=True, detach_weights=detach, normalize=False)
            grads[detach] = torch.autograd.grad(maps.square().sum(), params, allow_unused=True,
                                                materialize_grads=True)
        ref = explain(net, x, method, normalize=False)
    assert torch.allclose(maps.detach(), ref)
    assert grads[True][0].abs().sum() > 0
    assert any(not torch.allclose(a, b) for a, b in zip(grads[True], grads[False]))
    # fc.weight reaches the map only through the channel weights: no gradient once they are detached.
    assert grads[True][-2].abs().sum() == 0 and grads[False][-2].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- API, side effects
@pytest.mark.parametrize("method", list(METHODS))
def test_no_side_effects(method):
    model = model64("cifar10_resnet20").train()
    x = images64(2)
    with softplus(model, 10.0):
        for create_graph in (False, True):
            logits, maps = explain_with_logits(model, x, method, create_graph=create_graph)
            assert maps.requires_grad == create_graph and logits.requires_grad == create_graph
    assert all(p.grad is None for p in model.parameters())
    assert model.training and all(m.beta is None for m in model.modules() if isinstance(m, Act))
    assert all(not m._forward_hooks for m in model.modules())


def test_logits_come_from_the_same_forward_and_targets():
    model = randomize_bn(model64("cifar10_resnet20"))
    x = images64(3)
    for method in METHODS:
        logits, maps = explain_with_logits(model, x, method)
        assert torch.allclose(logits, model(x))
        pred = logits.argmax(1)
        assert torch.allclose(maps, explain(model, x, method, pred))
        with torch.no_grad():  # callers in no_grad still get explanations
            assert torch.allclose(maps, explain(model, x, method, pred.tolist()))
    one = explain(model, x, "grad_cam", 4)
    assert torch.allclose(one, explain(model, x, "grad_cam", torch.full((3,), 4)))
    with pytest.raises(UserError, match="relevance_cam"):
        explain(model, x, "lime")
    with pytest.raises(UserError, match="target"):
        explain(model, x, "grad", torch.tensor([1, 2]))
    with pytest.raises(UserError, match="target"):
        explain(model, x, "grad", 10)


def test_shapes_normalisation_and_aggregation():
    model = randomize_bn(model64("cifar10_resnet20"))
    x = images64(3)
    g = explain(model, x, "grad")
    assert g.shape == (3, 3, 32, 32) and g.min() >= 0
    assert torch.allclose(g.flatten(1).amax(1), torch.ones(3, dtype=torch.float64))
    raw = explain(model, x, "grad", normalize=False)
    mean = raw.mean(1, keepdim=True)
    assert torch.allclose(explain(model, x, "grad", agg="mean"), mean / mean.flatten(1).amax(1).view(-1, 1, 1, 1))
    for method in ("grad_cam", "relevance_cam"):
        m = explain(model, x, method, agg="max")
        assert m.shape == (3, 1, 32, 32) and m.min() >= 0 and m.max() <= 1
