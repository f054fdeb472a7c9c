"""Input-level backdoor detectors: one registry, name -> detector ("is this input triggered?", "where is the
trigger?"). They do not repair the model.

A defender has the model and a small clean set of the **training** split - never a test image, the trigger or the
target class. Every detector is a pair of pure functions, registered with :func:`register` in its own module of
this package (modules are discovered automatically):

    fit(model, clean_x, *, device, seed, **options) -> state          # calibration on clean training images only
    score(model, state, x, *, device, **options) -> Detection          # per-input score, flag, region, ...

``fit`` splits ``clean_x`` into halves (:func:`split_clean`): the first half is the detector's *reference* images
(STRIP's superimposition backgrounds, SentiNet's paste targets), the second half is *held out* and only scored, to
fix the threshold at the clean false-positive rate :data:`FPR` (5 %): an input is flagged when its suspicion score
is strictly above the (1 - FPR) quantile of the held-out scores (:func:`threshold_at_fpr`), so at most 5 % of the
held-out clean images are flagged. Scores are oriented so that higher = more suspicious.

>>> from bnbackdoor.detectors import fit_detector
>>> det = fit_detector("strip", model, clean_train_x, device="cpu")
>>> out = det.score(test_x)          # Detection: out.score, out.flagged, out.region (localisers), ...
"""
from __future__ import annotations

import importlib
import pkgutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from ..cli import OptionKind, check_options, option_label, parse_option_spec, spec_list
from ..errors import UserError
from ..models import softplus

__all__ = ["FPR", "Detection", "Detector", "FittedDetector", "DETECTORS", "register", "get_detector",
           "fit_detector", "parse_detectors", "parse_detector_spec", "detector_label", "split_clean", "threshold_at_fpr", "eval_relu", "iou"]

FPR = 0.05  # the fixed clean false-positive rate every threshold is set at (on held-out clean TRAINING images)


@dataclass
class Detection:
    """A detector's answer for a batch of B inputs (all tensors on the CPU)."""
    pred: Tensor                         # (B,) the model's prediction of the unmodified input
    flagged: Tensor                      # (B,) bool: "triggered"
    score: Tensor | None = None          # (B,) suspicion, higher = more suspicious (None: not a scoring detector)
    region: Tensor | None = None         # (B, H, W) bool: where the trigger is believed to be (localisers)
    restored_pred: Tensor | None = None  # (B,) prediction after removing the region (purifiers: Februus)
    extra: dict[str, Tensor] = field(default_factory=dict)  # other per-input values (B,), e.g. SentiNet's inert conf.

    @staticmethod
    def cat(parts: list["Detection"]) -> "Detection":
        def join(name):
            vals = [getattr(p, name) for p in parts]
            return None if vals[0] is None else torch.cat(vals)
        extra = {k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra}
        return Detection(join("pred"), join("flagged"), join("score"), join("region"), join("restored_pred"), extra)


@dataclass(frozen=True)
class Detector:
    name: str
    fit: Callable[..., dict[str, Any]]
    score: Callable[..., Detection]
    defaults: Mapping[str, Any]          # every option fit and score accept, with its fixed default
    summary: str = ""
    localises: bool = False              # Detection.region is set (IoU with the trigger is measured)
    purifies: bool = False               # Detection.restored_pred is set (attack success / accuracy after)
    calibrated: bool = True              # flags at the fixed FPR threshold; False: a binary rule, FPR as measured
    kinds: Mapping[str, OptionKind] = field(default_factory=dict)  # option -> type and range (OPTION_KINDS)


DETECTORS: dict[str, Detector] = {}
# Every option name a registered detector declares, with its type and range (checked at registration and fit).
OPTION_KINDS: dict[str, OptionKind] = {
    "n_perturb": OptionKind(int, 1, reason="STRIP's entropy needs at least one blend"),
    "n_paste": OptionKind(int, 1, reason="SentiNet's fooled rate needs at least one pasted image"),
    "alpha": OptionKind(float, 0, 1, lo_open=True, hi_open=True, reason="a blend weight strictly between 0 and 1"),
    "area": OptionKind(float, 0, 1, lo_open=True, reason="a share of the image's pixels"),
    "smooth_iterations": OptionKind(int, 0),
    "layer": OptionKind(str, none_ok=True),
}
DEFAULT_ORDER = ("strip", "sentinet", "februus")  # table order; other registered detectors follow by name


def register(name: str, *, fit: Callable[..., dict], score: Callable[..., Detection], summary: str = "",
             localises: bool = False, purifies: bool = False, calibrated: bool = True, **defaults: Any) -> Detector:
    if name in DETECTORS:
        raise ValueError(f"detector '{name}' registered twice")
    kinds = {k: OPTION_KINDS.get(k) for k in defaults}
    if missing := [k for k, v in kinds.items() if v is None]:
        raise ValueError(f"detector '{name}': no OptionKind for {', '.join(missing)}")
    check_options(f"detector '{name}' (its defaults)", defaults, kinds)
    DETECTORS[name] = Detector(name, fit, score, dict(defaults), summary, localises, purifies, calibrated, kinds)
    return DETECTORS[name]


def get_detector(name: str) -> Detector:
    try:
        return DETECTORS[name]
    except KeyError:
        raise UserError(f"unknown detector '{name}'; known: {', '.join(sorted(DETECTORS))}") from None


def parse_detector_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A detector with options, ``name[:opt=value...]`` (``strip:n_perturb=16``), read and checked like a defense's
    (:func:`bnbackdoor.cli.parse_option_spec`, the kinds of :data:`OPTION_KINDS`)."""
    return parse_option_spec(spec, get_detector, lambda d: d.kinds, "detector", example="strip:n_perturb=16")


def detector_label(name: str, options: Mapping[str, Any] | None = None) -> str:
    """A detector's row label: its name, plus each option that differs from its default."""
    return option_label(name, get_detector(name).defaults, options or {})


def parse_detectors(text: str | list[str] | None) -> list[str]:
    """``"strip,sentinet:n_paste=20"`` (or a list; None: every registered one, :data:`DEFAULT_ORDER` first) ->
    checked, distinct specs (a name, or a name with options: :func:`parse_detector_spec`)."""
    if text is None:
        rank = {n: i for i, n in enumerate(DEFAULT_ORDER)}
        return sorted(DETECTORS, key=lambda n: (rank.get(n, len(rank)), n))
    specs = spec_list(text, "--detectors", f"strip,sentinet (known: {', '.join(sorted(DETECTORS))})", "detector",
                      parse_detector_spec, detector_label)
    return [spec for spec, _, _ in specs]


@dataclass
class FittedDetector:
    detector: Detector
    model: nn.Module
    state: dict[str, Any]
    options: dict[str, Any]
    device: torch.device

    def score(self, x: Tensor, batch_size: int = 100, progress: bool = False, desc: str | None = None) -> Detection:
        """Score ``x`` (N, C, H, W) in batches (a tqdm bar with ``progress``)."""
        parts = []
        for i in tqdm(range(0, len(x), batch_size), desc=desc or self.detector.name, disable=not progress,
                      leave=False):
            with eval_relu(self.model):
                parts.append(self.detector.score(self.model, self.state, x[i:i + batch_size], device=self.device,
                                                 **self.options))
        return Detection.cat(parts)

    def info(self) -> dict[str, Any]:
        """JSON-able record: options and the calibration (threshold, held-out images)."""
        return {"detector": self.detector.name, "options": dict(self.options),
                **{k: v for k, v in self.state.items() if isinstance(v, (int, float, str, bool, type(None)))}}


def fit_detector(name: str, model: nn.Module, clean_x: Tensor, *, device: torch.device | str = "cpu", seed: int = 0,
                 **options: Any) -> FittedDetector:
    """Calibrate detector ``name`` for ``model`` on clean TRAINING images ``clean_x`` (never test images)."""
    d = get_detector(name)
    check_options(f"detector '{name}'", options, d.kinds)  # names, types and ranges, before any work
    opts = {**d.defaults, **options}
    device = torch.device(device)
    with eval_relu(model):
        state = d.fit(model, clean_x, device=device, seed=seed, **opts)
    return FittedDetector(d, model, state, opts, device)


# --- shared helpers --------------------------------------------------------------------------------------------

@contextmanager
def eval_relu(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and plain ReLU while detecting (a model fine-tuned with Softplus is deployed with ReLU)."""
    flag = model.training
    with softplus(model, None):
        model.eval()
        try:
            yield model
        finally:
            model.train(flag)


def split_clean(clean_x: Tensor, minimum: int = 4) -> tuple[Tensor, Tensor]:
    """(reference, held-out): the first and second half of the defender's clean images (a seeded subset already)."""
    if clean_x.dim() != 4 or len(clean_x) < minimum:
        raise UserError(f"a detector needs at least {minimum} clean training images (N, C, H, W); got "
                        f"{tuple(clean_x.shape)}; give more with --clean-images")
    half = len(clean_x) // 2
    return clean_x[:half], clean_x[half:]


def draw_reference(clean_x: Tensor, n: int, seed: int, what: str) -> tuple[Tensor, Tensor]:
    """(``n`` seeded images of the reference half, the held-out half): what STRIP blends with and SentiNet pastes
    onto; ``what`` names that use in the error when the reference half is too small."""
    ref, held = split_clean(clean_x)
    if len(ref) < n:
        raise UserError(f"{what} {n} clean images but the reference half has {len(ref)}; "
                        f"give at least {2 * n} clean images (--clean-images)")
    g = torch.Generator().manual_seed(seed)
    return ref[torch.randperm(len(ref), generator=g)[:n]], held


def threshold_at_fpr(clean_scores: Tensor, fpr: float = FPR) -> float:
    """The (1 - fpr) quantile of clean suspicion scores, an observed value ("higher"), so that flagging
    ``score > threshold`` flags at most ``fpr`` of those clean images."""
    return float(torch.quantile(clean_scores.double(), 1 - fpr, interpolation="higher"))


def iou(region: Tensor, mask: Tensor) -> Tensor:
    """(B,) intersection over union of bool regions (B, H, W) with one bool mask (H, W); 0 when both are empty."""
    mask = mask.to(region.device).expand_as(region)
    inter = (region & mask).flatten(1).sum(1).double()
    union = (region | mask).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


# Every module of this package registers its detector(s) on import.
for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
