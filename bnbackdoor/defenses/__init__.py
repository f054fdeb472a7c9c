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

from ..data import CleanSet
from ..errors import UserError

__all__ = ["CleanSet", "Defense", "DefenseOutcome", "DEFENSES", "DEFAULT_DEFENSES", "register", "get_defense",
           "apply_defense", "defense_label", "parse_spec"]


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


DEFENSES: dict[str, Defense] = {}


def register(name: str, *, summary: str = "", transductive: bool = False, needs_labels: bool = False,
             needs_bn: bool = False, label: Callable[[Mapping[str, Any]], str] | None = None,
             **defaults: Any) -> Callable[[Callable[..., DefenseOutcome]], Callable[..., DefenseOutcome]]:
    """Decorator: register ``fn`` under ``name`` with its option defaults (every option it accepts)."""
    def deco(fn: Callable[..., DefenseOutcome]) -> Callable[..., DefenseOutcome]:
        if name in DEFENSES:
            raise ValueError(f"defense '{name}' registered twice")
        DEFENSES[name] = Defense(name, fn, dict(defaults), summary, transductive, needs_labels, needs_bn, label)
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
    unknown = sorted(set(options) - set(d.defaults))
    if unknown:
        raise UserError(f"defense '{name}' has no option {', '.join(unknown)}; "
                        f"its options: {', '.join(d.defaults) or 'none'}")
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
    changed = [f"{k}={v}" for k, v in opts.items() if d.defaults.get(k) != v]
    return " ".join([name, *changed])


def _typed(name: str, key: str, text: str, default: Any) -> Any:
    """``text`` as the type of the option's default (bool: true/false/1/0)."""
    t = text.strip()
    try:
        if isinstance(default, bool):
            if t.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return t.lower() in ("true", "1")
        if isinstance(default, int):
            return int(t)
        if isinstance(default, float):
            value = float(t)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError
            return value
    except ValueError:
        raise UserError(f"defense '{name}': option {key}={text} is not a {type(default).__name__} "
                        f"(its default is {default!r})") from None
    return t


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A defense with options, ``name[:opt=value[:opt=value...]]``: ``finetune:freeze_bn_stats=true`` ->
    ``("finetune", {"freeze_bn_stats": True})``; each value is read as its default's type, an unknown option is an
    error."""
    name, *parts = [p.strip() for p in spec.split(":")]
    d = get_defense(name)
    opts: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"defense '{spec}': options are written name:option=value, e.g. finetune:freeze_bn_stats=true")
        if key not in d.defaults:
            raise UserError(f"defense '{name}' has no option {key}; its options: {', '.join(d.defaults) or 'none'}")
        opts[key] = _typed(name, key, value, d.defaults[key])
    return name, opts


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
