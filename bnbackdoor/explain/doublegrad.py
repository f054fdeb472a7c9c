"""Cheaper double backprop through convolutions, train-mode BatchNorm and Softplus (same math, less work).

An attack step with the input-gradient explanation differentiates a gradient: forward, ``∂ logit / ∂ x`` with
``create_graph=True``, then the loss's backward through both (double backprop). PyTorch's built-in second-order
formulas for these layers are generic and slow on the CPU:

* convolution: the weight part of the double backward runs as a convolution over transposed tensors (batch and
  channels swapped), about twice the cost of the optimised weight-gradient kernel;
* train-mode BatchNorm: ``batchnorm_double_backward`` spends ~30 full-size element-wise ops per layer;
* Softplus: ~9 separate full-size ops per layer.

:func:`fast_double_backward` makes a model's ``nn.Conv2d`` (zero padding), train-mode ``nn.BatchNorm2d`` and
Softplus-mode :class:`~bnbackdoor.models.Act` layers run through custom autograd functions for the duration of a
forward pass (CPU tensors only; elsewhere the modules run as usual). Their forward and first backward call exactly
the ATen kernels PyTorch's own autograd uses (``conv2d``/``convolution_backward``,
``native_batch_norm``/``native_batch_norm_backward``, ``softplus``/``softplus_backward``), so outputs, running
statistics and first-order gradients are bitwise the same; only the backward *of the backward* is ours, equal to
PyTorch's up to float rounding:

* convolution, ``gI = conv_transposeᵀ(gO, W)``, ``gW = corr(x, gO)``: given the upstream (ggI, ggW, ggb),
  ``∂/∂gO = conv(ggI, W) + conv(x, ggW) + ggb``, ``∂/∂W = corr(ggI, gO)`` and ``∂/∂x = conv_transposeᵀ(gO, ggW)``
  - each one call of the optimised forward / weight-gradient / input-gradient kernel;
* BatchNorm in train mode (per channel, M elements, x̂ = (x - μ) r, r = 1/√(var + eps),
  P(v) = v - mean(v) - x̂ mean(v x̂)): the first backward is gx = γ r P(gO), gγ = Σ gO x̂, gβ = Σ gO. Given
  (u = ggx, c = ggγ, d = ggβ), with a = mean(gO x̂), ḡ = mean(gO), b = mean(u x̂), ū = mean(u),
  S = mean(u gO) - ḡ ū - a b:
  ``∂/∂gO = γ r P(u) + c x̂ + d``, ``∂/∂γ = M r S``,
  ``∂/∂x = -γ r² (x̂ S + a P(u) + b P(gO)) + c r P(gO)`` (μ and r depend on x: that is where the terms come from);
  ``γ r P(u)``, ``Σ u x̂`` and ``Σ u`` come from one call of the fused first-order kernel applied to u;
* Softplus(β), gx = gO σ(βx): ``∂/∂gO = u σ(βx)`` (the first-order kernel applied to u) and
  ``∂/∂x = β gx (u - u σ(βx))``, zero on the linear part βx > threshold (20): 2 kernels + 3 ops instead of ~9.

A custom function cannot see which of its inputs the running ``backward``/``grad`` call needs, so each first
backward asks the autograd engine (``torch._C._will_engine_execute_node``): ``autograd.grad(score, x)`` then
computes no weight gradients, as PyTorch's built-in nodes do. Third-order derivatives are not supported
(``once_differentiable``), nor are ``torch.func`` transforms of these graphs. Checked against PyTorch's own double
backward and against finite differences (``gradcheck``) in ``tests/test_benchmarks.py``; the speed-up is measured
by ``benchmarks/run.py`` (see ``benchmarks/README.md``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..models.layers import SOFTPLUS_THRESHOLD, Act, softplus_value

__all__ = ["fast_double_backward"]

_aten = torch.ops.aten


def _needed(ctx, n: int) -> list[bool]:
    """For the first ``n`` forward inputs: does the running backward pass need their gradient?"""
    mask = list(ctx.needs_input_grad[:n])
    try:
        for i, (node, _) in enumerate(ctx.next_functions[:n]):
            if mask[i] and node is not None and not torch._C._will_engine_execute_node(node):
                mask[i] = False
    except RuntimeError:  # not inside a graph task (should not happen): keep the static mask
        pass
    return mask


# ------------------------------------------------------------------------------------------------ convolution
def _conv_backward(g_out: Tensor, x: Tensor, weight: Tensor, conf, mask) -> tuple:
    stride, padding, dilation, groups, has_bias = conf
    return _aten.convolution_backward(g_out, x, weight, [weight.shape[0]] if has_bias else None, stride, padding,
                                      dilation, False, [0] * len(stride), groups, list(mask))


class _Conv2d(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g_out):
        x, weight = ctx.saved_tensors
        mask = _needed(ctx, 3)
        mask[2] = mask[2] and ctx.conf[4]
        if not any(mask):
            return (None,) * 7
        if torch.is_grad_enabled():  # create_graph: record a node with a cheap backward of its own
            gi, gw, gb = _Conv2dBackward.apply(g_out, x, weight, ctx.conf, tuple(mask))
        else:
            gi, gw, gb = _conv_backward(g_out, x, weight, ctx.conf, mask)
        return gi, gw, gb, None, None, None, None


class _Conv2dBackward(Function):
    @staticmethod
    def forward(ctx, g_out, x, weight, conf, mask):
        ctx.save_for_backward(g_out, x, weight)
        ctx.conf, ctx.mask = conf, mask
        gi, gw, gb = _conv_backward(g_out, x, weight, conf, mask)
        return gi, gw, gb

    @staticmethod
    @once_differentiable
    def backward(ctx, ggi, ggw, ggb):
        g_out, x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, _ = conf = ctx.conf
        ggi = ggi if ctx.mask[0] else None
        ggw = ggw if ctx.mask[1] else None
        ggb = ggb if ctx.mask[2] else None
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        d_gout = d_x = d_w = None
        if need_g:
            if ggi is not None:
                d_gout = F.conv2d(ggi, weight, None, stride, padding, dilation, groups)
            if ggw is not None:
                t = F.conv2d(x, ggw, None, stride, padding, dilation, groups)
                d_gout = t if d_gout is None else d_gout.add_(t)
            if ggb is not None:
                t = ggb.view(1, -1, *([1] * (g_out.dim() - 2))).expand_as(g_out)
                d_gout = t.clone() if d_gout is None else d_gout.add_(t)
        if need_x and ggw is not None:
            d_x = _conv_backward(g_out, x, ggw, conf, (True, False, False))[0]
        if need_w and ggi is not None:
            d_w = _conv_backward(g_out, ggi, weight, conf, (False, True, False))[1]
        return d_gout, d_x, d_w, None, None


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The lower-precision dtype autocast would run a convolution in here, or None when autocast is off."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _conv_forward(module: nn.Conv2d, x: Tensor) -> Tensor:
    if not x.is_cpu:  # measured on the CPU only; elsewhere PyTorch's own kernels (cuDNN) stay in charge
        return type(module).forward(module, x)
    w, b = module.weight, module.bias
    dtype = _autocast_dtype(x)
    if dtype is None:
        return _Conv2d.apply(x, w, b, list(module.stride), list(module.padding), list(module.dilation),
                             module.groups)
    # Under autocast: cast as autocast would, outside the custom function (the casts are ordinary, twice
    # differentiable autograd ops, so gradients reach the fp32 master weights), and run the function with autocast
    # off, so that its forward, backward and backward-of-backward all see one dtype (oneDNN refuses a convolution
    # whose operands mix bf16 and fp32).
    with torch.autocast(x.device.type, enabled=False):
        return _Conv2d.apply(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), list(module.stride),
                             list(module.padding), list(module.dilation), module.groups)


# ------------------------------------------------------------------------------------------------ BatchNorm
def _channel_view(t: Tensor, dim: int) -> Tensor:
    return t.view(1, -1, *([1] * (dim - 2)))


class _BatchNormTrain(Function):
    """Train-mode BatchNorm: batch statistics, running statistics updated in place (as ``F.batch_norm``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        out, mean, invstd = _aten.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, g_out):
        x, weight, mean, invstd = ctx.saved_tensors
        mask = _needed(ctx, 3)
        if weight is None:
            mask[1] = mask[2] = False
        if not any(mask):
            return (None,) * 7
        if torch.is_grad_enabled():
            gx, gw, gb = _BatchNormTrainBackward.apply(g_out, x, weight, mean, invstd, ctx.eps, tuple(mask))
        else:
            gx, gw, gb = _aten.native_batch_norm_backward(g_out, x, weight, None, None, mean, invstd, True, ctx.eps,
                                                          mask)
        return gx, gw, gb, None, None, None, None


class _BatchNormTrainBackward(Function):
    @staticmethod
    def forward(ctx, g_out, x, weight, mean, invstd, eps, mask):
        # The sums Σ gO x̂ and Σ gO (gγ, gβ) are needed by the double backward anyway: always ask for them.
        gx, sum_gxhat, sum_g = _aten.native_batch_norm_backward(g_out, x, weight, None, None, mean, invstd, True,
                                                                eps, [mask[0], True, True])
        ctx.save_for_backward(g_out, x, weight, mean, invstd, gx, sum_gxhat, sum_g)
        ctx.eps, ctx.mask = eps, mask
        return (gx if mask[0] else None, sum_gxhat if mask[1] else None, sum_g if mask[2] else None)

    @staticmethod
    @once_differentiable
    def backward(ctx, u, c, d):
        g_out, x, weight, mean, invstd, gx, sum_gxhat, sum_g = ctx.saved_tensors
        u = u if ctx.mask[0] else None
        c = c if ctx.mask[1] else None
        d = d if ctx.mask[2] else None
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        dim, channels = x.dim(), x.shape[1]
        m = x.numel() // channels
        cv = lambda t: _channel_view(t, dim)  # noqa: E731
        r = invstd
        a, gbar = sum_gxhat / m, sum_g / m

        def affine_xhat(scale: Tensor, shift: Tensor) -> Tensor:
            """scale x̂ + shift in one pass, as PyTorch's eval-mode BN kernel computes it: x (scale r) + shift'."""
            return torch.addcmul(cv(shift - scale * mean * r), x, cv(scale * r))

        d_gout = d_x = d_w = None
        pu = None
        # ∂/∂x = k_pu γ r P(u) + k_gx γ r P(gO) + k_g gO + k_h x̂ + k_0 (per-channel k), using
        # -γ r² a P(u) = -r a (γ r P(u)) and -γ r² b P(gO) = -r b gx: no division by γ.
        k_pu = k_gx = k_g = None
        k_h, k_0 = torch.zeros_like(r), torch.zeros_like(r)
        if u is not None:
            # γ r P(u), Σ u x̂, Σ u: one call of the fused first-order kernel applied to u
            pu, sum_uxhat, sum_u = _aten.native_batch_norm_backward(u, x, weight, None, None, mean, invstd, True,
                                                                    ctx.eps, [need_g or need_x, True, True])
            b, ubar = sum_uxhat / m, sum_u / m
            # Σ u gO per channel, fused and without a temporary: the same kernel's Σ u (gO - 0) · 1
            sum_ug = _aten.native_batch_norm_backward(u, g_out, None, None, None, torch.zeros_like(mean),
                                                      torch.ones_like(r), True, ctx.eps, [False, True, False])[1]
            s = sum_ug / m - gbar * ubar - a * b
            if need_w and weight is not None:
                d_w = m * r * s
            if need_x:
                gamma = weight if weight is not None else torch.ones_like(r)
                k_pu, k_gx, k_h = -r * a, -r * b, -gamma * r * r * s
        if c is not None and need_x:   # c r P(gO) = c r (gO - ḡ - x̂ a)
            k_g = c * r
            k_h, k_0 = k_h - k_g * a, k_0 - k_g * gbar
        if need_g:   # γ r P(u) + c x̂ + d
            if c is not None or d is not None:
                zero = torch.zeros_like(r)
                d_gout = affine_xhat(c if c is not None else zero, d if d is not None else zero)
                if pu is not None:
                    d_gout.add_(pu)
            else:
                d_gout = pu
        if need_x and (u is not None or c is not None):
            d_x = affine_xhat(k_h, k_0)
            if k_pu is not None:
                d_x.addcmul_(pu, cv(k_pu)).addcmul_(gx, cv(k_gx))
            if k_g is not None:
                d_x.addcmul_(g_out, cv(k_g))
        return d_gout, d_x, d_w, None, None, None, None


def _bn_forward(module: nn.BatchNorm2d, x: Tensor) -> Tensor:
    if not module.training or not x.is_cpu:  # eval mode: a per-channel affine map, cheap as it is
        return type(module).forward(module, x)
    module._check_input_dim(x)
    factor = 0.0 if module.momentum is None else module.momentum
    if module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    if x.dim() > 1:
        size = x.numel() // x.shape[1]
        if size == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    track = module.track_running_stats
    return _BatchNormTrain.apply(x, module.weight, module.bias, module.running_mean if track else None,
                                 module.running_var if track else None, factor, module.eps)


# ------------------------------------------------------------------------------------------------ Softplus
class _Softplus(Function):
    @staticmethod
    def forward(ctx, x, beta):
        ctx.save_for_backward(x)
        ctx.beta = beta
        return softplus_value(x, beta)  # F.softplus in fp32; its vectorised twin for a bf16 step

    @staticmethod
    def backward(ctx, g_out):
        (x,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        if torch.is_grad_enabled():
            return _SoftplusBackward.apply(g_out, x, ctx.beta), None
        return _aten.softplus_backward(g_out, x, ctx.beta, SOFTPLUS_THRESHOLD), None


class _SoftplusBackward(Function):
    """gx = gO σ(βx) (gO where βx > threshold). Backward: ∂/∂gO = u σ(βx) (the same kernel applied to u) and
    ∂/∂x = β gx u (1 - σ(βx)) = β gx (u - u σ(βx)), which is exactly 0 where βx > threshold (the kernel passes u
    through there). PyTorch's formula also zeroes the single point βx = threshold; there this gives
    β gx u (1 - σ(20)) ≈ 2e-9 β gx u instead (a set of measure zero)."""

    @staticmethod
    def forward(ctx, g_out, x, beta):
        gx = _aten.softplus_backward(g_out, x, beta, SOFTPLUS_THRESHOLD)
        ctx.save_for_backward(x, gx)
        ctx.beta = beta
        return gx

    @staticmethod
    @once_differentiable
    def backward(ctx, u):
        x, gx = ctx.saved_tensors
        need_g, need_x = ctx.needs_input_grad[:2]
        beta = ctx.beta
        d_g = _aten.softplus_backward(u, x, beta, SOFTPLUS_THRESHOLD)   # u σ(βx); u where βx > threshold
        # β gx u (1 - σ(βx)) = β gx (u - d_g): exactly 0 on the linear part, where the kernel passes u through
        d_x = torch.sub(u, d_g).mul_(gx).mul_(beta) if need_x else None
        return (d_g if need_g else None), d_x, None


def _act_forward(module: Act, x: Tensor) -> Tensor:
    if module.beta is None or not x.is_cpu:
        return type(module).forward(module, x)
    return _Softplus.apply(x, module.beta)


# ------------------------------------------------------------------------------------------------ the switch
def _patchable(m: nn.Module):
    if "forward" in m.__dict__:  # someone already patched this instance: leave it alone
        return None
    if type(m) is Act:
        return _act_forward
    if type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        return _conv_forward
    if type(m) is nn.BatchNorm2d:
        return _bn_forward
    return None


@contextmanager
def fast_double_backward(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """While open, the model's ``nn.Conv2d``, train-mode ``nn.BatchNorm2d`` and Softplus-mode ``Act`` forwards (on
    CPU tensors) build graphs whose second-order backward is the cheap one above; ``enabled=False`` changes nothing.
    Graphs built inside stay valid after the context closes."""
    patched = []
    if enabled:
        for m in model.modules():
            fn = _patchable(m)
            if fn is not None:
                m.forward = fn.__get__(m)
                patched.append(m)
    try:
        yield model
    finally:
        for m in patched:
            del m.forward
