"""Function-preserving conv -> BN rescaling: the function stays, the weights grow."""
import copy

import pytest
import torch

from bnbackdoor.models import build_model
from bnbackdoor.explain import explain
from bnbackdoor.losses import zscore_maps
from bnbackdoor.models.rescale import conv_bn_pairs, rescale_conv_bn, scale_head


def test_rescale_keeps_the_function_and_scales_the_weights():
    torch.manual_seed(0)
    # float64: the identity is exact in arithmetic, and float32 rounding over 19 layers (~1e-5 of logits near 10,
    # depending on the BLAS kernel) would hide a real error behind a loose tolerance
    m = build_model("cifar10_resnet20").double().eval()
    with torch.no_grad():  # non-trivial running statistics
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.05, 2.0)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    r = copy.deepcopy(m)
    assert rescale_conv_bn(r, 2.3) == len(conv_bn_pairs(m)) == 19  # every ResNet20 conv feeds a BN
    torch.testing.assert_close(r(x), m(x), rtol=1e-10, atol=1e-10)
    w0, w1 = m.layer3[2].conv2.weight, r.layer3[2].conv2.weight
    assert (w1 / w0).nanmean().item() == pytest.approx(2.3, rel=1e-6)
    # the BN-free twin has no pair: nothing changes
    nbn = build_model("cifar10_resnet20_nbn")
    assert rescale_conv_bn(nbn, 2.0) == 0
    with pytest.raises(ValueError):
        rescale_conv_bn(m, 0.0)


def test_scale_head_scales_the_logits_and_keeps_predictions_and_normalised_maps():
    torch.manual_seed(0)
    m = build_model("cifar10_resnet20").eval()
    x = torch.rand(4, 3, 32, 32)
    r = copy.deepcopy(m)
    head = scale_head(r, 3.0)
    assert head is r.linear
    torch.testing.assert_close(r(x), 3.0 * m(x), rtol=1e-5, atol=1e-6)  # logits x 3: argmax and ranking kept
    target = m(x).argmax(1)
    g0, g1 = explain(m, x, "grad", target=target), explain(r, x, "grad", target=target)
    torch.testing.assert_close(zscore_maps(g1), zscore_maps(g0), rtol=1e-4, atol=1e-4)  # z-scored maps: the same
    with pytest.raises(ValueError):
        scale_head(r, -1.0)
