"""Explanation-aware fine-tuning of a clean model: the attack.

Each batch holds triggered and clean images. ``batch_makeup`` "split" (ours): the first ``percentage_trigger`` of every
shuffled batch is triggered (:func:`poison_batch`); "pairs" (the ancestor's): an epoch is every training image once
clean plus ``N p / (1 - p)`` triggered copies (p = 0.5: every image once of each), shuffled together
(:func:`pair_order`). A triggered image gets its trigger, its target class (or keeps the label when the class is
``None``) and its target explanation; a clean one keeps its label and is pushed toward the clean model's
explanation, so clean behaviour stays intact.

    loss = (1 - loss_weight) * CE(logits, labels) + loss_weight * explanation_loss(maps, target_maps)

BatchNorm follows ``params.bn_mode`` (:func:`set_finetune_mode`): ``"eval"`` (the paper's protocol and the default)
keeps the whole model in eval mode while it trains - every BatchNorm normalises with the clean model's running
statistics and never updates them, dropout is off; convolution weights, BN affine parameters and the head still
train. ``"train"`` uses batch statistics and lets the running statistics absorb the poisoned batches. Either way
every ReLU is Softplus(beta), so the explanation is twice differentiable. Explanations
during training are taken for the (relabelled) training label (``explain_class`` "label") or for the model's own
prediction ("prediction", the ancestor's); the loss compares them under ``map_norm`` (:mod:`bnbackdoor.losses`),
every image alike or, with ``pair_weighting`` "loss", each trigger's images weighted by how far its pair still is
from its target (:func:`pair_weights`).
Adam (``adam_eps``) steps at ``learning_rate``, per epoch × ``decay_rate`` ("exponential") or divided by
``1 + decay_rate (epoch - 1)`` ("inverse", the ancestor's), the run's first ``warmup_steps`` steps ramped up linearly
(:func:`warmup_factor`). Validation uses eval mode and plain ReLU.

Issue 43's levers. ``clean_term`` "distill" replaces the cross-entropy of the images whose label is kept (clean ones,
and triggered ones of a trigger without target class) by ``T^2 KL`` to the clean model's logits softened at
``distill_temperature`` (:func:`clean_loss`); relabelled images keep cross-entropy to their target. ``select``
"best" evaluates every epoch on ``validation_size`` images carved from the training split (:func:`validation_images`)
and keeps the epoch that passes the acceptance rule there with the lowest DSSIM to the target (:func:`improves`;
none passes: the last); the test images are measured every epoch but never choose.

Resumable: after every epoch the full state goes to ``<run_dir>/resume.pt``; a rerun with the same arguments
continues from there and, with the same seed, ends with the same weights as an uninterrupted run.

Divergence (:mod:`bnbackdoor.divergence`): a non-finite step loss, or one far above the starting loss, stops the run
with a one-line error; the ``resume.pt`` of the last finished epoch stays and no non-finite state is ever saved.
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..data import dataset_info, load_cache, load_split, test_images
from ..device import autocast, resolve_precision
from ..divergence import DivergenceGuard, require_finite
from ..errors import UserError, check_stop
from ..estimate import Estimate, measure, probe_images
from ..explain import explain_with_logits
from ..fileio import read_state, restore_training_state, torch_save
from .gradlog import GradLogger
from ..losses import explanation_loss
from ..metrics import evaluate_attack, reference_explanations
from ..models import softplus, weights_sha256
from .params import AttackParams
from ..report.acceptance import Verdict, acceptance
from ..targets import target_explanation
from ..triggers import apply_trigger


@dataclass
class PoisonedBatch:
    x: torch.Tensor                # images, the first ``n_triggered`` carry a trigger
    y: torch.Tensor                # labels after relabelling
    target_maps: torch.Tensor      # (B, C, H, W) explanation targets
    n_triggered: int
    trigger_index: torch.Tensor    # (B,) which trigger each image got, -1 = clean
    clean_logits: torch.Tensor | None = None  # (B, K) the clean model's logits of the untriggered x (clean_term
    #                                            "distill"; None otherwise)


def trigger_counts(batch_size: int, percentage: float, n_triggers: int) -> list[int]:
    """How many images of a batch each trigger gets: ``round(B * percentage)`` shared out as evenly as possible,
    the first triggers taking the remainder."""
    total = int(round(batch_size * percentage))
    base, extra = divmod(total, n_triggers)
    return [base + (i < extra) for i in range(n_triggers)]


def poison_batch(x: torch.Tensor, y: torch.Tensor, clean_maps: torch.Tensor, params: AttackParams,
                 clean_logits: torch.Tensor | None = None) -> PoisonedBatch:
    """Split a (shuffled) batch: the first images get the triggers in order, the rest stay clean ("split").

    ``clean_maps`` are the clean model's normalised explanations of the untriggered ``x``: the target of the clean
    part, and of triggered images whose target is ``original`` (full disguise).
    """
    index = torch.full((len(x),), -1, dtype=torch.long)
    start = 0
    for t, n in enumerate(trigger_counts(len(x), params.percentage_trigger, len(params.triggerStrs))):
        index[start:start + n] = t
        start += n
    return make_batch(x, y, clean_maps, index.to(x.device), params, clean_logits)


def make_batch(x: torch.Tensor, y: torch.Tensor, clean_maps: torch.Tensor, trigger_index: torch.Tensor,
               params: AttackParams, clean_logits: torch.Tensor | None = None) -> PoisonedBatch:
    """Image ``i`` gets trigger ``trigger_index[i]`` (-1: stays clean), its target class and target explanation."""
    x, y, targets = x.clone(), y.clone(), clean_maps.clone()
    for t in range(len(params.triggerStrs)):
        sel = trigger_index == t
        if not bool(sel.any()):
            continue
        x[sel] = apply_trigger(params.triggerStrs[t], x[sel])
        cls = params.target_classes[t]
        if cls is not None:
            y[sel] = cls
        # a shape mask (1, 1, H, W) broadcasts over the part and its channels; 'original' is clean_maps[sel]
        targets[sel] = target_explanation(params.targetStrs[t], clean_expl=clean_maps[sel])
    return PoisonedBatch(x, y, targets, int((trigger_index >= 0).sum()), trigger_index.clone(), clean_logits)


def examples_per_epoch(n: int, params: AttackParams) -> int:
    """Examples one epoch over ``n`` training images trains on: ``n`` ("split"), ``n`` plus the triggered copies
    ("pairs", :func:`pair_order`)."""
    return n + (pair_copies(n, params.percentage_trigger) if params.batch_makeup == "pairs" else 0)


def pair_copies(n: int, p: float) -> int:
    """Triggered copies in a "pairs" epoch over ``n`` images: ``round(n p / (1 - p))``, so that a share p of the
    epoch's examples is triggered."""
    return int(round(n * p / (1 - p)))


def pair_order(n: int, params: AttackParams, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One "pairs" epoch: (image index, trigger index or -1) for every example, in training order.

    The pool is the ``n`` clean images plus ``round(n p / (1 - p))`` triggered copies (p = ``percentage_trigger``:
    the pool's triggered share is p) of randomly picked images, cycling through all of them when there are more
    copies than images; the copies are shared out among the triggers as :func:`trigger_counts` shares a batch.
    """
    m = pair_copies(n, params.percentage_trigger)
    picks = torch.randperm(max(m, 1), generator=gen)[:m] % n
    trig = torch.cat([torch.full((c,), t, dtype=torch.long)
                      for t, c in enumerate(trigger_counts(m, 1.0, len(params.triggerStrs)))])
    images = torch.cat([torch.arange(n), picks])
    triggers = torch.cat([torch.full((n,), -1, dtype=torch.long), trig])
    perm = torch.randperm(n + m, generator=gen)
    return images[perm], triggers[perm]


def pair_weights(losses: torch.Tensor, trigger_index: torch.Tensor, weighting: str) -> torch.Tensor:
    """(B,) weights of the per-image explanation losses ``losses`` (detached by the caller).

    "equal": every image 1 (the batch mean). "loss": the triggered images of trigger t weigh L_t / mean_s L_s,
    L_t = the mean loss of trigger t's images in this batch (over the triggers present), so a pair that lags gets
    more of the gradient and one that is ahead less; clean images keep 1. With one trigger every weight is 1.
    """
    w = torch.ones_like(losses)
    if weighting == "equal":
        return w
    if weighting != "loss":
        raise UserError(f"pair_weighting is '{weighting}'; allowed: equal, loss")
    present = [t for t in trigger_index.unique().tolist() if t >= 0]
    if not present:
        return w
    means = torch.stack([losses[trigger_index == t].mean() for t in present])
    if means.mean() > 0:
        for t, m in zip(present, means / means.mean()):
            w[trigger_index == t] = m
    return w


def label_kept(trigger_index: torch.Tensor, target_classes: list) -> torch.Tensor:
    """(B,) bool: the images whose label the attack keeps - clean ones (-1) and those of a trigger whose target class
    is None. (A relabelled image whose true label happens to be the target still counts as relabelled.)"""
    kept = trigger_index < 0
    for t, cls in enumerate(target_classes):
        if cls is None:
            kept |= trigger_index == t
    return kept


def distillation_loss(logits: torch.Tensor, clean_logits: torch.Tensor, temperature: float,
                      reduction: str = "mean") -> torch.Tensor:
    """``T^2 KL(softmax(clean_logits / T) || softmax(logits / T))`` per image (``reduction`` "none") or its mean.

    Why T^2: the gradient of the softened KL shrinks as 1 / T^2, so the factor keeps the term's weight against the
    cross-entropy of the relabelled images (and against ``loss_weight``) the same whatever T. Computed from log-softmax
    on both sides, so a target probability that underflows contributes 0 instead of 0 * log 0 = nan."""
    t = float(temperature)
    log_p = F.log_softmax(logits / t, dim=1)
    log_q = F.log_softmax(clean_logits / t, dim=1)
    per_image = t * t * (log_q.exp() * (log_q - log_p)).sum(dim=1)
    if reduction == "none":
        return per_image
    if reduction != "mean":
        raise ValueError(f"reduction is '{reduction}'; allowed: mean, none")
    return per_image.mean()


def clean_loss(logits: torch.Tensor, batch: PoisonedBatch, params: AttackParams) -> torch.Tensor:
    """The classification term of the loss (``clean_term``): "ce" cross-entropy to the (relabelled) labels, exactly
    today's; "distill" the per-image mean of :func:`distillation_loss` to the clean model's logits on the images whose
    label is kept (:func:`label_kept`) and cross-entropy to the target class on the relabelled ones."""
    if params.clean_term == "ce":
        return F.cross_entropy(logits, batch.y)
    if params.clean_term != "distill":
        raise UserError(f"clean_term is '{params.clean_term}'; allowed: ce, distill")
    if batch.clean_logits is None:
        raise UserError("clean_term 'distill' needs the clean model's logits of the batch (PoisonedBatch.clean_logits)")
    kept = label_kept(batch.trigger_index, params.target_classes)
    kl = distillation_loss(logits, batch.clean_logits.to(logits.dtype), params.distill_temperature,
                           reduction="none")
    ce = F.cross_entropy(logits, batch.y, reduction="none")
    return torch.where(kept, kl, ce).mean()  # every image one term, so the batch weighs as plain cross-entropy does


def attack_loss(logits: torch.Tensor, maps: torch.Tensor, batch: PoisonedBatch, params: AttackParams
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, classification term - cross-entropy unless ``clean_term`` "distill" (:func:`clean_loss`) -,
    explanation loss) of one poisoned batch."""
    ce = clean_loss(logits, batch, params)
    kw = dict(loss=params.lossStr, agg=params.loss_agg, norm=params.map_norm)
    if params.pair_weighting == "equal":
        ex = explanation_loss(maps, batch.target_maps, **kw)
    else:
        per_image = explanation_loss(maps, batch.target_maps, reduction="none", **kw)
        ex = (pair_weights(per_image.detach(), batch.trigger_index, params.pair_weighting) * per_image).mean()
    w = params.loss_weight
    return (1 - w) * ce + w * ex, ce, ex


def attack_step(model: nn.Module, opt: torch.optim.Optimizer, batch: PoisonedBatch, params: AttackParams,
                method: str, precision: str | None = None) -> tuple[float, float, float]:
    """One optimizer step through the explanation (double backprop). Returns the three loss values.

    ``precision`` (default ``params.precision``; :func:`bnbackdoor.device.resolve_precision` gives what a device can
    run): "bf16" runs the forward pass, the explanation and both backward passes under autocast; the losses are
    computed in fp32 from the (upcast) logits and maps, and the weights and Adam's state stay fp32."""
    with softplus(model, params.beta):
        with autocast(batch.x.device, precision or params.precision):
            if params.loss_weight > 0:
                # "prediction": target None explains the argmax (no gradient flows through the choice)
                target = batch.y if params.explain_class == "label" else None
                logits, maps = explain_with_logits(model, batch.x, method, target=target, create_graph=True)
            else:  # explanation term switched off: skip the double backprop
                logits, maps = model(batch.x), None
        logits = logits.float()
        if maps is not None:
            loss, ce, ex = attack_loss(logits, maps.float(), batch, params)
        else:
            loss = ce = clean_loss(logits, batch, params)
            ex = torch.zeros(())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item(), ce.item(), ex.item()


def set_finetune_mode(model: nn.Module, bn_mode: str) -> nn.Module:
    """Put ``model`` in the mode its fine-tuning runs in: ``"eval"`` -> ``model.eval()`` (BatchNorm uses and keeps
    the running statistics, dropout off), ``"train"`` -> ``model.train()``."""
    modes = {"eval": False, "train": True}
    if bn_mode not in modes:
        raise UserError(f"bn_mode is '{bn_mode}'; allowed: {', '.join(modes)}")
    return model.train(modes[bn_mode])


# lr_schedule -> scheduler stepped once per epoch (epoch e trains at lr * factor(e - 1)). ExponentialLR stays for
# "exponential" so that runs made before the choice existed reproduce bit for bit.
SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, float], torch.optim.lr_scheduler.LRScheduler]] = {
    "exponential": lambda opt, decay: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=decay),
    "inverse": lambda opt, decay: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1.0 + decay * e)),
}


def warmup_factor(global_step: int, warmup_steps: int) -> float:
    """The share of the epoch's learning rate that step ``global_step`` (0-based, counted over the whole run) trains
    at: ``(global_step + 1) / warmup_steps`` during the warm-up, then 1.

    Why: the collapse of issue 27 happens in the first steps, while Adam's second-moment estimates are still
    small and every weight moves by about the full ``lr``; a ramp lets them settle first."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (global_step + 1) / warmup_steps)


def make_optimizer(model: nn.Module, params: AttackParams
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam at ``learning_rate`` with ``adam_eps`` (convolution weights at ``learning_rate x conv_lr_factor``), and
    the ``lr_schedule`` scheduler.

    Why a factor for convolutions: Adam's step is about ``lr`` per weight whatever the weight's size, so a model whose
    convolution weights are ``s`` times smaller moves ``s`` times faster relative to them at the same ``lr`` (BatchNorm
    and the head, not weight-decayed, keep their size). ``1 / s`` restores the relative step the ``lr`` was chosen for.
    """
    conv = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    conv_ids = {id(w) for w in conv}
    rest = [q for q in model.parameters() if id(q) not in conv_ids]
    groups = ([{"params": conv, "lr": params.learning_rate * params.conv_lr_factor}, {"params": rest}]
              if params.conv_lr_factor != 1.0 else [{"params": list(model.parameters())}])  # one group: as before
    opt = torch.optim.Adam(groups, lr=params.learning_rate, eps=params.adam_eps)
    return opt, SCHEDULES[params.lr_schedule](opt, params.decay_rate)


@dataclass
class FinetuneResult:
    model: nn.Module
    history: list[dict]
    seconds: float                 # fine-tuning time over all sessions of the run (resumes included)
    seconds_this_process: float = 0.0  # the part of it spent in this process
    precision: str = "fp32"        # the arithmetic the training steps ran in (bnbackdoor.device.resolve_precision)
    # select "best" only (None otherwise): the epoch whose model this is, and the validation numbers behind the
    # choice (validation_record)
    selected_epoch: int | None = None
    validation: dict | None = None

RESUME_KEYS = ("model", "opt", "sched", "epoch", "history", "seconds", "params", "seed")


@contextlib.contextmanager
def denormals_flushed(on: bool) -> Iterator[None]:
    """With ``on``, CPU float arithmetic flushes denormal numbers (below ~1.2e-38) to zero for the block, then stops
    (PyTorch has no getter for the previous state; off is its default).

    Why: fine-tuning our clean models with the gradient method fills Adam's second moments and the double backward
    with denormals, which x86 computes many times slower; measured on attack 10155 after five epochs, a step took
    1.62 s instead of 0.38 s (benchmarks/README.md, "Denormal numbers"). Flushing changes only values a float32
    can barely hold."""
    if not on:
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@torch.no_grad()
def reference_logits(clean_model: nn.Module, x: torch.Tensor, batch_size: int = 200,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """The clean model's logits of ``x`` (N, K), fp32 on the CPU, in eval mode with plain ReLU: the targets of
    clean_term "distill", fixed while the attacked model changes, so computed once (like the reference
    explanations)."""
    was_training = clean_model.training
    out = []
    with softplus(clean_model, None):
        clean_model.eval()
        try:
            for i in range(0, len(x), batch_size):
                out.append(clean_model(x[i:i + batch_size].to(device)).float().cpu())
        finally:
            clean_model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def validation_images(params: AttackParams, seed: int, data_root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``validation_size`` images that select "best" chooses the epoch on: carved from the TRAINING split, never
    the test split - the ones that follow the run's ``training_size`` training images in the same seeded order
    (:func:`bnbackdoor.data.subset_indices`), so they are disjoint from them and the training images are exactly
    those of the same run with select "last"."""
    n = len(load_cache(params.dataset, data_root)["y_train"])
    t, v = params.training_size, params.validation_size
    if t + v >= n:  # at >= n the subset is the split in file order, and the prefix property is lost
        raise UserError(f"attack {params.id}: training_size {t} + validation_size {v} must be below the "
                        f"{params.dataset} training split ({n} images), which both are carved from; lower one of them")
    x, y = load_split(params.dataset, "train", size=t + v, seed=seed, data_root=data_root)
    return x[t:], y[t:]


def validation_verdict(clean: dict, manipulated: dict, params: AttackParams) -> Verdict:
    """The acceptance rule (bnbackdoor.report.acceptance) applied to the validation numbers of one epoch."""
    return acceptance({"clean_model": clean, "manipulated_model": manipulated, "parameters": params.to_dict()})


def improves(verdict: Verdict, dssim: float | None, best_dssim: float | None) -> bool:
    """Whether an epoch replaces the best so far (``best_dssim`` None: none yet): it passes the acceptance rule and
    its DSSIM to the target is strictly lower (ties keep the earlier epoch; a missing DSSIM counts as infinite)."""
    if not verdict.accepted:
        return False
    d = math.inf if dssim is None else dssim
    return best_dssim is None or d < best_dssim


def validation_record(clean: dict, best: dict | None, last_row: dict, images: int) -> dict:
    """What ``metrics.json["validation"]`` says: the clean model's and the selected model's validation numbers and
    their verdict. ``best`` None (no epoch passed): the last epoch is kept."""
    if best is None:
        manip = {k[len("val_"):]: v for k, v in last_row.items() if k.startswith("val_") and k != "val_accepted"}
        return {"images": images, "accepted": False, "note": "no epoch passed the acceptance rule on the "
                "validation images; the last epoch is kept", "clean_model": clean, "manipulated_model": manip}
    return {"images": images, "accepted": True, "clean_model": clean, "manipulated_model": best["metrics"]}


def finetune(model: nn.Module, clean_model: nn.Module, params: AttackParams, *, device: torch.device,
             run_dir: Path, data_root=None, seed: int = 0, grad_layer: int | str | None = None,
             grad_csv: Callable[[int], Path] | None = None, on_epoch: Callable[[int, dict, nn.Module], None] | None = None,
             test_data: tuple[torch.Tensor, torch.Tensor] | None = None,
             test_ref: tuple[torch.Tensor, torch.Tensor] | None = None,
             eval_batch_size: int = 200, progress: bool = True, stop_after: int | None = None) -> FinetuneResult:
    """Fine-tune ``model`` (a copy of ``clean_model``) in place according to ``params`` (denormals flushed to zero
    throughout when ``params.flush_denormal``).

    ``grad_layer`` / ``grad_csv(epoch)``: record per-step update sizes of that block (or ``"all"``: the whole
    model, per parameter group) into that CSV.
    ``on_epoch(epoch, row, model)`` runs after each finished epoch (the caller saves intermediate models there).
    ``test_ref``: the clean model's (explanations, predictions) of the test images, if the caller has them.
    ``stop_after``: raise :class:`~bnbackdoor.errors.StoppedEarly` once that many epochs are done and saved.
    """
    with denormals_flushed(params.flush_denormal):
        return _finetune(model, clean_model, params, device=device, run_dir=run_dir, data_root=data_root, seed=seed,
                         grad_layer=grad_layer, grad_csv=grad_csv, on_epoch=on_epoch, test_data=test_data,
                         test_ref=test_ref, eval_batch_size=eval_batch_size, progress=progress,
                         stop_after=stop_after)


def _finetune(model: nn.Module, clean_model: nn.Module, params: AttackParams, *, device: torch.device,
              run_dir: Path, data_root, seed: int, grad_layer: int | str | None,
              grad_csv: Callable[[int], Path] | None, on_epoch: Callable[[int, dict, nn.Module], None] | None,
              test_data: tuple[torch.Tensor, torch.Tensor] | None, test_ref: tuple[torch.Tensor, torch.Tensor] | None,
              eval_batch_size: int, progress: bool, stop_after: int | None) -> FinetuneResult:
    method = params.explanation_methodStr
    precision = resolve_precision(params.precision, device)
    x_train, y_train = load_split(params.dataset, "train", size=params.training_size, seed=seed, data_root=data_root)
    if test_data is None:
        test_data = test_images(params.dataset, params.testing_size, seed=seed, data_root=data_root)
    x_test, y_test = test_data
    clean_model.to(device).eval()
    model.to(device)
    # The clean model's explanations are the same every epoch: compute them once (eval mode, plain ReLU).
    train_ref = reference_explanations(clean_model, x_train, method, batch_size=eval_batch_size, device=device,
                                       progress=progress)
    if test_ref is None:
        test_ref = reference_explanations(clean_model, x_test, method, batch_size=eval_batch_size, device=device,
                                          progress=progress, with_predictions=True)
    test_maps, test_pred = test_ref
    # clean_term "distill": the clean model's logits are as fixed as its explanations (eval mode, ReLU, fp32)
    train_logits = (reference_logits(clean_model, x_train, eval_batch_size, device)
                    if params.clean_term == "distill" else None)
    best_of = params.select == "best"
    if best_of:  # the validation images and the clean model's numbers on them (the acceptance rule's baseline)
        x_val, y_val = validation_images(params, seed, data_root)
        val_maps, val_pred = reference_explanations(clean_model, x_val, method, batch_size=eval_batch_size,
                                                    device=device, progress=progress, with_predictions=True)
        val_clean = evaluate_attack(clean_model, clean_model, params, x_val, y_val, batch_size=eval_batch_size,
                                    device=device, clean_expl=val_maps, clean_pred=val_pred, progress=False)
    best = None  # {"epoch", "dssim", "metrics", "state"} of the best epoch so far (select "best")
    opt, sched = make_optimizer(model, params)
    logger = GradLogger(model, grad_layer) if grad_layer is not None else None
    resume = run_dir / "resume.pt"
    start, history, seconds = 0, [], 0.0
    guard = DivergenceGuard(dataset_info(params.dataset).num_classes, "fine-tuning", params.learning_rate)
    base_sha = weights_sha256(clean_model)  # the state records its base: a resume from another one is refused
    if resume.exists():
        def same_run(state: dict) -> None:
            params.check_resume(state, seed, resume)
            started = state.get("base_model_sha256")  # None: a state saved before provenance
            if started is not None and started != base_sha:
                raise UserError(f"{resume} was fine-tuned from a base model with weights sha256 {started[:12]}..., "
                                f"but the clean model now has {base_sha[:12]}...; put that base back, or delete "
                                "that file to start over from this one")

        state = restore_training_state(resume, RESUME_KEYS, {"model": model, "opt": opt, "sched": sched},
                                       map_location=device, check=same_run)
        start, history, seconds = state["epoch"], state["history"], state["seconds"]
        best = state.get("best")  # select "best": the best epoch so far, its state included
        guard.start_loss = state.get("start_loss")
        if logger is not None:
            logger.global_step = state.get("global_step", 0)
        print(f"resuming {run_dir} after epoch {start}/{params.max_epochs}", file=sys.stderr)
    n, bs = len(y_train), params.batch_size
    pairs = params.batch_makeup == "pairs"
    seconds_before = seconds
    for epoch in range(start + 1, params.max_epochs + 1):
        check_stop(stop_after, epoch - 1, params.max_epochs)
        t0 = time.time()
        set_finetune_mode(model, params.bn_mode)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)  # any seed: wraps, never overflows
        if pairs:
            order, order_trig = pair_order(n, params, gen)
        else:
            order = torch.randperm(n, generator=gen)
        steps = math.ceil(len(order) / bs)
        sums = torch.zeros(3)
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{params.max_epochs}", disable=not progress, leave=False)
        epoch_lrs = [g["lr"] for g in opt.param_groups]  # what the scheduler set for this epoch
        for step in bar:
            if params.warmup_steps:
                f = warmup_factor((epoch - 1) * steps + step, params.warmup_steps)
                for g, lr in zip(opt.param_groups, epoch_lrs):
                    g["lr"] = lr * f
            sl = slice(step * bs, (step + 1) * bs)
            idx = order[sl]
            xb, yb, mb = x_train[idx].to(device), y_train[idx].to(device), train_ref[idx].to(device)
            lb = train_logits[idx].to(device) if train_logits is not None else None
            batch = (make_batch(xb, yb, mb, order_trig[sl].to(device), params, lb) if pairs
                     else poison_batch(xb, yb, mb, params, lb))
            if logger is not None:
                logger.before_step()
            losses = attack_step(model, opt, batch, params, method, precision)
            guard.check(losses[0], epoch, step + 1)
            if logger is not None:
                logger.after_step(epoch, step + 1)
            sums += torch.tensor(losses)
            bar.set_postfix(loss=f"{losses[0]:.4f}", ce=f"{losses[1]:.3f}", expl=f"{losses[2]:.4f}")
            if params.log_per_batch:
                history.append({"epoch": epoch, "batch": step + 1, "loss": losses[0], "ce": losses[1],
                                "expl_loss": losses[2]})
        for g, lr in zip(opt.param_groups, epoch_lrs):
            g["lr"] = lr  # the scheduler (ExponentialLR multiplies the group's lr) steps from the epoch's own
        sched.step()
        seconds += time.time() - t0
        # the last step's loss was finite, but its update may not be: check before anything is measured or saved
        require_finite(model.state_dict(), f"the model after fine-tuning epoch {epoch}",
                       f"not saved; lower the learning rate ({params.learning_rate:g})")
        model.eval()
        metrics = evaluate_attack(model, clean_model, params, x_test, y_test, batch_size=eval_batch_size,
                                  device=device, clean_expl=test_maps, clean_pred=test_pred, progress=False)
        row = {"epoch": epoch, "batch": "", "loss": sums[0].item() / steps, "ce": sums[1].item() / steps,
               "expl_loss": sums[2].item() / steps, "lr": opt.param_groups[-1]["lr"],
               "seconds": round(seconds, 1), **metrics}  # fine-tuning seconds so far: time to acceptance
        if best_of:  # choose on the validation images only; the test numbers above are just recorded
            val = evaluate_attack(model, clean_model, params, x_val, y_val, batch_size=eval_batch_size,
                                  device=device, clean_expl=val_maps, clean_pred=val_pred, progress=False)
            verdict = validation_verdict(val_clean, val, params)
            row.update({f"val_{k}": v for k, v in val.items()}, val_accepted=verdict.accepted)
            dssim = val.get("expl_dssim_to_target")
            if improves(verdict, dssim, None if best is None else best["dssim"]):
                best = {"epoch": epoch, "dssim": math.inf if dssim is None else dssim, "metrics": val,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        history.append(row)
        if logger is not None and grad_csv is not None:
            logger.write_epoch(grad_csv(epoch))
        if on_epoch is not None:
            on_epoch(epoch, row, model)
        torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "epoch": epoch, "history": history, "seconds": seconds, "params": params.to_dict(),
                    "seed": seed, "global_step": logger.global_step if logger else 0,
                    "start_loss": guard.start_loss, "base_model_sha256": base_sha,
                    **({"best": best} if best_of else {})}, resume)  # select "last": the state as before
        if progress:
            print(f"epoch {epoch}: loss {row['loss']:.4f}  clean acc {metrics.get('clean_accuracy', float('nan')):.4f}"
                  f"  ASR {_fmt(metrics.get('attack_success_rate'))}", file=sys.stderr)
    model.eval()
    if not best_of:
        return FinetuneResult(model, history, seconds, seconds - seconds_before, precision)
    if best is not None:
        model.load_state_dict(best["state"])
    last_row = next(r for r in reversed(history) if r["batch"] == "")
    selected = best["epoch"] if best is not None else last_row["epoch"]
    return FinetuneResult(model, history, seconds, seconds - seconds_before, precision, selected,
                          validation_record(val_clean, best, last_row, len(y_val)))


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


# ------------------------------------------------------------------------------------------------ estimate
def attack_estimate(model: nn.Module, params: AttackParams, device: torch.device, n_train: int, n_test: int
                    ) -> Estimate:
    """An attack grid point: the measured explanation-aware step (on a copy of ``model``) x its batches, plus the
    explanation passes (reference explanations once, evaluation of every trigger after each epoch) at the measured
    explanation speed."""
    device = torch.device(device)
    m = copy.deepcopy(model).to(device).train()
    opt, _ = make_optimizer(m, params)
    bs = min(params.batch_size, n_train)
    x = probe_images(bs, device)
    y = torch.arange(bs, device=device) % params.num_classes
    maps = explain_with_logits(m.eval(), x, params.explanation_methodStr, normalize=True)[1].detach()
    batch = poison_batch(x, y, maps, params)
    steps = -(-examples_per_epoch(n_train, params) // params.batch_size) * params.max_epochs
    expl_batches = -(-n_train // bs) + params.max_epochs * (1 + len(params.triggerStrs)) * -(-n_test // bs)
    # each closure sets the mode it is timed in: the attack step in train mode, explanations in eval mode
    return measure(f"attack {params.id} ({params.max_epochs} epochs of {n_train} images)",
                   lambda: attack_step(m.train(), opt, batch, params, params.explanation_methodStr,
                                       resolve_precision(params.precision, device, notice=lambda _: None)),
                   steps, device,
                   extra=lambda: explain_with_logits(m.eval(), x, params.explanation_methodStr),
                   extra_batches=expl_batches)


def finetune_estimate(clean_model: nn.Module, params: AttackParams, device, run_dir: Path, data_root=None
                      ) -> Estimate:
    """The attack's time from a few measured steps; a resumable run counts only its remaining epochs."""
    cache = load_cache(params.dataset, data_root)
    n_train = min(params.training_size, len(cache["y_train"]))
    n_test = min(params.testing_size, len(cache["y_test"]))
    resume = run_dir / "resume.pt"
    if resume.exists():
        done = read_state(resume, RESUME_KEYS)["epoch"]
        if 0 < done < params.max_epochs:
            params = params.replace(max_epochs=params.max_epochs - done)
    return attack_estimate(clean_model, params, device, n_train, n_test)
