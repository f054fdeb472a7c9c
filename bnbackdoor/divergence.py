"""The divergence guard: a training run that blows up stops with one line instead of saving garbage.

Rule (fine-tuning and clean training alike), checked after every optimizer step:

- the step's loss is not finite (NaN or infinite), or
- the step's loss is above ``max(10 x the starting loss, 3 x ln(number of classes))``, where the starting loss is
  the loss of the run's first step (the model as it was handed over; kept in the resume state). The absolute floor
  3·ln(C) is three times the loss of a uniform guess, so a run that starts near zero is not stopped for noise.

Either stops the run with :class:`Diverged` (a UserError: one line, exit 2) naming the epoch, the step and the
likely cause - the learning rate. Nothing of the unfinished epoch is saved; the state of the last finished epoch
stays. Independently, :func:`require_finite` is called before every model or state is saved.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from .errors import UserError

FACTOR = 10.0         # x the starting loss
FLOOR_PER_CLASS = 3.0  # x ln(number of classes)


class Diverged(UserError):
    """Training diverged; the message names where and what to change."""


class DivergenceGuard:
    """Checks step losses against the rule in the module docstring."""

    def __init__(self, num_classes: int, what: str, lr: float, start_loss: float | None = None):
        self.floor = FLOOR_PER_CLASS * math.log(max(num_classes, 2))
        self.what, self.lr, self.start_loss = what, lr, start_loss

    @property
    def limit(self) -> float | None:
        return None if self.start_loss is None else max(FACTOR * self.start_loss, self.floor)

    def check(self, loss: float, epoch: int, step: int) -> None:
        where = f"{self.what} diverged at epoch {epoch}, step {step}"
        fix = (f"the learning rate ({self.lr:g}) is probably too high - lower it; nothing of this epoch was saved "
               "(the last finished epoch's state is kept)")
        if not math.isfinite(loss):
            raise Diverged(f"{where}: the loss is {loss}; {fix}")
        if self.start_loss is None:
            self.start_loss = loss
        elif loss > self.limit:
            raise Diverged(f"{where}: the loss is {loss:.4g}, above {self.limit:.4g} (10x the starting loss "
                           f"{self.start_loss:.4g}, at least 3 ln(classes)); {fix}")


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``state`` holding NaN or infinity."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def require_finite(state: Mapping[str, torch.Tensor], what: str, fix: str) -> None:
    """A UserError naming ``what`` and the first bad tensors when ``state`` holds NaN or infinity."""
    bad = nonfinite_tensors(state)
    if bad:
        raise UserError(f"{what} has non-finite values (NaN or infinity) in {len(bad)} tensor(s), e.g. "
                        f"{', '.join(bad[:2])}; {fix}")
