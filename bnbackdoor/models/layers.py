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


class Act(nn.Module):
    """ReLU that can become Softplus(beta).

    Explanation-aware training differentiates through explanations (double backprop); ReLU's second derivative
    is zero almost everywhere, so training swaps in Softplus(beta), which tends to ReLU as beta grows.
    """

    def __init__(self, beta: float | None = None):
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.beta is None else F.softplus(x, beta=self.beta)

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
