#!/usr/bin/env python
"""Attack and defense metrics: python evaluate_attack_defense_metrics.py <attackid> --device D --datasize N
--batchsize B --save_path DIR [--rebn-size N] [--defense NAME,...] [--sweep 32,128,512,2000,5000] [--composition]

One table - clean model / manipulated model / + each defense (default: rebn, rebn+augment, batchstats B=100 f=1
and f=1/B; options in the row label) - of clean accuracy, attack success, untriggered target rate and explanation
MSE/DSSIM to the target and to the clean model's explanation, on --datasize test images. Re-BN uses --rebn-size
clean images of the TRAINING split (disjoint from the test images by construction). Writes
<save_path>/<id>_defense.{json,csv,png}; --sweep adds the Re-BN sample-efficiency curve <id>_rebn_sweep.{json,png};
--composition the test-batch BatchNorm curves (attack success and clean accuracy against the triggered fraction f
of each test batch, f in 1/B, 0.1, 0.25, 0.5, 1, for B in 16, 64, 256) <id>_composition.{json,png}.
"""
from __future__ import annotations

from bnbackdoor.cli import ArgumentParser, clean_model_option, common_options, force_option, positive_int
from bnbackdoor.device import parse_device
from bnbackdoor.errors import run_cli
from bnbackdoor.defenses import DEFAULT_DEFENSES, DEFENSES
from bnbackdoor.defenses.specs import parse_defenses
from bnbackdoor.evaluation.common import COLUMNS, DEFAULT_REBN_SIZE, DEFAULT_SWEEP, format_table, parse_sizes
from bnbackdoor.evaluation.defense_table import defense_metrics


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("attackid", help="stored attack id (manipulated_models/<id>), e.g. 154, or a run folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--datasize", type=positive_int, default=None, metavar="N",
                   help="test images to evaluate on (default: the attack's testing_size)")
    p.add_argument("--batchsize", "--batch-size", dest="batchsize", type=positive_int, default=100,
                   help="batch size for evaluation and Re-BN (default 100)")
    p.add_argument("--rebn-size", type=positive_int, default=DEFAULT_REBN_SIZE, metavar="N",
                   help=f"clean training images for Re-BN (default {DEFAULT_REBN_SIZE})")
    default = ",".join(map(str, DEFAULT_SWEEP))
    p.add_argument("--sweep", nargs="?", const=default, default=None, metavar="SIZES",
                   help=f"Re-BN sample-efficiency sweep over these calibration sizes (bare --sweep: {default})")
    p.add_argument("--defense", default=None, metavar="NAME[,NAME...]",
                   help=f"these registered defenses ({', '.join(sorted(DEFENSES))}) instead of the defaults "
                        f"({'; '.join(DEFAULT_DEFENSES)})")
    p.add_argument("--composition", action="store_true",
                   help="also draw batchstats attack success and clean accuracy against the triggered fraction")
    p.add_argument("--composition-images", type=positive_int, default=256, metavar="N",
                   help="at most N triggered test images per composition point (default 256; at f = 1/B each "
                        "costs a whole test batch)")
    clean_model_option(p)
    force_option(p, "defense table (its .json, .csv and figure)")
    common_options(p)
    a = p.parse_args()
    device = parse_device(a.device)
    sizes = parse_sizes(a.sweep) if a.sweep is not None else None  # fail before any work
    defenses = parse_defenses(a.defense) if a.defense is not None else None
    ev = defense_metrics(a.attackid, device, datasize=a.datasize, batch_size=a.batchsize, clean_images=a.rebn_size,
                         defenses=defenses, sweep=sizes, composition=a.composition,
                         composition_images=a.composition_images, seed=a.seed, data_root=a.data_root,
                         save_path=a.save_path, clean_model=a.clean_model, force=a.force)
    columns = {**dict(list(COLUMNS.items())[:2]), "untriggered_target_rate": "untriggered target rate",
               **dict(list(COLUMNS.items())[2:])}
    print(format_table(ev.rows, columns=columns))
    if ev.sweep:
        print("\nRe-BN sample efficiency (fresh copy of the manipulated model per size):")
        print(ev.sweep_table())
    if ev.composition:
        print("\nbatchstats against the triggered fraction f of each test batch of B images:")
        print(ev.composition_table())
    print(f"attack {ev.name}: {ev.test['images']} test images, defenses with {ev.calibration['images']} clean "
          f"training images, {ev.seconds:.0f} s -> {', '.join(map(str, ev.files))}")
    return 0


if __name__ == "__main__":
    run_cli(main)
