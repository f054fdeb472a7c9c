"""Clean-model trainer: SGD + Nesterov, one-cycle LR, flips and crops, label smoothing.

Resumable: after every epoch, and inside an epoch every ``checkpoint_seconds`` (default 2 minutes), the full
training state goes to ``<out>.partial.pt``; a rerun continues from there (mid-epoch too) and, with the same seed,
ends with the same weights as an uninterrupted run (data order and augmentation are drawn from generators seeded
per epoch; a mid-epoch checkpoint stores the generator's state). Progress is shown per batch.

Divergence (:mod:`bnbackdoor.divergence`): the step loss is checked every 20 batches and at every checkpoint (a
non-finite loss poisons the epoch's running sum, so none slips through); a diverged run stops with one line, the
last checkpoint stays, and no non-finite model or state is saved.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .data import dataset_info, load_cache, load_split
from .device import autocast, resolve_precision
from .divergence import DivergenceGuard, require_finite
from .errors import check_stop
from .estimate import Estimate, measure, probe_images
from .fileio import read_state, restore_training_state, torch_save
from .metrics import accuracy
from .models import MODELS, knobs, resolve_modeltype, save_checkpoint


@dataclass
class TrainConfig:
    epochs: int = 60
    lr: float = 0.1            # one-cycle peak
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    label_smoothing: float = 0.1
    warmup_frac: float = 0.15
    grad_clip: float | None = None
    train_head_only: bool = False
    augment: bool = True
    seed: int = 0
    # The step's arithmetic (bnbackdoor.device.PRECISIONS). None: the trainer's historical default, bf16 autocast on
    # CUDA and fp32 elsewhere (what every shipped clean model was trained with).
    precision: str | None = None


def step_precision(cfg: TrainConfig, device: torch.device, notice: Callable[[str], None] | None = None) -> str:
    """The precision :func:`train_model` runs ``cfg`` in on ``device`` (see ``TrainConfig.precision``)."""
    device = torch.device(device)
    return resolve_precision(cfg.precision or ("bf16" if device.type == "cuda" else "fp32"), device, notice)


def auto_train_config(modeltype: str, seed: int = 0) -> TrainConfig:
    arch = MODELS[resolve_modeltype(modeltype)][1]
    return TrainConfig(seed=seed, **knobs()[arch]["train"])


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip, vectorised over the batch."""
    b, c, h, w = x.shape
    dev = x.device
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(dev)
    flip = (torch.rand(b, generator=gen) < 0.5).to(dev)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])              # (B, H)
    cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])              # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def _partial_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.stem + ".partial.pt")


PARTIAL_KEYS = ("model", "opt", "sched", "epoch", "history", "elapsed")


def _check_before_save(guard: DivergenceGuard, model: nn.Module, mean_loss: torch.Tensor, epoch: int,
                       step: int) -> None:
    """The guard on the mean loss since the last check (NaN anywhere shows there), then finite weights."""
    guard.check(mean_loss.item(), epoch, step)
    require_finite(model.state_dict(), f"the model at epoch {epoch}, step {step}",
                   "not saved; lower the learning rate (--lr)")


def _sgd_step(model: nn.Module, batch_size: int, num_classes: int, device: torch.device, precision: str):
    """One SGD step (forward, backward, update) of a copy of ``model`` on a probe batch: what the estimate times."""
    m = copy.deepcopy(model).to(device).train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = probe_images(batch_size, device)
    y = torch.arange(batch_size, device=device) % num_classes

    def step() -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def train_estimate(model: nn.Module, modeltype: str, cfg: TrainConfig, device: torch.device, out_path,
                   data_root=None, train_size: int | None = None, partial_path=None, what: str | None = None
                   ) -> Estimate:
    """The time :func:`train_model` would take (what is left of it, when a partial run exists): the measured step
    time x the remaining ``epochs * ceil(n_train / batch_size)`` batches."""
    device = torch.device(device)
    dataset = MODELS[resolve_modeltype(modeltype)][0]
    n = len(load_cache(dataset, data_root)["y_train"])
    n = min(n, train_size) if train_size else n
    steps = (n + cfg.batch_size - 1) // cfg.batch_size
    done = 0
    partial = Path(partial_path) if partial_path is not None else _partial_path(Path(out_path))
    if partial.exists():
        state = read_state(partial, PARTIAL_KEYS)
        done = state["epoch"] * steps + state.get("step", 0)
    remaining = max(0, cfg.epochs * steps - done)
    step = _sgd_step(model, min(cfg.batch_size, n), dataset_info(dataset).num_classes, device,
                     step_precision(cfg, device, notice=lambda _: None))  # the run itself says it, once
    return measure(f"{what or f'training a clean {modeltype}'} ({cfg.epochs} epochs of {n} images)", step,
                   remaining, device)


def train_model(model: nn.Module, modeltype: str, cfg: TrainConfig, device: torch.device, out_path,
                data_root=None, command: str | None = None, dataset: str | None = None,
                train_size: int | None = None, eval_every: int = 0, checkpoint_seconds: float = 120.0, *,
                train_data: tuple[torch.Tensor, torch.Tensor] | None = None, partial_path=None,
                save: bool = True, resume_check=None, extra_state: dict | None = None,
                grad_logger=None, grad_csv=None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train ``model`` on the dataset of ``modeltype`` and save ``out_path`` atomically. Returns the meta.

    ``checkpoint_seconds``: the longest stretch of work inside an epoch that an interruption can lose.
    For a run that trains on its own data (a poisoned set, :mod:`bnbackdoor.poisoning`): ``train_data`` (uint8
    images, labels) replaces the dataset's training split; ``partial_path`` is where the resumable state goes
    (default ``<out>.partial.pt``); ``save`` False leaves saving the model (and removing the state) to the caller;
    ``extra_state`` is stored in the state and ``resume_check(state)`` may refuse a state of another run;
    ``grad_logger`` (a :class:`bnbackdoor.attack.gradlog.GradLogger`) records every step and writes ``grad_csv(epoch)``
    after each epoch (mid-epoch checkpoints are off then, so an epoch's rows are never split over a resume).
    ``stop_after``: raise :class:`~bnbackdoor.errors.StoppedEarly` once that many epochs are done and saved (the
    one-cycle schedule stays the whole run's, so a capture of the first epochs is the real run's)."""
    out_path = Path(out_path)
    dataset = dataset or MODELS[resolve_modeltype(modeltype)][0]
    torch.manual_seed(cfg.seed)
    if train_data is None:
        x_train, y_train = load_split(dataset, "train", size=train_size, seed=cfg.seed, data_root=data_root,
                                      as_uint8=True)
    else:
        x_train, y_train = train_data
    if grad_logger is not None:
        checkpoint_seconds = float("inf")
    x_test, y_test = load_split(dataset, "test", data_root=data_root)
    x_train, y_train = x_train.to(device), y_train.to(device)
    model.to(device)
    if cfg.train_head_only:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("vit.heads"))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # no weight decay on biases and BN affine parameters
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    steps = (len(y_train) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps,
                                                pct_start=cfg.warmup_frac, div_factor=10, final_div_factor=100)
    start_epoch, start_step, history, elapsed = 0, 0, [], 0.0
    partial = Path(partial_path) if partial_path is not None else _partial_path(out_path)
    guard = DivergenceGuard(dataset_info(dataset).num_classes, f"training {modeltype}", cfg.lr)
    extra_state = extra_state or {}
    if partial.exists():
        state = restore_training_state(partial, PARTIAL_KEYS, {"model": model, "opt": opt, "sched": sched},
                                       map_location=device, start_over="training", check=resume_check)
        guard.start_loss = state.get("start_loss")
        if grad_logger is not None:
            grad_logger.global_step = state.get("global_step", 0)
        start_epoch, history, elapsed = state["epoch"], state["history"], state["elapsed"]
        start_step = state.get("step", 0)  # batches already done inside epoch start_epoch (mid-epoch checkpoint)
        print(f"resuming {out_path} from epoch {start_epoch}/{cfg.epochs}"
              + (f", batch {start_step}/{steps}" if start_step else ""), file=sys.stderr)
    precision = step_precision(cfg, device)
    bar = tqdm(total=cfg.epochs * steps, initial=start_epoch * steps + start_step, desc=f"train {modeltype}",
               unit="batch", disable=not progress)
    last_save = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        check_stop(stop_after, epoch, cfg.epochs)
        t0 = time.time()
        model.train()
        gen = torch.Generator().manual_seed((cfg.seed * 100003 + epoch) % 2**64)  # any seed: wraps, never overflows
        order = torch.randperm(len(y_train), generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        first = 0
        if epoch == start_epoch and start_step:  # mid-epoch resume: same order, augmentation stream where it was
            gen.set_state(state["gen"])
            loss_sum += state["loss_sum"].to(device)
            first = start_step
        for i in range(first, steps):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            xb = x_train[idx].float().div_(255)
            if cfg.augment:
                xb = augment_batch(xb, gen)
            if grad_logger is not None:  # before the forward: train-mode BN moves its running statistics there
                grad_logger.before_step()
            with autocast(device, precision):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), y_train[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if grad_logger is not None:
                grad_logger.after_step(epoch + 1, i + 1)
            sched.step()
            loss_sum += loss.detach()
            bar.update(1)
            if i % 20 == 0 or i == first:  # .item() waits for the device: not every batch
                guard.check(loss.item(), epoch + 1, i + 1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            if i + 1 < steps and time.time() - last_save >= checkpoint_seconds:
                _check_before_save(guard, model, loss_sum / (i + 1), epoch + 1, i + 1)
                torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "epoch": epoch, "step": i + 1, "gen": gen.get_state(), "loss_sum": loss_sum.cpu(),
                            "history": history, "elapsed": elapsed + time.time() - t0, "start_loss": guard.start_loss,
                            **extra_state}, partial)
                last_save = time.time()
        elapsed += time.time() - t0
        _check_before_save(guard, model, loss_sum / steps, epoch + 1, steps)
        row = {"epoch": epoch + 1, "loss": round(loss_sum.item() / steps, 4)}
        if eval_every and ((epoch + 1) % eval_every == 0 or epoch + 1 == cfg.epochs):
            row["test_accuracy"] = round(accuracy(model, x_test, y_test, device=device, progress=False), 4)
        history.append(row)
        bar.set_postfix(row)
        if grad_logger is not None and grad_csv is not None:
            grad_logger.write_epoch(grad_csv(epoch + 1))
        torch_save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "epoch": epoch + 1, "history": history, "elapsed": elapsed, "start_loss": guard.start_loss,
                    "global_step": grad_logger.global_step if grad_logger is not None else 0, **extra_state},
                   partial)
        last_save = time.time()
    bar.close()
    test_acc = accuracy(model, x_test, y_test, device=device, progress=False)
    meta = {
        "modeltype": resolve_modeltype(modeltype), "dataset": dataset,
        "command": command or " ".join(sys.argv), "seed": cfg.seed,
        "data": f"{dataset} train split ({len(y_train)} images), flips + crops; evaluated on the full test split",
        "epochs": cfg.epochs, "config": dataclasses.asdict(cfg), "test_accuracy": round(test_acc, 4),
        "train_seconds": round(elapsed, 1), "device": str(device), "precision": precision,
        "torch": str(torch.__version__),
        "history": history,
    }
    if save:
        save_checkpoint(out_path, model, meta)
        partial.unlink(missing_ok=True)
    model.eval()
    return meta
