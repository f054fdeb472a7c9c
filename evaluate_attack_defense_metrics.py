#!/usr/bin/env python
"""Attack and Re-BN defense metrics: python evaluate_attack_defense_metrics.py <attackid> --device D --datasize N
--batchsize B --save_path DIR [--rebn-size N] [--sweep 32,128,512,2000,5000]

One table - clean model / manipulated model / manipulated + Re-BN - of clean accuracy, attack success and
explanation MSE/DSSIM to the target and to the clean model's explanation, on --datasize test images. Re-BN uses
--rebn-size clean images of the TRAINING split (disjoint from the test images by construction). Writes
<save_path>/<id>_defense.{json,csv,png}; --sweep adds the Re-BN sample-efficiency curve <id>_rebn_sweep.{json,png}.
"""
from __future__ import annotations

import argparse

from bnbackdoor.cli import common_options
from bnbackdoor.device import parse_device
from bnbackdoor.errors import run_cli
from bnbackdoor.evaluation import DEFAULT_REBN_SIZE, DEFAULT_SWEEP, defense_metrics, parse_sizes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("attackid", help="stored attack id (manipulated_models/<id>), e.g. 154, or a run folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--datasize", type=int, default=None, metavar="N",
                   help="test images to evaluate on (default: the attack's testing_size)")
    p.add_argument("--batchsize", "--batch-size", dest="batchsize", type=int, default=100,
                   help="batch size for evaluation and Re-BN (default 100)")
    p.add_argument("--rebn-size", type=int, default=DEFAULT_REBN_SIZE, metavar="N",
                   help=f"clean training images for Re-BN (default {DEFAULT_REBN_SIZE})")
    default = ",".join(map(str, DEFAULT_SWEEP))
    p.add_argument("--sweep", nargs="?", const=default, default=None, metavar="SIZES",
                   help=f"Re-BN sample-efficiency sweep over these calibration sizes (bare --sweep: {default})")
    common_options(p)
    a = p.parse_args()
    device = parse_device(a.device)
    sizes = parse_sizes(a.sweep) if a.sweep is not None else None
    ev = defense_metrics(a.attackid, device, datasize=a.datasize, batch_size=a.batchsize, rebn_size=a.rebn_size,
                         sweep=sizes, seed=a.seed, data_root=a.data_root, save_path=a.save_path)
    print(ev.table(by="model"))
    if ev.sweep:
        print("\nRe-BN sample efficiency (fresh copy of the manipulated model per size):")
        print(ev.sweep_table())
    print(f"attack {ev.name}: {ev.test['images']} test images, Re-BN on {ev.calibration['images']} clean training "
          f"images, {ev.seconds:.0f} s -> {', '.join(map(str, ev.files))}")
    return 0


if __name__ == "__main__":
    run_cli(main)
