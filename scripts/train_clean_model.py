#!/usr/bin/env python
"""Train a clean base model: python scripts/train_clean_model.py <modeltype> <device> [--model-id N] [--epochs E]

Before it starts it measures a few batches and prints the estimated time; a job estimated over 15 minutes needs
--yes. Resumable: rerun the same command after an interruption and it continues from the last checkpoint (every
epoch, and every 2 minutes inside an epoch).
"""
from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

from bnbackdoor.cli import (ArgumentParser, existing_dir, existing_file, float_at_least, float_range,
                            non_negative_int, output_dir, positive_float, positive_int, seed_int)
from bnbackdoor.device import PRECISIONS, parse_device
from bnbackdoor.errors import UserError, run_cli
from bnbackdoor.models import MODEL_ROOT, build_model, checkpoint_path, load_model, resolve_modeltype
from bnbackdoor.estimate import guard, long_jobs_allowed
from bnbackdoor.train import auto_train_config, train_estimate, train_model


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("modeltype", help="registry name, e.g. cifar10_resnet20, cifar10_resnet20_nbn, gtsrb_vgg13bn")
    p.add_argument("device", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--model-id", type=non_negative_int, default=0)
    p.add_argument("--seed", type=seed_int, default=None, help="default: the model id")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--weight-decay", type=float_at_least(0))
    p.add_argument("--label-smoothing", type=float_range(0, 1, hi_open=True), help="in [0, 1)")
    p.add_argument("--grad-clip", type=positive_float)
    p.add_argument("--precision", choices=PRECISIONS,
                   help="the training step's arithmetic (default: bf16 on CUDA, fp32 elsewhere, as before)")
    p.add_argument("--train-size", type=positive_int, help="train on a deterministic subset (default: all)")
    p.add_argument("--eval-every", type=non_negative_int, default=5, help="test accuracy every N epochs (0: only at the end)")
    p.add_argument("--data-root", type=existing_dir, help="default: $BNBACKDOOR_DATA, else ./datasets")
    p.add_argument("--models-root", type=output_dir, default=str(MODEL_ROOT))
    p.add_argument("--init-from", type=existing_file, metavar="CHECKPOINT",
                   help="start from this clean checkpoint of the same model type instead of a fresh initialisation "
                        "(the recipe then fine-tunes it: e.g. another label smoothing or weight decay)")
    p.add_argument("--force", action="store_true", help="retrain even if the checkpoint exists")
    p.add_argument("--yes", action="store_true",
                   help="start even if the measured estimate is over 15 minutes (env BNBACKDOOR_ALLOW_LONG=1 too)")
    a = p.parse_args()
    modeltype = resolve_modeltype(a.modeltype)
    device = parse_device(a.device)
    cfg = auto_train_config(modeltype, seed=a.model_id if a.seed is None else a.seed)
    for field in ("epochs", "lr", "batch_size", "weight_decay", "label_smoothing", "grad_clip", "precision"):
        if getattr(a, field) is not None:
            setattr(cfg, field, getattr(a, field))
    if cfg.epochs <= 0 or cfg.batch_size <= 0 or cfg.lr <= 0:
        raise UserError("--epochs, --batch-size and --lr must be positive")
    out = checkpoint_path(modeltype, a.model_id, a.models_root)
    if out.exists() and not a.force:
        raise UserError(f"{out} exists; pass --force to retrain it")
    if a.init_from is not None and Path(a.init_from).resolve() == out.resolve():
        raise UserError(f"--init-from {a.init_from} is the checkpoint this run writes; copy it elsewhere first")
    model = build_model(modeltype) if a.init_from is None else load_model(
        modeltype, path=a.init_from, fix=f"give --init-from a checkpoint written by this script for {modeltype}")
    guard(train_estimate(model, modeltype, cfg, device, out, data_root=a.data_root, train_size=a.train_size),
          "--yes", allowed=a.yes or long_jobs_allowed())
    print(f"training {modeltype} -> {out}\n{dataclasses.asdict(cfg)}")
    meta = train_model(model, modeltype, cfg, device, out, data_root=a.data_root,
                       command="python " + shlex.join(sys.argv), train_size=a.train_size, eval_every=a.eval_every)
    print(f"test accuracy {meta['test_accuracy']:.4f} after {cfg.epochs} epochs ({meta['train_seconds']:.0f} s) -> {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
