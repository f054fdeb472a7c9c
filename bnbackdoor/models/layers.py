"""Building blocks shared by every architecture: input normalisation and the ReLU/Softplus switch."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the first module of every model so inputs stay in [0, 1].

    The constants are non-persistent buffers: they are not part of the state dict, so public checkpoints with
    the bare architecture's keys load unchanged.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default: linear where beta * x > threshold
REDUCED_DTYPES = (torch.bfloat16, torch.float16)


def softplus_value(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Softplus(beta) of ``x``, no graph: ``F.softplus`` itself for fp32/fp64 and off the CPU (bit for bit); for a
    bf16/fp16 CPU tensor the same function evaluated in fp32 as ``max(x, 0) + log(1 + exp(-beta |x|)) / beta``
    and rounded once to ``x``'s dtype.

    Why: PyTorch's CPU softplus calls a scalar ``log1p`` per element; on our CPU that is ~10 ms per million
    elements, 60x ReLU, and it was the largest single kernel of a bf16 attack step (benchmarks/README.md). The
    composite uses only vectorised kernels; ``log(1 + e)`` instead of ``log1p(e)`` costs at most ~6e-8 / beta
    absolute (where ``e`` < 2^-24), far below a bf16 ulp, and equals ``x`` exactly past the threshold
    (``e`` < 2e-9 there)."""
    if not (x.is_cpu and x.dtype in REDUCED_DTYPES):
        return F.softplus(x, beta, SOFTPLUS_THRESHOLD)
    xf = x.float()
    tail = torch.exp(xf.abs().mul_(-beta)).add_(1.0).log_().div_(beta)
    return torch.relu(xf).add_(tail).to(x.dtype)


class _ReducedSoftplus(torch.autograd.Function):
    """Softplus on a bf16/fp16 CPU tensor: the forward of :func:`softplus_value`, the backward PyTorch's own
    ``softplus_backward`` kernel (gO σ(βx); itself twice differentiable, so double backprop still works)."""

    @staticmethod
    def forward(ctx, x, beta):
        ctx.save_for_backward(x)
        ctx.beta = beta
        return softplus_value(x, beta)

    @staticmethod
    def backward(ctx, g_out):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.softplus_backward(g_out, x, ctx.beta, SOFTPLUS_THRESHOLD), None


class Act(nn.Module):
    """ReLU that can become Softplus(beta).

    Explanation-aware training differentiates through explanations (double backprop); ReLU's second derivative
    is zero almost everywhere, so training swaps in Softplus(beta), which tends to ReLU as beta grows.
    """

    def __init__(self, beta: float | None = None):
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.beta is None:
            return F.relu(x)
        if x.is_cpu and x.dtype in REDUCED_DTYPES:  # a bf16 step (autocast): the vectorised softplus
            return _ReducedSoftplus.apply(x, self.beta)
        return F.softplus(x, beta=self.beta)

    def extra_repr(self) -> str:
        return "relu" if self.beta is None else f"softplus(beta={self.beta})"


def replace_relus(module: nn.Module) -> nn.Module:
    """Swap every ``nn.ReLU`` inside ``module`` (e.g. a torchvision model) for :class:`Act`, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, Act())
        else:
            replace_relus(child)
    return module


def set_softplus(model: nn.Module, beta: float | None) -> int:
    """Make every :class:`Act` in ``model`` a Softplus(beta) (``beta=None``: ReLU). Returns how many switched."""
    acts = [m for m in model.modules() if isinstance(m, Act)]
    for m in acts:
        m.beta = beta
    return len(acts)


@contextmanager
def softplus(model: nn.Module, beta: float | None) -> Iterator[nn.Module]:
    """Temporarily use Softplus(beta) for every activation; restores each one's previous state."""
    acts = [m for m in model.modules() if isinstance(m, Act)]
    before = [m.beta for m in acts]
    for m in acts:
        m.beta = beta
    try:
        yield model
    finally:
        for m, b in zip(acts, before):
            m.beta = b
