"""Explanation-aware fine-tuning of a clean model: the attack.

Each batch is split into a triggered part and a clean part (:func:`poison_batch`). The triggered part gets its
trigger, its target class (or keeps the label when the class is ``None``) and its target explanation; the clean
part keeps its label and is pushed toward the clean model's explanation, so clean behaviour stays intact.

    loss = (1 - loss_weight) * CE(logits, labels) + loss_weight * explanation_loss(maps, target_maps)

BatchNorm follows ``params.bn_mode`` (:func:`set_finetune_mode`): ``"eval"`` (the paper's protocol and the default)
keeps the whole model in eval mode while it trains - every BatchNorm normalises with the clean model's running
statistics and never updates them, dropout is off; convolution weights, BN affine parameters and the head still
train. ``"train"`` uses batch statistics and lets the running statistics absorb the poisoned batches. Either way
every ReLU is Softplus(beta), so the explanation is twice differentiable. Explanations
during training are taken for the (relabelled) training label. Validation uses eval mode and plain ReLU.

Resumable: after every epoch the full state goes to ``<run_dir>/resume.pt``; a rerun with the same arguments
continues from there and, with the same seed, ends with the same weights as an uninterrupted run.

Divergence (:mod:`bnbackdoor.divergence`): a non-finite step loss, or one far above the starting loss, stops the run
with a one-line error; the ``resume.pt`` of the last finished epoch stays and no non-finite state is ever saved.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .data import dataset_info, load_split
from .divergence import DivergenceGuard, require_finite
from .errors import UserError
from .explain import explain_with_logits
from .fileio import restore_training_state, torch_save
from .gradlog import GradLogger
from .losses import explanation_loss
from .metrics import evaluate_attack, reference_explanations
from .models import softplus
from .params import AttackParams
from .targets import target_explanation
from .triggers import apply_trigger


@dataclass
class PoisonedBatch:
    x: torch.Tensor                # images, the first ``n_triggered`` carry a trigger
    y: torch.Tensor                # labels after relabelling
    target_maps: torch.Tensor      # (B, C, H, W) explanation targets
    n_triggered: int
    trigger_index: torch.Tensor    # (B,) which trigger each image got, -1 = clean


def trigger_counts(batch_size: int, percentage: float, n_triggers: int) -> list[int]:
    """How many images of a batch each trigger gets: ``round(B * percentage)`` shared out as evenly as possible,
    the first triggers taking the remainder."""
    total = int(round(batch_size * percentage))
    base, extra = divmod(total, n_triggers)
    return [base + (i < extra) for i in range(n_triggers)]


def poison_batch(x: torch.Tensor, y: torch.Tensor, clean_maps: torch.Tensor, params: AttackParams) -> PoisonedBatch:
    """Split a (shuffled) batch: the first images get the triggers in order, the rest stay clean.

    ``clean_maps`` are the clean model's normalised explanations of the untriggered ``x``: the target of the clean
    part, and of triggered images whose target is ``original`` (full disguise).
    """
    x, y, targets = x.clone(), y.clone(), clean_maps.clone()
    index = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
    start = 0
    for t, n in enumerate(trigger_counts(len(x), params.percentage_trigger, len(params.triggerStrs))):
        sl = slice(start, start + n)
        start += n
        if n == 0:
            continue
        x[sl] = apply_trigger(params.triggerStrs[t], x[sl])
        cls = params.target_classes[t]
        if cls is not None:
            y[sl] = cls
        # a shape mask (1, 1, H, W) broadcasts over the part and its channels; 'original' is clean_maps[sl]
        targets[sl] = target_explanation(params.targetStrs[t], clean_expl=clean_maps[sl])
        index[sl] = t
    return PoisonedBatch(x, y, targets, start, index)


def attack_loss(logits: torch.Tensor, maps: torch.Tensor, batch: PoisonedBatch, params: AttackParams
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, cross-entropy, explanation loss) of one poisoned batch."""
    ce = F.cross_entropy(logits, batch.y)
    ex = explanation_loss(maps, batch.target_maps, loss=params.lossStr, agg=params.loss_agg)
    w = params.loss_weight
    return (1 - w) * ce + w * ex, ce, ex


def attack_step(model: nn.Module, opt: torch.optim.Optimizer, batch: PoisonedBatch, params: AttackParams,
                method: str) -> tuple[float, float, float]:
    """One optimizer step through the explanation (double backprop). Returns the three loss values."""
    with softplus(model, params.beta):
        if params.loss_weight > 0:
            logits, maps = explain_with_logits(model, batch.x, method, target=batch.y, create_graph=True)
            loss, ce, ex = attack_loss(logits, maps, batch, params)
        else:  # explanation term switched off: skip the double backprop
            logits = model(batch.x)
            loss = ce = F.cross_entropy(logits, batch.y)
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


@dataclass
class FinetuneResult:
    model: nn.Module
    history: list[dict]
    seconds: float                 # fine-tuning time over all sessions of the run (resumes included)
    seconds_this_process: float = 0.0  # the part of it spent in this process

RESUME_KEYS = ("model", "opt", "sched", "epoch", "history", "seconds", "params", "seed")


def finetune(model: nn.Module, clean_model: nn.Module, params: AttackParams, *, device: torch.device,
             run_dir: Path, data_root=None, seed: int = 0, grad_layer: int | str | None = None,
             grad_csv: Callable[[int], Path] | None = None, on_epoch: Callable[[int, dict, nn.Module], None] | None = None,
             test_data: tuple[torch.Tensor, torch.Tensor] | None = None,
             test_ref: tuple[torch.Tensor, torch.Tensor] | None = None,
             eval_batch_size: int = 200, progress: bool = True) -> FinetuneResult:
    """Fine-tune ``model`` (a copy of ``clean_model``) in place according to ``params``.

    ``grad_layer`` / ``grad_csv(epoch)``: record per-step update sizes of that block (or ``"all"``: the whole
    model, per parameter group) into that CSV.
    ``on_epoch(epoch, row, model)`` runs after each finished epoch (the caller saves intermediate models there).
    ``test_ref``: the clean model's (explanations, predictions) of the test images, if the caller has them.
    """
    method = params.explanation_methodStr
    x_train, y_train = load_split(params.dataset, "train", size=params.training_size, seed=seed, data_root=data_root)
    if test_data is None:
        test_data = load_split(params.dataset, "test", size=params.testing_size, seed=seed, data_root=data_root)
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
    opt = torch.optim.Adam(model.parameters(), lr=params.learning_rate)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=params.decay_rate)
    logger = GradLogger(model, grad_layer) if grad_layer is not None else None
    resume = run_dir / "resume.pt"
    start, history, seconds = 0, [], 0.0
    guard = DivergenceGuard(dataset_info(params.dataset).num_classes, "fine-tuning", params.learning_rate)
    if resume.exists():
        def same_run(state: dict) -> None:
            if state["params"] != params.to_dict() or state["seed"] != seed:
                raise UserError(f"{resume} belongs to a run with other parameters or seed; use another --save_path "
                                "or delete that file to start over")

        state = restore_training_state(resume, RESUME_KEYS, {"model": model, "opt": opt, "sched": sched},
                                       map_location=device, check=same_run)
        start, history, seconds = state["epoch"], state["history"], state["seconds"]
        guard.start_loss = state.get("start_loss")
        if logger is not None:
            logger.global_step = state.get("global_step", 0)
        print(f"resuming {run_dir} after epoch {start}/{params.max_epochs}", file=sys.stderr)
    n, bs = len(y_train), params.batch_size
    steps = math.ceil(n / bs)
    seconds_before = seconds
    for epoch in range(start + 1, params.max_epochs + 1):
        t0 = time.time()
        set_finetune_mode(model, params.bn_mode)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen)
        sums = torch.zeros(3)
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{params.max_epochs}", disable=not progress, leave=False)
        for step in bar:
            idx = order[step * bs:(step + 1) * bs]
            batch = poison_batch(x_train[idx].to(device), y_train[idx].to(device), train_ref[idx].to(device), params)
            if logger is not None:
                logger.before_step()
            losses = attack_step(model, opt, batch, params, method)
            guard.check(losses[0], epoch, step + 1)
            if logger is not None:
                logger.after_step(epoch, step + 1)
            sums += torch.tensor(losses)
            bar.set_postfix(loss=f"{losses[0]:.4f}", ce=f"{losses[1]:.3f}", expl=f"{losses[2]:.4f}")
            if params.log_per_batch:
                history.append({"epoch": epoch, "batch": step + 1, "loss": losses[0], "ce": losses[1],
                                "expl_loss": losses[2]})
        sched.step()
        seconds += time.time() - t0
        # the last step's loss was finite, but its update may not be: check before anything is measured or saved
        require_finite(model.state_dict(), f"the model after fine-tuning epoch {epoch}",
                       f"not saved; lower the learning rate ({params.learning_rate:g})")
        model.eval()
        metrics = evaluate_attack(model, clean_model, params, x_test, y_test, batch_size=eval_batch_size,
                                  device=device, clean_expl=test_maps, clean_pred=test_pred, progress=False)
        row = {"epoch": epoch, "batch": "", "loss": sums[0].item() / steps, "ce": sums[1].item() / steps,
               "expl_loss": sums[2].item() / steps, "lr": opt.param_groups[0]["lr"], **metrics}
        history.append(row)
        if logger is not None and grad_csv is not None:
            logger.write_epoch(grad_csv(epoch))
        if on_epoch is not None:
            on_epoch(epoch, row, model)
        torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "epoch": epoch, "history": history, "seconds": seconds, "params": params.to_dict(),
                    "seed": seed, "global_step": logger.global_step if logger else 0,
                    "start_loss": guard.start_loss}, resume)
        if progress:
            print(f"epoch {epoch}: loss {row['loss']:.4f}  clean acc {metrics.get('clean_accuracy', float('nan')):.4f}"
                  f"  ASR {_fmt(metrics.get('attack_success_rate'))}", file=sys.stderr)
    model.eval()
    return FinetuneResult(model, history, seconds, seconds - seconds_before)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"
