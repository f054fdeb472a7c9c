"""Test-time BatchNorm (``batchstats``): every BatchNorm normalises with the statistics of the current test batch.

This is what the paper's code evaluates as "robust" (``model.train()`` with ``track_running_stats=False`` on test
batches of 64-100 images that all carry the trigger): the batch mean absorbs the trigger's shift. It needs no clean
data and changes no number in the model - the running buffers are never read or written - but it is
**transductive**: an image's prediction depends on the other images of its test batch. Its numbers therefore
always come with the test batch size ``B`` (option ``test_batch``, default 100, the paper's) and the triggered
fraction ``f`` of each batch (option ``trigger_fraction``, default 1.0, the paper's; ``1/B`` = one triggered image
among clean ones, as a deployed model would meet an attacker). ``max_triggered`` caps how many test images are
evaluated triggered (None: all) - at ``f = 1/B`` every triggered image costs a whole batch. The evaluation itself
is :func:`bnbackdoor.defenses.evaluate.evaluate_transductive`.

The defended copy keeps every BatchNorm layer in batch-statistics mode even when ``.eval()`` is called on the
model (all other modules - dropout - follow ``.eval()`` as usual), so every evaluation routine, explanations
included, runs in the same mode. Its BN layers stay instances of their classes (explanation code that looks for
BatchNorm still finds it).
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError
from . import CleanSet, DefenseOutcome, register

__all__ = ["batch_statistics", "uses_batch_statistics"]


class _BatchStatsMixin:
    """Always in training mode (batch statistics); ``track_running_stats`` is off, so the buffers are untouched."""

    def train(self, mode: bool = True):  # noqa: ARG002 - the mode is ignored on purpose
        return super().train(True)


_CLASSES: dict[type, type] = {}


def _batchstats_class(cls: type) -> type:
    if issubclass(cls, _BatchStatsMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"BatchStats{cls.__name__}", (_BatchStatsMixin, cls), {"__module__": __name__})
    return _CLASSES[cls]


def batch_statistics(model: nn.Module) -> list[str]:
    """Switch every BatchNorm layer of ``model`` (in place) to batch statistics for good; every other module is
    put in eval mode. Returns the names of the switched layers."""
    names = []
    model.eval()
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.__class__ = _batchstats_class(type(m))
            # With training=True and track_running_stats=False, _BatchNorm.forward passes no running buffers to
            # F.batch_norm: batch statistics, and neither running_mean/var nor num_batches_tracked change.
            m.track_running_stats = False
            m.train()
            names.append(name)
    return names


def uses_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchStatsMixin) for m in model.modules())


def _label(options) -> str:
    b, f = options["test_batch"], options["trigger_fraction"]
    f_text = "1/B" if b > 1 and abs(f * b - 1) < 1e-9 else f"{f:g}"
    return f"batchstats B={b} f={f_text}"


@register("batchstats", summary="test-time BatchNorm: normalise with the current test batch's statistics",
          transductive=True, label=_label, test_batch=100, trigger_fraction=1.0, max_triggered=None)
def _batchstats_defense(model: nn.Module, clean: CleanSet, *, device=None, progress: bool = True,
                        test_batch: int = 100, trigger_fraction: float = 1.0,
                        max_triggered: int | None = None) -> DefenseOutcome:
    check_composition(test_batch, trigger_fraction, max_triggered)
    if device is not None:
        model.to(device)
    layers = batch_statistics(model)
    info = {"clean_images": 0, "layers": layers, "test_batch": test_batch, "trigger_fraction": trigger_fraction,
            "max_triggered": max_triggered}
    if not layers:
        info["notice"] = "model has no BatchNorm layers; batchstats changes nothing"
    return DefenseOutcome(model, info)


def check_composition(test_batch, trigger_fraction, max_triggered=None) -> None:
    """One-line errors for the evaluation options of a transductive defense."""
    if isinstance(test_batch, bool) or not isinstance(test_batch, int) or test_batch < 2:
        raise UserError(f"test batch size must be an integer >= 2 (batch statistics of one image are "
                        f"meaningless), got {test_batch!r}")
    if isinstance(trigger_fraction, bool) or not isinstance(trigger_fraction, (int, float)) \
            or not 0 < trigger_fraction <= 1:
        raise UserError(f"trigger fraction must be a number in (0, 1], got {trigger_fraction!r}")
    if max_triggered is not None and (isinstance(max_triggered, bool) or not isinstance(max_triggered, int)
                                      or max_triggered < 1):
        raise UserError(f"max_triggered must be null or a positive integer, got {max_triggered!r}")
