#!/usr/bin/env python
"""Evaluate a stored attack: python evaluate_models.py <attackid> <device> [--robust] [--save_path output/]

Loads manipulated_models/<id>/ and its clean base model and measures both on the attack's test images (clean
accuracy, attack success, explanation dissimilarity). --robust adds the manipulated model after Re-BN on
--rebn-size clean TRAINING images (never test images). --defense NAME[,NAME...] adds registered defenses instead
(rebn, batchstats, ...; options --augment for rebn, --test-batch B and --trigger-fraction f - a number or 1/B - for
the transductive batchstats). Writes <save_path>/<id>/evaluation[_robust|_defenses].{json,png}.
"""
from __future__ import annotations

from bnbackdoor.cli import ArgumentParser, clean_model_option, common_options, force_option, positive_int
from bnbackdoor.device import parse_device
from bnbackdoor.errors import run_cli
from bnbackdoor.defenses import DEFENSES
from bnbackdoor.defenses.specs import parse_defenses
from bnbackdoor.evaluation.common import DEFAULT_REBN_SIZE
from bnbackdoor.evaluation.stored import evaluate_stored_model


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("attackid", help="stored attack id (manipulated_models/<id>), e.g. 154, a run folder, or its "
                                    "parameters.json")
    p.add_argument("device", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--robust", action="store_true", help="also evaluate after Re-BN (the same as --defense rebn)")
    p.add_argument("--defense", default=None, metavar="NAME[,NAME...]",
                   help=f"also evaluate after these registered defenses ({', '.join(sorted(DEFENSES))})")
    p.add_argument("--augment", action="store_true", default=None,
                   help="rebn: calibrate on the clean trainer's crops and flips (seeded by --seed)")
    p.add_argument("--test-batch", type=positive_int, default=None, metavar="B",
                   help="batchstats: test batch size (default 100)")
    p.add_argument("--trigger-fraction", default=None, metavar="F",
                   help="batchstats: triggered fraction of each test batch, a number in (0, 1] or 1/B (default 1)")
    p.add_argument("--rebn-size", type=positive_int, default=DEFAULT_REBN_SIZE, metavar="N",
                   help=f"clean training images for Re-BN (default {DEFAULT_REBN_SIZE})")
    p.add_argument("--testing-size", type=positive_int, default=None, metavar="N",
                   help="test images to evaluate on (default: the attack's testing_size)")
    p.add_argument("--batchsize", "--batch-size", dest="batchsize", type=positive_int, default=100,
                   help="batch size for evaluation and Re-BN (default 100)")
    clean_model_option(p)
    force_option(p, "evaluation (its .json and figure)")
    common_options(p)
    a = p.parse_args()
    device = parse_device(a.device)
    defenses = None
    if a.defense is not None:
        defenses = parse_defenses(a.defense, augment=a.augment, test_batch=a.test_batch,
                                  trigger_fraction=a.trigger_fraction)
    elif a.augment or a.test_batch is not None or a.trigger_fraction is not None:
        p.error("--augment, --test-batch and --trigger-fraction need --defense")
    ev = evaluate_stored_model(a.attackid, device, robust=a.robust, defenses=defenses, clean_images=a.rebn_size,
                               testing_size=a.testing_size, batch_size=a.batchsize, seed=a.seed,
                               data_root=a.data_root, save_path=a.save_path, clean_model=a.clean_model,
                               force=a.force)
    print(ev.table(by="metric"))
    if ev.rebn is not None:
        print(ev.rebn.table())
    print(f"attack {ev.name}: evaluated on {ev.test['images']} test images"
          + (f", defenses with {ev.calibration['images']} clean training images" if ev.calibration else "")
          + f" in {ev.seconds:.0f} s -> {', '.join(map(str, ev.files))}")
    return 0


if __name__ == "__main__":
    run_cli(main)
