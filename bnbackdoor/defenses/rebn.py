"""Re-BN: re-estimate every BatchNorm layer's running statistics on clean data.

The backdoor of an explanation-aware attack can live in the BatchNorm running statistics (they are updated by
the poisoned fine-tuning batches but are not weights). Re-BN resets them and re-estimates them from clean
training images, leaving every weight and affine parameter untouched (docs/DESIGN.md, "Semantics", Re-BN):

>>> from bnbackdoor.data import clean_set
>>> from bnbackdoor.defenses.rebn import rebn
>>> x_cal = clean_set("cifar10", 5000, seed=0).x    # Re-BN needs no labels
>>> report = rebn(model, x_cal)          # model is now in eval mode with fresh statistics
>>> print(report.table())

Registered as the defense ``rebn`` (what ``--robust`` means), options ``augment`` (False) and ``batch_size`` (100):

>>> out = apply_defense("rebn", model, CleanSet(x_cal, None, "cifar10", seed=0), augment=True)

Details that matter:

* Only the BatchNorm layers are switched to train mode during the pass; every other module stays in eval mode,
  so dropout (WideResNet ``WRN_DROPRATE``, ViT) cannot perturb the activations that later BN layers see.
* ``momentum=None`` makes PyTorch keep a cumulative average: each *batch* counts equally (mean of the per-batch
  means and of the per-batch unbiased variances), exactly like ``torch.optim.swa_utils.update_bn``. With one
  batch holding every image the statistics are the exact mean and unbiased variance of the layer inputs; with
  several batches a short last batch weighs as much as a full one, so prefer a batch size dividing the set.
* Afterwards each layer's momentum is restored and the model is in eval mode.
* ``augment=True`` (registered defense only): each calibration image is seen once, with the clean trainer's random
  crop (zero padding 4) and horizontal flip (:func:`bnbackdoor.train.augment_batch`), drawn from a generator seeded
  with ``CleanSet.seed`` - the same seed gives bit-identical statistics. The clean model's running statistics were
  accumulated on augmented images, so this estimates them the way they were made.
* The registered defense splits the set into equal batches of at most ``batch_size`` (:func:`rebn_batch_size`):
  the cumulative average weighs every batch equally, so equal batches make it the plain mean over the set.
* A model without BatchNorm (ViT, ``resnet20_nbn``, VGG13) is not silently passed: the report carries a
  ``notice`` which is also printed to stderr (or :class:`~bnbackdoor.errors.UserError` with ``strict=True``).
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
from tabulate import tabulate
from tqdm import tqdm

from ..cli import OptionKind
from ..errors import UserError
from ..metrics import model_device
from ..train import augment_batch
from . import CleanSet, DefenseOutcome, register

__all__ = ["rebn", "RebnReport", "LayerShift", "bn_layers", "rebn_batch_size", "NO_BN_NOTICE"]

NO_BN_NOTICE = "model has no BatchNorm layers; Re-BN changes nothing"


@dataclass
class LayerShift:
    """How far one layer's running statistics moved (new minus old, per channel)."""
    name: str
    channels: int
    mean_shift: float       # ||mean_new - mean_old||_2
    var_shift: float        # ||var_new - var_old||_2
    rel_mean_shift: float   # mean_shift / ||mean_old||_2 (inf when the old mean was exactly 0)
    rel_var_shift: float    # var_shift / ||var_old||_2
    # Mean shift in units of the old standard deviation, RMS over channels: how strongly the normalised
    # activations move. Scale-free, so layers are comparable.
    std_mean_shift: float


@dataclass
class RebnReport:
    layers: list[str]                       # names of the BN layers whose statistics were re-estimated
    images: int                             # calibration images forwarded
    batches: int
    shifts: list[LayerShift] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # BN layers without running stats (always batch stats)
    notice: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.layers)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RebnReport":
        """Inverse of :meth:`to_dict` (a null relative shift comes back as inf)."""
        shifts = [LayerShift(**{k: (math.inf if v is None else v) for k, v in s.items()}) for s in d["shifts"]]
        return cls(layers=list(d["layers"]), images=d["images"], batches=d["batches"], shifts=shifts,
                   skipped=list(d["skipped"]), notice=d.get("notice"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (floats, strings, lists)."""
        d = asdict(self)
        d["shifts"] = [{k: _jsonable(v) for k, v in s.items()} for s in d["shifts"]]
        return d

    def table(self, floatfmt: str = ".4g") -> str:
        """Per-layer shifts as a plain-text table (one row per layer), or the notice."""
        if not self.layers:
            return f"Re-BN: {self.notice or 'nothing to update'}"
        rows = [[s.name, s.channels, s.mean_shift, s.var_shift, s.rel_mean_shift, s.rel_var_shift,
                 s.std_mean_shift] for s in self.shifts]
        head = f"Re-BN: {len(self.layers)} BatchNorm layers re-estimated on {self.images} images " \
               f"({self.batches} batches)"
        if self.skipped:
            head += f"; skipped (no running stats): {', '.join(self.skipped)}"
        return head + "\n" + tabulate(
            rows, headers=["layer", "C", "|Δmean|", "|Δvar|", "|Δmean|/|mean|", "|Δvar|/|var|", "RMS Δmean/std"],
            floatfmt=floatfmt)


def _jsonable(v: Any) -> Any:
    # JSON has no inf/nan; a relative shift from an all-zero mean is reported as null.
    return None if isinstance(v, float) and not math.isfinite(v) else v


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BatchNorm layer (1d/2d/3d, SyncBatchNorm, lazy ones) with its dotted name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _iter_batches(data, batch_size: int) -> Iterator[torch.Tensor]:
    """Image batches from a tensor (sliced) or an iterable of tensors / (x, y, ...) tuples / dicts with 'x'."""
    if isinstance(data, torch.Tensor):
        for i in range(0, len(data), batch_size):
            yield data[i:i + batch_size]
        return
    for b in data:
        if isinstance(b, (tuple, list)):
            b = b[0]
        elif isinstance(b, dict):
            b = b["x"]
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"rebn: a batch must be a tensor or an (x, y) tuple, got {type(b).__name__}")
        yield b


def _shift(name: str, old_mean: torch.Tensor, old_var: torch.Tensor, m: nn.modules.batchnorm._BatchNorm) -> LayerShift:
    om, ov = old_mean.double(), old_var.double()
    nm, nv = m.running_mean.double(), m.running_var.double()
    dm, dv = (nm - om).norm().item(), (nv - ov).norm().item()
    om_n, ov_n = om.norm().item(), ov.norm().item()
    eps = m.eps
    return LayerShift(
        name=name, channels=int(om.numel()), mean_shift=dm, var_shift=dv,
        rel_mean_shift=dm / om_n if om_n > 0 else (0.0 if dm == 0 else math.inf),
        rel_var_shift=dv / ov_n if ov_n > 0 else (0.0 if dv == 0 else math.inf),
        std_mean_shift=((nm - om) ** 2 / (ov + eps)).mean().sqrt().item())


def rebn(model: nn.Module, data: torch.Tensor | Iterable, *, batch_size: int = 256, max_images: int | None = None,
         device: torch.device | str | None = None, progress: bool = True, strict: bool = False) -> RebnReport:
    """Reset and re-estimate every BatchNorm layer's running statistics on clean images, in place.

    ``data``: float images N×3×H×W in [0, 1] (uint8 is scaled by 1/255), or an iterable of batches (tensors or
    ``(x, y)`` tuples, e.g. a DataLoader; its own batch size then applies). ``max_images`` caps how many images
    are forwarded (the last batch is cut). The model must already be on ``device`` (default: its own device);
    batches are moved there one at a time. Returns a :class:`RebnReport`; the model ends in eval mode.
    """
    if batch_size <= 0:
        raise UserError(f"Re-BN batch size must be positive, got {batch_size}")
    if max_images is not None and max_images <= 0:
        raise UserError(f"Re-BN max_images must be positive, got {max_images}")
    named = bn_layers(model)
    # Layers created with track_running_stats=False always normalise with batch statistics: nothing to re-estimate.
    layers = [(n, m) for n, m in named if m.track_running_stats and m.running_mean is not None]
    skipped = [n for n, m in named if not (m.track_running_stats and m.running_mean is not None)]
    if not layers:
        notice = NO_BN_NOTICE if not named else \
            f"{NO_BN_NOTICE} (its {len(named)} BatchNorm layers keep no running statistics)"
        if strict:
            raise UserError(notice)
        print(f"notice: {notice}", file=sys.stderr)
        model.eval()
        return RebnReport(layers=[], images=0, batches=0, skipped=skipped, notice=notice)

    device = model_device(model, device)
    old = {n: (m.running_mean.detach().clone(), m.running_var.detach().clone(),
               m.num_batches_tracked.detach().clone() if m.num_batches_tracked is not None else None)
           for n, m in layers}
    momenta = {n: m.momentum for n, m in layers}

    # Everything in eval mode except the BN layers: dropout / stochastic depth stay off during the pass.
    model.eval()
    for _, m in layers:
        m.reset_running_stats()
        m.momentum = None   # cumulative average over batches
        m.train()
    images = batches = 0
    total = None
    if isinstance(data, torch.Tensor):
        total = math.ceil(min(len(data), max_images or len(data)) / batch_size)
    try:
        with torch.no_grad():
            bar = tqdm(_iter_batches(data, batch_size), total=total, desc="Re-BN", disable=not progress,
                       leave=False)
            for xb in bar:
                if max_images is not None:
                    xb = xb[:max_images - images]
                if len(xb) == 0:
                    break
                xb = xb.to(device, non_blocking=True)
                if not xb.is_floating_point():
                    xb = xb.float().div_(255.0)
                model(xb)
                images += len(xb)
                batches += 1
                if max_images is not None and images >= max_images:
                    break
        if images == 0:
            raise UserError("Re-BN got no calibration images; pass a non-empty set of clean training images")
    except BaseException:
        # Leave the model as it was: an empty or failing pass must not leave reset statistics behind.
        for n, m in layers:
            m.running_mean.copy_(old[n][0])
            m.running_var.copy_(old[n][1])
            if old[n][2] is not None:
                m.num_batches_tracked.copy_(old[n][2])
        raise
    finally:
        for n, m in layers:
            m.momentum = momenta[n]
        model.eval()

    shifts = [_shift(n, old[n][0], old[n][1], m) for n, m in layers]
    return RebnReport(layers=[n for n, _ in layers], images=images, batches=batches, shifts=shifts,
                      skipped=skipped)


def rebn_batch_size(n: int, cap: int) -> int:
    """Largest batch size <= ``cap`` splitting ``n`` images into equal batches up to one image
    (5000 by 100 -> 100; 512 by 100 -> 86: five of 86 and one of 82)."""
    if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
        raise UserError(f"the batch size must be a positive integer, got {cap!r}")
    if n <= 0:
        return cap
    k = math.ceil(n / cap)
    return math.ceil(n / k)


def _augmented(x: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """``x`` in batches, each through the clean trainer's crops and flips (one seeded generator for the pass)."""
    gen = torch.Generator().manual_seed(int(seed))
    for xb in _iter_batches(x, batch_size):
        if not xb.is_floating_point():
            xb = xb.float().div_(255.0)
        yield augment_batch(xb, gen)


@register("rebn", summary="re-estimate every BatchNorm's running statistics on clean training images",
          label=lambda o: "rebn+augment" if o["augment"] else "rebn", augment=False, batch_size=100,
          kinds={"batch_size": OptionKind(int, 1, reason="forward passes only: any batch of images")})
def _rebn_defense(model: nn.Module, clean: CleanSet, *, device=None, progress: bool = True, augment: bool = False,
                  batch_size: int = 100) -> DefenseOutcome:
    if not isinstance(augment, bool):
        raise UserError(f"rebn option augment must be true or false, got {augment!r}")
    bs = rebn_batch_size(len(clean.x), batch_size)
    if device is not None:
        model.to(device)
    data = _augmented(clean.x, bs, clean.seed) if augment else clean.x
    report = rebn(model, data, batch_size=bs, device=device, progress=progress)
    return DefenseOutcome(model, {"report": report.to_dict(), "batch_size": bs, "augment": augment})
