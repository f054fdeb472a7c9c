"""Measuring defenses: every metric of a defended model, and the composed test batches of transductive defenses.

One helper, :func:`evaluate_defenses`, is what ``attack.py`` (``metrics.json`` key ``"defenses"``), the evaluation
scripts and ``scripts/make_results.py`` share. Its records have exactly this schema::

    {label: {"defense": name, "options": {...every option...}, "seconds": s, "clean_images": n,
             **bnbackdoor.metrics.evaluate_attack keys}}

(transductive defenses add ``test_batch``, ``trigger_fraction``, ``triggered_per_batch``, ``triggered_images``
and ``test_batches``). ``seconds`` is the defense's own time (Re-BN's pass), not the evaluation's.

**Transductive defenses** (``batchstats``) predict an image from the statistics of its whole test batch, so the
evaluation builds the batches (:func:`composition`), with test batch size ``B`` and triggered fraction ``f``:

* every test batch holds exactly ``t = round(f·B)`` triggered images (rounded half up, at least 1, at most B) and
  ``B - t`` clean test images. The triggered images walk through the test images in order (each evaluated once;
  ``max_triggered`` caps how many); the clean ones are drawn, per batch, from a seeded permutation of the other
  test images (cycled when there are fewer than ``B - t``). When the last batch has fewer than ``t`` new images
  it is topped up with triggered images from the start that are not scored again, so ``t`` never changes.
* attack success, triggered accuracy and the explanation distance to the target are measured on the triggered
  images only; the untriggered target rate on the same images from the clean batches below;
* clean accuracy, fidelity and the explanation distance to the clean model's explanation are measured on
  all-clean batches of size ``B`` (consecutive test images; the last batch topped up the same way);
* explanations are computed in the same batch-statistics mode, for the whole batch at once (as any batched
  implementation does: through the shared statistics an image's explanation depends on its batch mates).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from tqdm import tqdm

from . import DEFAULT_DEFENSES, CleanSet, DefenseOutcome, apply_defense, get_defense
from .batchstats import check_composition
from ..errors import UserError
from ..metrics import (model_device, _asr_counts, _dissim, _eval_relu, _trigger_fn, attack_summary, evaluate_attack,
                      logits_and_explanations, reference_explanations)
from ..targets import target_explanation

__all__ = ["CompositionBatch", "triggered_per_batch", "composition", "evaluate_transductive", "evaluate_defenses", "repeated_batches",
           "TRANSDUCTIVE_OPTIONS"]

# Options of a transductive defense that describe its evaluation (the defense itself only records them).
TRANSDUCTIVE_OPTIONS = ("test_batch", "trigger_fraction", "max_triggered")


@dataclass(frozen=True)
class CompositionBatch:
    triggered: torch.Tensor   # (t,) test-image indices that carry the trigger in this batch
    scored: torch.Tensor      # (t,) bool: counted in the metrics (False: top-up so that the batch keeps t)
    clean: torch.Tensor       # (B - t,) test-image indices of the clean images beside them

    @property
    def size(self) -> int:
        return len(self.triggered) + len(self.clean)


def triggered_per_batch(test_batch: int, trigger_fraction: float) -> int:
    """``round(f·B)`` rounded half up, at least 1 and at most ``B``."""
    return min(test_batch, max(1, math.floor(trigger_fraction * test_batch + 0.5)))


def _chunk(start: int, size: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``start .. start+size`` of ``range(m)``; past ``m`` wrapped to the start and marked unscored."""
    idx = torch.arange(start, start + size)
    return idx % m, idx < m


def composition(n: int, test_batch: int, trigger_fraction: float, *, seed: int = 0,
                max_triggered: int | None = None) -> list[CompositionBatch]:
    """The test batches of a transductive evaluation over ``n`` test images (see the module doc)."""
    check_composition(test_batch, trigger_fraction, max_triggered)
    if n <= 0:
        raise UserError("no test images to compose batches from")
    m = n if max_triggered is None else min(n, max_triggered)
    t = triggered_per_batch(test_batch, trigger_fraction)
    c = test_batch - t
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for start in range(0, m, t):
        trig, scored = _chunk(start, t, m)
        clean = torch.empty(0, dtype=torch.long)
        if c:
            perm = torch.randperm(n, generator=gen)
            pool = perm[~torch.isin(perm, trig)]
            if len(pool) == 0:
                raise UserError(f"{n} test images cannot fill a batch of {test_batch} with {t} triggered and "
                                f"{c} other clean images; evaluate more test images")
            clean = pool.repeat(math.ceil(c / len(pool)))[:c]
        out.append(CompositionBatch(trig, scored, clean))
    return out


def _forward(model: nn.Module, x: torch.Tensor, method: str, explain: bool):
    if explain:
        return logits_and_explanations(model, x, method)
    with torch.no_grad():
        return model(x), None


def evaluate_transductive(model: nn.Module, clean_model: nn.Module, params: Any, x: torch.Tensor, y: torch.Tensor,
                          *, test_batch: int = 100, trigger_fraction: float = 1.0, max_triggered: int | None = None,
                          seed: int = 0, device: torch.device | str | None = None,
                          clean_expl: torch.Tensor | None = None, clean_pred: torch.Tensor | None = None,
                          explain: bool = True, progress: bool = True) -> dict[str, Any]:
    """The :func:`~bnbackdoor.metrics.evaluate_attack` keys of a transductive ``model`` (e.g. after ``batchstats``)
    on composed test batches of size ``test_batch`` with ``trigger_fraction`` triggered images (module doc).
    ``explain=False``: predictions only (a plain forward pass), the explanation keys are None."""
    method, agg = params.explanation_methodStr, params.stats_agg
    device = model_device(model, device)
    n = len(x)
    batches = composition(n, test_batch, trigger_fraction, seed=seed, max_triggered=max_triggered)
    if clean_expl is None or clean_pred is None:
        clean_expl, clean_pred = reference_explanations(clean_model, x, method, batch_size=test_batch, device=device,
                                                        progress=progress, with_predictions=True)
    model_pred = torch.empty(n, dtype=torch.long)
    correct = agree = 0
    mse_clean = dssim_clean = 0.0
    k = len(params.triggerStrs)
    hits, eligible, untrig, trig_correct = [0] * k, [0] * k, [0] * k, [0] * k
    mse_t, dssim_t = [0.0] * k, [0.0] * k
    triggered = 0
    with _eval_relu(model):
        # all-clean batches of size B: clean accuracy, fidelity, distance to the clean model's explanation
        for start in tqdm(range(0, n, test_batch), desc="clean batches", disable=not progress, leave=False):
            idx, keep = _chunk(start, test_batch, n)
            new = idx[keep]
            logits, maps = _forward(model, x[idx].to(device), method, explain)
            pred = logits.argmax(1).cpu()[keep]
            model_pred[new] = pred
            correct += int((pred == y[new]).sum())
            agree += int((pred == clean_pred[new]).sum())
            if explain:
                mse, dssim = _dissim(maps[keep.to(maps.device)], clean_expl[new].to(device), agg)
                mse_clean += mse.sum().item()
                dssim_clean += dssim.sum().item()
        # composed batches: t triggered + (B - t) clean images; only the scored triggered rows count
        for i, (trigger, target, tc) in enumerate(zip(params.triggerStrs, params.targetStrs,
                                                      params.target_classes)):
            apply = _trigger_fn(trigger)
            for b in tqdm(batches, desc=f"composed batches ({trigger})", disable=not progress, leave=False):
                t = len(b.triggered)
                xb = torch.cat([apply(x[b.triggered].to(device)), x[b.clean].to(device)])
                logits, maps = _forward(model, xb, method, explain)
                sel = b.scored
                idx = b.triggered[sel]
                t_pred = logits[:t].argmax(1).cpu()[sel]
                yb = y[idx]
                trig_correct[i] += int((t_pred == yb).sum())
                if tc is not None:
                    h, e = _asr_counts(t_pred, yb, int(tc))
                    hits[i] += h
                    eligible[i] += e
                    untrig[i] += _asr_counts(model_pred[idx], yb, int(tc))[0]
                if i == 0:
                    triggered += len(idx)
                if not explain:
                    continue
                t_maps = maps[:t][sel.to(maps.device)]
                goal = target_explanation(target, clean_expl=clean_expl[idx].to(device), size=t_maps.shape[-1],
                                          device=device)
                mse, dssim = _dissim(t_maps, goal, agg)
                mse_t[i] += mse.sum().item()
                dssim_t[i] += dssim.sum().item()
    out = attack_summary(params, n=n, correct=correct, agree=agree, mse_clean=mse_clean, dssim_clean=dssim_clean,
                         triggered=triggered, hits=hits, eligible=eligible, untriggered_hits=untrig,
                         triggered_correct=trig_correct, mse_target=mse_t, dssim_target=dssim_t)
    if not explain:
        out.update({k: None for k in out if k.startswith("expl_")})
    repeating = repeated_batches(n, test_batch, batches)
    if repeating:
        print(f"notice: {n} test images for test batches of {test_batch}: {repeating} of "
              f"{len(batches) + math.ceil(n / test_batch)} batches hold some image more than once (their batch "
              "statistics repeat those images); the record says so (batches_repeating_images)", file=sys.stderr)
    out.update(test_batch=test_batch, trigger_fraction=trigger_fraction,
               triggered_per_batch=triggered_per_batch(test_batch, trigger_fraction), triggered_images=triggered,
               test_batches=len(batches), batches_repeating_images=repeating)
    return out


def repeated_batches(n: int, test_batch: int, batches: list[CompositionBatch]) -> int:
    """How many of the evaluation's batches hold some test image twice: the composed ones (triggered and clean
    images of one batch are distinct; an image repeats when there are fewer others than ``B - t``) and the
    all-clean ones (topped up from the start when ``n`` is not a multiple of ``B``, repeating when ``n < B``)."""
    composed = sum(len(b.clean) != len(torch.unique(b.clean)) for b in batches)
    return composed + (1 if n < test_batch else 0)  # one all-clean batch of n images topped up to B


def evaluate_defenses(params: Any, clean_model: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                      clean: CleanSet,
                      defenses: Mapping[str, tuple[str, Mapping[str, Any]]] = DEFAULT_DEFENSES,
                      batch_size: int = 100, seed: int = 0, device: torch.device | str | None = None,
                      reference: tuple[torch.Tensor, torch.Tensor] | None = None, progress: bool = True,
                      on_outcome: Callable[[str, DefenseOutcome], None] | None = None,
                      share_batch_size: bool = True) -> dict[str, dict[str, Any]]:
    """Every defense of ``defenses`` (label -> (registered name, options)) on a fresh copy of ``model``, measured
    on the test images ``x, y``; ``clean`` is the defender's clean TRAINING set. Returns label -> record (module
    doc). A defense with a ``batch_size`` option not set in ``defenses`` gets ``batch_size`` (unless
    ``share_batch_size`` is False: then every defense runs with its registered options). ``reference``: the
    clean model's (explanations, predictions) of ``x``, if the caller has them.
    ``on_outcome(label, outcome)`` gets each defended model and the defense's own report (e.g. Re-BN's shifts)."""
    if not defenses:
        return {}
    ref, pred = reference or reference_explanations(clean_model, x, params.explanation_methodStr, batch_size=batch_size,
                                                    device=device, progress=progress, with_predictions=True)
    records: dict[str, dict[str, Any]] = {}
    for label, (name, options) in defenses.items():
        d = get_defense(name)
        options = dict(options)
        if share_batch_size and "batch_size" in d.defaults:  # its batches default to the evaluation's
            options.setdefault("batch_size", batch_size)
        outcome = apply_defense(name, model, clean, device=device, progress=progress, **options)
        opts = outcome.info["options"]
        if d.transductive:
            kw = {k: opts[k] for k in TRANSDUCTIVE_OPTIONS if k in opts}
            m = evaluate_transductive(outcome.model, clean_model, params, x, y, seed=seed, device=device,
                                      clean_expl=ref, clean_pred=pred, progress=progress, **kw)
        else:
            m = evaluate_attack(outcome.model, clean_model, params, x, y, batch_size=batch_size, device=device,
                                clean_expl=ref, clean_pred=pred, progress=progress)
        records[label] = {"defense": name, "options": dict(opts), "seconds": round(outcome.seconds, 2),
                          "clean_images": outcome.info["clean_images"], **m}
        if on_outcome is not None:
            on_outcome(label, outcome)
    return records
