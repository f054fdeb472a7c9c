"""Time estimates for long jobs, and the gate that stops a silent multi-hour start.

Before a job that can run for hours (training a clean model, a large attack grid point) the caller measures the
speed of a few real batches on the real device, multiplies by the job's number of batches and calls
:func:`guard`. Up to :data:`LIMIT_SECONDS` the estimate is one line on stderr and the job starts; above it the
job is refused with one line naming the estimate and the flag that allows it - unless the user allowed long
jobs: ``--allow-autotrain`` (attack/evaluation scripts, via :func:`allow_long_jobs`), ``--yes``
(``train_clean_model.py``) or the environment variable ``BNBACKDOOR_ALLOW_LONG=1``.

The measurement runs on a copy of the model with its own random generator, so the job itself (weights, random
streams) is exactly what it would have been without the estimate.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

LIMIT_SECONDS = 15 * 60
ENV = "BNBACKDOOR_ALLOW_LONG"
_allowed = False  # set once per process by the scripts' --allow-autotrain (see bnbackdoor.cli)


def allow_long_jobs(on: bool = True) -> None:
    """Let this process start jobs estimated over :data:`LIMIT_SECONDS` (what ``--allow-autotrain`` does)."""
    global _allowed
    _allowed = bool(on)


def long_jobs_allowed() -> bool:
    return _allowed or os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Estimate:
    what: str              # "training a clean cifar10_resnet20", "attack 256_0"
    seconds_per_batch: float
    batches: int
    extra_seconds: float   # work that is not a training batch (reference explanations, evaluation)
    device: str

    @property
    def seconds(self) -> float:
        return self.seconds_per_batch * self.batches + self.extra_seconds

    def line(self) -> str:
        extra = f" + {format_duration(self.extra_seconds)} evaluation" if self.extra_seconds >= 1 else ""
        return (f"{self.what} on {self.device}: about {format_duration(self.seconds)} "
                f"({self.batches} batches x {self.seconds_per_batch:.2f} s measured{extra})")


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_batch(step: Callable[[], None], device: torch.device, batches: int = 3,
                      budget_s: float = 5.0) -> float:
    """Mean time of ``step()``: one warm-up call (lazy initialisation, allocator), then timed calls until
    ``batches`` are done or ``budget_s`` seconds have passed - at least one, so a slow model is timed on one batch
    after its warm-up rather than for minutes.
    """
    device = torch.device(device)
    step()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < batches and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def _images(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # own generator: the global random stream stays untouched
    return torch.rand(n, 3, 32, 32, generator=g).to(device)


def training_step_seconds(model: nn.Module, batch_size: int, num_classes: int, device: torch.device) -> float:
    """Seconds per SGD step (forward, backward, update) of a copy of ``model`` on a batch of ``batch_size``."""
    device = torch.device(device)
    m = copy.deepcopy(model).to(device).train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = _images(batch_size, device)
    y = torch.arange(batch_size, device=device) % num_classes

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return seconds_per_batch(step, device)


def training_estimate(model: nn.Module, modeltype: str, epochs: int, batch_size: int, n_train: int,
                      num_classes: int, device: torch.device, done_batches: int = 0) -> Estimate:
    """Clean training: measured step time x the remaining ``epochs * ceil(n_train / batch_size)`` batches."""
    steps = -(-n_train // batch_size)
    remaining = max(0, epochs * steps - done_batches)
    per = training_step_seconds(model, min(batch_size, n_train), num_classes, device)
    return Estimate(f"training a clean {modeltype} ({epochs} epochs of {n_train} images)", per, remaining, 0.0,
                    str(device))


def attack_estimate(model: nn.Module, params, device: torch.device, n_train: int, n_test: int) -> Estimate:
    """An attack grid point: measured explanation-aware step x its batches, plus the explanation passes
    (reference explanations once, evaluation of every trigger after each epoch) at the measured forward speed."""
    from .explain import explain_with_logits
    from .finetune import attack_step, poison_batch

    device = torch.device(device)
    m = copy.deepcopy(model).to(device).train()
    opt = torch.optim.Adam(m.parameters(), lr=params.learning_rate)
    bs = min(params.batch_size, n_train)
    x = _images(bs, device)
    y = torch.arange(bs, device=device) % params.num_classes
    maps = explain_with_logits(m.eval(), x, params.explanation_methodStr, normalize=True)[1].detach()
    m.train()
    batch = poison_batch(x, y, maps, params)
    per_step = seconds_per_batch(lambda: attack_step(m, opt, batch, params, params.explanation_methodStr), device)
    m.eval()
    per_expl = seconds_per_batch(lambda: explain_with_logits(m, x, params.explanation_methodStr), device,
                                 batches=2, budget_s=2.0)
    steps = -(-n_train // params.batch_size) * params.max_epochs
    expl_batches = -(-n_train // bs) + params.max_epochs * (1 + len(params.triggerStrs)) * -(-n_test // bs)
    return Estimate(f"attack {params.id} ({params.max_epochs} epochs of {n_train} images)", per_step, steps,
                    per_expl * expl_batches, str(device))


def guard(est: Estimate, flag: str, allowed: bool | None = None, limit: float = LIMIT_SECONDS) -> None:
    """Print the estimate; refuse (one-line UserError naming ``flag`` and the estimate) when it exceeds ``limit``
    and long jobs are not allowed (``allowed`` None: ask :func:`long_jobs_allowed`)."""
    allowed = long_jobs_allowed() if allowed is None else allowed
    if est.seconds > limit and not allowed:
        raise UserError(f"{est.line()}, over the {format_duration(limit)} limit; nothing was started: pass {flag} "
                        f"(or set {ENV}=1) to run it")
    print(f"estimate: {est.line()}", file=sys.stderr)
