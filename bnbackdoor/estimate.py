"""Time estimates for long jobs, and the gate that stops a silent multi-hour start.

Before a job that can run for hours (training a clean model, a large attack grid point) the caller measures the
speed of a few real batches on the real device, multiplies by the job's number of batches and calls
:func:`guard`. Up to :data:`LIMIT_SECONDS` the estimate is one line on stderr and the job starts; above it the
job is refused with one line naming the estimate and the flag that allows it - unless the user allowed long
jobs: ``--allow-autotrain`` (attack/evaluation scripts, via :func:`allow_long_jobs`), ``--yes``
(``train_clean_model.py``) or the environment variable ``BNBACKDOOR_ALLOW_LONG=1``.

The gate knows nothing of training or attacks: the caller passes the step to time (:func:`measure`); the clean
trainer's is in :func:`bnbackdoor.train.train_estimate`, the attack's in
:func:`bnbackdoor.attack.finetune.attack_estimate`. Callers time a copy of their model on :func:`probe_images` (own
random generator), so the job itself (weights, random streams) is exactly what it would have been without the
estimate.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

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
    """Fastest time of ``step()``: one warm-up call (lazy initialisation, allocator), then timed calls until
    ``batches`` are done or ``budget_s`` seconds have passed - at least one, so a slow model is timed on one batch
    after its warm-up rather than for minutes. The fastest, not the mean, because what makes a call slower than the
    step itself is other work on the machine (a mean of three once read 0.52 s for a 0.16 s step right after the
    previous run of a catalogue build and refused the run as 35 minutes long).
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
    return min(times)


def probe_images(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``n`` random 32×32 images to time a job's step on; drawn from their own generator, so the global random
    stream stays untouched."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g).to(device)


def measure(what: str, step: Callable[[], None], batches: int, device: torch.device,
            extra: Callable[[], None] | None = None, extra_batches: int = 0) -> Estimate:
    """The estimate of a job of ``batches`` calls of ``step()``, plus ``extra_batches`` calls of ``extra()``
    (work that is not a training batch, e.g. explanation passes; timed on fewer calls), from a few measured calls.

    The caller builds ``step`` (on a copy of its model): this module knows how to time, not what is timed."""
    per = seconds_per_batch(step, device)
    extra_s = 0.0
    if extra is not None:
        extra_s = seconds_per_batch(extra, device, batches=2, budget_s=2.0) * extra_batches
    return Estimate(what, per, batches, extra_s, str(device))


def guard(est: Estimate, flag: str, allowed: bool | None = None, limit: float = LIMIT_SECONDS) -> None:
    """Print the estimate; refuse (one-line UserError naming ``flag`` and the estimate) when it exceeds ``limit``
    and long jobs are not allowed (``allowed`` None: ask :func:`long_jobs_allowed`)."""
    allowed = long_jobs_allowed() if allowed is None else allowed
    if est.seconds > limit and not allowed:
        raise UserError(f"{est.line()}, over the {format_duration(limit)} limit; nothing was started: pass {flag} "
                        f"(or set {ENV}=1) to run it")
    print(f"estimate: {est.line()}", file=sys.stderr)
