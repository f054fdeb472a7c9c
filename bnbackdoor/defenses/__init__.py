"""Defenses: one registry, name -> defense, one signature (docs/DESIGN.md, "Semantics").

A defender has the manipulated model and a small clean set from the **training** split (:class:`CleanSet`) -
never test images, never the trigger or the target. Every defense is a function

    defend(model, clean, *, device, progress, **options) -> DefenseOutcome

registered with :func:`register` in its own module of this package (modules are discovered automatically).
:func:`apply_defense` gives it a deep copy of the model, so the stored model is never changed, checks the option
names against the registered defaults (a typo is an error, not a silent default) and times it.

``transductive`` defenses (``batchstats``) do not produce a fixed model: their prediction for an image depends on
the other images of its test batch, so evaluation builds the test batches itself (composition ``B``, ``f``).

>>> from bnbackdoor.defenses import DEFENSES, CleanSet, apply_defense
>>> out = apply_defense("rebn", model, CleanSet(x_cal, None, "cifar10"), device="cpu")
>>> out.model, out.info, out.seconds
"""
from __future__ import annotations

import copy
import importlib
import pkgutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ..cli import OptionKind, check_options, option_label
from ..data import CleanSet
from ..errors import UserError

__all__ = ["CleanSet", "Defense", "DefenseOutcome", "DEFENSES", "DEFAULT_DEFENSES", "register", "get_defense",
           "apply_defense", "defense_label", "OPTION_KINDS"]


@dataclass
class DefenseOutcome:
    model: nn.Module                 # the defended copy (never the caller's model object)
    info: dict[str, Any] = field(default_factory=dict)   # JSON-able record of what was done
    seconds: float = 0.0


@dataclass(frozen=True)
class Defense:
    name: str
    fn: Callable[..., DefenseOutcome]
    defaults: Mapping[str, Any]
    summary: str = ""
    transductive: bool = False       # predictions depend on the test batch (evaluate with a composition)
    needs_labels: bool = False       # uses CleanSet.y
    needs_bn: bool = False           # acts on BatchNorm layers only (a model without any: not applicable)
    label: Callable[[Mapping[str, Any]], str] | None = None   # full options -> row label (default: name k=v ...)
    kinds: Mapping[str, OptionKind] = field(default_factory=dict)  # option -> type and range (OPTION_KINDS)


DEFENSES: dict[str, Defense] = {}

_EPOCHS = OptionKind(int, 1, reason="at least one pass over the clean images")
_LR = OptionKind(float, 0, 1, lo_open=True, reason="a step size above 1 diverges with these optimisers")
_SHARE = OptionKind(float, 0, 1)
# Every option name a registered defense declares, with its type and range; a defense registers other ranges
# for its own options with ``kinds=``. An option with no kind here or there is refused at registration.
OPTION_KINDS: dict[str, OptionKind] = {
    "epochs": _EPOCHS, "teacher_epochs": OptionKind(int, 0), "unlearn_epochs": OptionKind(int, 0),
    "recover_epochs": _EPOCHS, "unlearn_milestone": OptionKind(int, 0), "rounds": OptionKind(int, 1),
    "iterations": OptionKind(int, 1), "steps": OptionKind(int, 1), "K": OptionKind(int, 1),
    "batch_size": OptionKind(int, 2, reason="BatchNorm statistics and SGD need at least 2 images a batch"),
    "rebn_batch_size": OptionKind(int, 2, reason="batch statistics of one image are meaningless"),
    "test_batch": OptionKind(int, 2, reason="batch statistics of one image are meaningless"),
    "max_triggered": OptionKind(int, 1, none_ok=True),
    "lr": _LR, "unlearn_lr": _LR, "mask_lr": _LR, "inner_lr": OptionKind(float, 0, lo_open=True),
    "momentum": OptionKind(float, 0, 1, hi_open=True), "weight_decay": OptionKind(float, 0, 0.1,
                                                                                  reason="more shrinks the weights to 0"),
    "label_smoothing": OptionKind(float, 0, 1, hi_open=True), "trigger_fraction": OptionKind(float, 0, 1, lo_open=True),
    "eps": OptionKind(float, 0), "alpha": _SHARE, "threshold": _SHARE, "clean_threshold": _SHARE,
    "step": OptionKind(float, 0, 1, lo_open=True), "max_ratio": OptionKind(float, 0, 1, hi_open=True),
    "max_accuracy_drop": _SHARE, "outer_fraction": OptionKind(float, 0, 1, lo_open=True),
    "u": OptionKind(float, 0, lo_open=True), "rho": OptionKind(float, 0), "reg": OptionKind(float, 0),
    "radius": OptionKind(float, 0, lo_open=True), "fp_step": OptionKind(float, 0, lo_open=True),
    "beta1": OptionKind(float, 0), "beta2": OptionKind(float, 0), "beta3": OptionKind(float, 0),
    "p": OptionKind(float, 0, lo_open=True),
    "augment": OptionKind(bool), "adaptive": OptionKind(bool), "freeze_bn_stats": OptionKind(bool),
    "layer": OptionKind(str),
}


def register(name: str, *, summary: str = "", transductive: bool = False, needs_labels: bool = False,
             needs_bn: bool = False, label: Callable[[Mapping[str, Any]], str] | None = None,
             kinds: Mapping[str, OptionKind] | None = None,
             **defaults: Any) -> Callable[[Callable[..., DefenseOutcome]], Callable[..., DefenseOutcome]]:
    """Decorator: register ``fn`` under ``name`` with its option defaults (every option it accepts); each option's
    type and range come from ``kinds`` or :data:`OPTION_KINDS`, and its default must fit them."""
    def deco(fn: Callable[..., DefenseOutcome]) -> Callable[..., DefenseOutcome]:
        if name in DEFENSES:
            raise ValueError(f"defense '{name}' registered twice")
        declared = {k: (kinds or {}).get(k) or OPTION_KINDS.get(k) for k in defaults}
        if missing := [k for k, v in declared.items() if v is None]:
            raise ValueError(f"defense '{name}': no OptionKind for {', '.join(missing)}")
        check_options(f"defense '{name}' (its defaults)", defaults, declared)
        DEFENSES[name] = Defense(name, fn, dict(defaults), summary, transductive, needs_labels, needs_bn, label,
                                 declared)
        return fn
    return deco


def get_defense(name: str) -> Defense:
    try:
        return DEFENSES[name]
    except KeyError:
        raise UserError(f"unknown defense '{name}'; known: {', '.join(sorted(DEFENSES))}") from None


def apply_defense(name: str, model: nn.Module, clean: CleanSet, *, device: torch.device | str | None = None,
                  progress: bool = True, **options: Any) -> DefenseOutcome:
    """Run defense ``name`` on a deep copy of ``model`` with ``clean`` (training-split images only)."""
    d = get_defense(name)
    check_options(f"defense '{name}'", options, d.kinds)  # names, types and ranges, before any work
    if d.needs_labels and clean.y is None:
        raise UserError(f"defense '{name}' needs labelled clean images")
    opts = {**d.defaults, **options}
    t0 = time.time()
    out = d.fn(copy.deepcopy(model), clean, device=device, progress=progress, **opts)
    out.seconds = time.time() - t0
    out.info.setdefault("defense", name)
    out.info.setdefault("options", {k: v for k, v in opts.items()})
    out.info.setdefault("clean_images", len(clean))
    return out


def defense_label(name: str, options: Mapping[str, Any] | None = None) -> str:
    """The row label of a defense with these options (``rebn+augment``, ``batchstats B=100 f=1/B``); defenses
    without their own label function: the name plus every option that differs from its default."""
    d = get_defense(name)
    opts = {**d.defaults, **(options or {})}
    if d.label is not None:
        return d.label(opts)
    return option_label(name, d.defaults, opts)


# The defenses every attack run and evaluate_attack_defense_metrics.py report: label -> (name, options). The
# labels are a contract (metrics.json "defenses", scripts/make_results.py); f = 1/B is 0.01 at B = 100. At f = 1/B
# every triggered image costs a whole test batch of 100, so that entry scores the first 200 test images triggered
# (attack success within about +-3.5 points); its clean accuracy still uses every test image.
DEFAULT_DEFENSES: dict[str, tuple[str, dict[str, Any]]] = {
    "rebn": ("rebn", {}),
    "rebn+augment": ("rebn", {"augment": True}),
    "batchstats B=100 f=1": ("batchstats", {"test_batch": 100, "trigger_fraction": 1.0}),
    "batchstats B=100 f=1/B": ("batchstats", {"test_batch": 100, "trigger_fraction": 0.01, "max_triggered": 200}),
}


# Every module of this package registers its defense(s) on import.
for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
