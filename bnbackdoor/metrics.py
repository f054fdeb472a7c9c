"""Evaluation metrics. All batched; a tqdm bar for long passes.

Images are float tensors (N, 3, H, W) in [0, 1] on any device; each batch is moved to ``device`` (default: the
model's device; models are never moved). Results are Python floats (JSON-able).

* :func:`accuracy` / :func:`predict` - clean accuracy.
* :func:`attack_success_rate` - share of triggered images whose true label is *not* the target class that are
  classified as the target class (images already of the target class cannot show an attack, so they are left out).
* :func:`fidelity` - agreement of two models' predictions.
* :func:`explanation_dissimilarity` - MSE and DSSIM of a model's explanations to reference maps (the target
  explanation, or the clean model's explanations), channels aggregated by ``stats_agg``.
* :func:`evaluate_attack` - all of the above for one attack configuration, in one pass over the data.

Explanations are always taken in eval mode with plain ReLU (docs/DESIGN.md: Softplus is for training only), with respect
to the model's predicted class, normalised per image (:func:`bnbackdoor.losses.normalize_maps`).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from .errors import UserError
from .explain import explain_with_logits
from .losses import explanation_loss
from .models.layers import softplus
from .targets import target_explanation
from .triggers import apply_trigger

__all__ = ["predict", "accuracy", "attack_success_rate", "fidelity", "explanation_dissimilarity",
           "reference_explanations", "evaluate_attack", "attack_summary", "logits_and_explanations"]

Trigger = str | Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500, device: torch.device | str | None = None,
            progress: bool = True, desc: str = "predict") -> torch.Tensor:
    """Predicted labels of ``x`` (float images in [0, 1]) in eval mode; returns a CPU tensor."""
    device = model_device(model, device)
    was_training = model.training
    model.eval()
    out = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
        out.append(model(x[i:i + batch_size].to(device, non_blocking=True)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> float:
    """Share of ``x`` classified as ``y``."""
    return (predict(model, x, **kw) == y.cpu()).float().mean().item()


# --- helpers --------------------------------------------------------------------------------------------------

def model_device(model: nn.Module, device: torch.device | str | None = None) -> torch.device:
    """``device`` if given, else where the model lives (its first parameter or buffer; the CPU for an empty one)."""
    if device is not None:
        return torch.device(device)
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _trigger_fn(trigger: Trigger) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(trigger):
        return trigger
    return lambda images: apply_trigger(trigger, images)


def _batches(n: int, batch_size: int, progress: bool, desc: str) -> Iterator[slice]:
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        yield slice(i, min(i + batch_size, n))


@contextmanager
def _eval_relu(*models: nn.Module) -> Iterator[None]:
    """Eval mode and plain ReLU for the duration; each model's training flag and activations are restored."""
    flags = [m.training for m in models]
    with ExitStack() as stack:
        for m in models:
            stack.enter_context(softplus(m, None))
            m.eval()
        try:
            yield
        finally:
            for m, f in zip(models, flags):
                m.train(f)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def logits_and_explanations(model: nn.Module, x: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and normalised, unaggregated explanation maps (w.r.t. the predicted class) of one batch, detached.

    The explanation's forward pass already yields the logits, so predictions cost nothing extra.
    """
    logits, maps = explain_with_logits(model, x, method, target=None, create_graph=False, normalize=True, agg=None)
    return logits.detach(), maps.detach()


def _dissim(maps: torch.Tensor, reference: torch.Tensor, agg: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (MSE, DSSIM) of ``maps`` to ``reference`` (per image or one broadcast map)."""
    ref = reference.to(maps.device, maps.dtype)
    return (explanation_loss(maps, ref, loss="mse", agg=agg, reduction="none").detach(),
            explanation_loss(maps, ref, loss="ssim", agg=agg, reduction="none").detach())


def _asr_counts(pred: torch.Tensor, y: torch.Tensor, target_class: int) -> tuple[int, int]:
    """(hits, eligible): eligible = true label is not the target; hit = eligible and predicted as the target."""
    eligible = y != target_class
    return int((eligible & (pred == target_class)).sum()), int(eligible.sum())


# --- single metrics -------------------------------------------------------------------------------------------

@torch.no_grad()
def attack_success_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target_class: int | None,
                        trigger: Trigger, *, batch_size: int = 500, device: torch.device | str | None = None,
                        progress: bool = True) -> float | None:
    """Share of triggered images with true label != ``target_class`` that ``model`` classifies as the target.

    ``trigger``: a trigger name (:mod:`bnbackdoor.triggers`) or a function on batches. ``None`` when not
    applicable: ``target_class`` is None (the attack keeps the label) or no image has another label.
    """
    if target_class is None:
        return None
    device = model_device(model, device)
    apply = _trigger_fn(trigger)
    hits = eligible = 0
    with _eval_relu(model):
        for s in _batches(len(x), batch_size, progress, "attack success"):
            yb = y[s].to(device)
            pred = model(apply(x[s].to(device, non_blocking=True))).argmax(1)
            h, e = _asr_counts(pred, yb, int(target_class))
            hits, eligible = hits + h, eligible + e
    return hits / eligible if eligible else None


@torch.no_grad()
def fidelity(model: nn.Module, clean_model: nn.Module, x: torch.Tensor, *, batch_size: int = 500,
             device: torch.device | str | None = None, progress: bool = True) -> float:
    """Share of ``x`` on which ``model`` and ``clean_model`` predict the same class."""
    device = model_device(model, device)
    agree = 0
    with _eval_relu(model, clean_model):
        for s in _batches(len(x), batch_size, progress, "fidelity"):
            xb = x[s].to(device, non_blocking=True)
            agree += int((model(xb).argmax(1) == clean_model(xb).argmax(1)).sum())
    return agree / len(x) if len(x) else float("nan")


def reference_explanations(clean_model: nn.Module, x: torch.Tensor, method: str, batch_size: int = 100,
                           device: torch.device | str | None = None, progress: bool = True,
                           with_predictions: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The clean model's normalised explanations of ``x`` (N, C, H, W) on the CPU, channels not aggregated
    (``with_predictions``: also its predicted labels, from the same forward pass, for ``evaluate_attack``).

    Compute them once and pass them as ``clean_expl`` / ``reference``: they are the full-disguise target and the
    baseline for the clean inputs, and stay fixed while the attacked model changes (e.g. every fine-tuning epoch).
    """
    device = model_device(clean_model, device)
    out, preds = [], []
    with _eval_relu(clean_model):
        for s in _batches(len(x), batch_size, progress, "reference explanations"):
            logits, maps = logits_and_explanations(clean_model, x[s].to(device, non_blocking=True), method)
            out.append(maps.cpu())
            preds.append(logits.argmax(1).cpu())
    ref = torch.cat(out)
    if with_predictions:  # the clean model's predictions come out of the same forward pass
        return ref, torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    return ref


def explanation_dissimilarity(model: nn.Module, x: torch.Tensor, reference: torch.Tensor, method: str, *,
                              trigger: Trigger | None = None, stats_agg: str | None = "max", batch_size: int = 100,
                              device: torch.device | str | None = None, progress: bool = True) -> dict[str, float]:
    """Mean MSE and DSSIM between ``model``'s explanations of ``x`` (triggered first when ``trigger`` is given)
    and ``reference``: per-image maps (N, C', H, W) or one map (1, C', H, W) for every image (a target mask).
    Channels of both are aggregated with ``stats_agg`` before comparing.
    """
    device = model_device(model, device)
    apply = _trigger_fn(trigger) if trigger is not None else None
    if len(reference) not in (1, len(x)):
        raise UserError(f"reference explanations: {len(reference)} maps for {len(x)} images")
    tot_mse = tot_dssim = 0.0
    with _eval_relu(model):
        for s in _batches(len(x), batch_size, progress, "explanation dissimilarity"):
            xb = x[s].to(device, non_blocking=True)
            if apply is not None:
                xb = apply(xb)
            _, maps = logits_and_explanations(model, xb, method)
            mse, dssim = _dissim(maps, reference if len(reference) == 1 else reference[s], stats_agg)
            tot_mse += mse.sum().item()
            tot_dssim += dssim.sum().item()
    n = max(len(x), 1)
    return {"mse": tot_mse / n, "dssim": tot_dssim / n}


# --- the whole evaluation -------------------------------------------------------------------------------------

def _trigger_keys(triggers: Sequence[str]) -> list[str]:
    """Per-trigger key suffixes: the trigger name, with ``#i`` appended where a name repeats."""
    return [t if list(triggers).count(t) == 1 else f"{t}#{i}" for i, t in enumerate(triggers)]


def evaluate_attack(model: nn.Module, clean_model: nn.Module, params: Any, x: torch.Tensor, y: torch.Tensor, *,
                    batch_size: int = 100, device: torch.device | str | None = None,
                    clean_expl: torch.Tensor | None = None, clean_pred: torch.Tensor | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Every metric of ``model`` for one attack configuration ``params`` (an ``AttackParams``), one data pass.

    Per batch: the model's logits and explanations of the clean images and of each triggered version, and the
    clean model's predictions (plus its explanations unless ``clean_expl`` - see :func:`reference_explanations` -
    supplies them; ``clean_pred``, the clean model's predictions of ``x`` from
    ``reference_explanations(..., with_predictions=True)``, spares its forward pass too).
    Returned keys (floats; ``None`` where not applicable):

    ``images``, ``clean_accuracy`` (vs labels), ``fidelity`` (agreement with ``clean_model``), ``acc_fid`` (the
    one of the two that ``params.acc_fidStr`` names), ``attack_success_rate`` (mean over triggers that have a
    target class), ``triggered_accuracy`` (triggered images vs their true labels, mean over triggers),
    ``expl_mse_to_target`` / ``expl_dssim_to_target`` (every triggered image's explanation vs its target
    explanation, mean over triggers), ``expl_mse_to_clean`` / ``expl_dssim_to_clean`` (clean images'
    explanations vs the clean model's), ``untriggered_target_rate`` (the same eligible images as attack success -
    true label not the target - classified as the target WITHOUT the trigger, mean over triggers: a model that
    sends everything to the target has collapsed, it has not kept a backdoor), and per trigger
    ``attack_success_rate/<trigger>``, ``untriggered_target_rate/<trigger>``, ``triggered_accuracy/<trigger>``,
    ``expl_mse_to_target/<trigger>``, ``expl_dssim_to_target/<trigger>``.

    For the clean model's own baseline, call this with ``model=clean_model`` (its ``expl_*_to_clean`` are 0).
    """
    method, agg = params.explanation_methodStr, params.stats_agg
    triggers, targets = list(params.triggerStrs), list(params.targetStrs)
    classes = list(params.target_classes)
    if not (len(triggers) == len(targets) == len(classes)):
        raise UserError(f"attack parameters: {len(triggers)} triggers, {len(targets)} targets and "
                        f"{len(classes)} target classes; need one of each per trigger")
    if clean_expl is not None and len(clean_expl) != len(x):
        raise UserError(f"clean_expl has {len(clean_expl)} maps for {len(x)} images")
    device = model_device(model, device)
    applies = [_trigger_fn(t) for t in triggers]
    n, k = len(x), len(triggers)
    correct = agree = 0
    mse_clean = dssim_clean = 0.0
    hits, eligible, trig_correct, untrig_hits = [0] * k, [0] * k, [0] * k, [0] * k
    mse_t, dssim_t = [0.0] * k, [0.0] * k

    with _eval_relu(model, clean_model):
        clean_preds = clean_pred if clean_expl is not None else None
        for s in _batches(n, batch_size, progress, "evaluate attack"):
            xb, yb = x[s].to(device, non_blocking=True), y[s].to(device)
            if clean_expl is None:
                clean_logits, ref = logits_and_explanations(clean_model, xb, method)
                clean_pred = clean_logits.argmax(1)
            else:
                if clean_preds is not None:
                    clean_pred = clean_preds[s].to(device)
                else:
                    with torch.no_grad():
                        clean_pred = clean_model(xb).argmax(1)
                ref = clean_expl[s].to(device, non_blocking=True)
            logits, maps = logits_and_explanations(model, xb, method)
            pred = logits.argmax(1)
            correct += int((pred == yb).sum())
            agree += int((pred == clean_pred).sum())
            m, d = _dissim(maps, ref, agg)
            mse_clean += m.sum().item()
            dssim_clean += d.sum().item()

            for i, (apply, target, tc) in enumerate(zip(applies, targets, classes)):
                t_logits, t_maps = logits_and_explanations(model, apply(xb), method)
                t_pred = t_logits.argmax(1)
                trig_correct[i] += int((t_pred == yb).sum())
                if tc is not None:
                    h, e = _asr_counts(t_pred, yb, int(tc))
                    hits[i] += h
                    eligible[i] += e
                    untrig_hits[i] += _asr_counts(pred, yb, int(tc))[0]
                goal = target_explanation(target, clean_expl=ref, size=t_maps.shape[-1], device=device)
                m, d = _dissim(t_maps, goal, agg)
                mse_t[i] += m.sum().item()
                dssim_t[i] += d.sum().item()

    return attack_summary(params, n=n, correct=correct, agree=agree, mse_clean=mse_clean, dssim_clean=dssim_clean,
                          triggered=n, hits=hits, eligible=eligible, untriggered_hits=untrig_hits,
                          triggered_correct=trig_correct, mse_target=mse_t, dssim_target=dssim_t)


def attack_summary(params: Any, *, n: int, correct: int, agree: int, mse_clean: float, dssim_clean: float,
                   triggered: int, hits: Sequence[int], eligible: Sequence[int], untriggered_hits: Sequence[int],
                   triggered_correct: Sequence[int], mse_target: Sequence[float], dssim_target: Sequence[float]
                   ) -> dict[str, Any]:
    """The :func:`evaluate_attack` dict from its counts and sums: ``n`` clean images (``correct``, ``agree``,
    explanation sums to the clean model's), and per trigger ``triggered`` images (the rest). Shared with the
    transductive evaluation (:mod:`bnbackdoor.defenses.evaluate`), which counts differently but reports the same."""
    classes = list(params.target_classes)
    keys = _trigger_keys(list(params.triggerStrs))
    nn_, nt = max(n, 1), max(triggered, 1)
    applicable = [classes[i] is not None and eligible[i] for i in range(len(keys))]
    asr = [hits[i] / eligible[i] if applicable[i] else None for i in range(len(keys))]
    untrig = [untriggered_hits[i] / eligible[i] if applicable[i] else None for i in range(len(keys))]
    trig_acc = [c / nt for c in triggered_correct]
    mse_t = [v / nt for v in mse_target]
    dssim_t = [v / nt for v in dssim_target]
    out: dict[str, Any] = {
        "images": n,
        "clean_accuracy": correct / nn_,
        "fidelity": agree / nn_,
    }
    out["acc_fid"] = out["fidelity"] if str(getattr(params, "acc_fidStr", "acc")) == "fid" else out["clean_accuracy"]
    out.update({
        "attack_success_rate": _mean(asr),
        "untriggered_target_rate": _mean(untrig),
        "triggered_accuracy": _mean(trig_acc),
        "expl_mse_to_target": _mean(mse_t),
        "expl_dssim_to_target": _mean(dssim_t),
        "expl_mse_to_clean": mse_clean / nn_,
        "expl_dssim_to_clean": dssim_clean / nn_,
    })
    for i, key in enumerate(keys):
        out[f"attack_success_rate/{key}"] = asr[i]
        out[f"untriggered_target_rate/{key}"] = untrig[i]
        out[f"triggered_accuracy/{key}"] = trig_acc[i]
        out[f"expl_mse_to_target/{key}"] = mse_t[i]
        out[f"expl_dssim_to_target/{key}"] = dssim_t[i]
    return out
