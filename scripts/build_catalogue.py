#!/usr/bin/env python
"""Build the shipped attack catalogue: python scripts/build_catalogue.py [--ids ...] [--dataset D] [--promote] <device>

Runs every catalogue run (experimentsettings/catalogue/catalogue.json) that is not finished under --save_path:
finished runs are skipped, interrupted ones resume, a failure is recorded and the others go on. Safe to run in the
background and to restart in a later session, e.g.

    nohup python scripts/build_catalogue.py --dataset gtsrb --promote cpu > output/catalogue.out 2>&1 &

One line per run goes to stdout and to <save_path>/catalogue.log. --promote copies each finished run folder to
manipulated_models/<id>/ with a generated provenance README.md.
"""
from __future__ import annotations

import argparse
import re

from tabulate import tabulate

from bnbackdoor.campaigns.catalogue import CATALOGUE_FILE, PLAN_HEADERS, build, load_catalogue, plan_table, select
from bnbackdoor.cli import ArgumentParser, common_options, existing_file, positive_int
from bnbackdoor.data import DATASETS
from bnbackdoor.device import parse_device
from bnbackdoor.errors import UserError, run_cli


DEVICE = re.compile(r"cpu|cuda(:\d+)?|mps")


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("device", nargs="?", help="cpu, cuda, cuda:N or mps (not needed with --list)")
    p.add_argument("--ids", nargs="+", metavar="ID", help="only these catalogue ids, by spaces or commas (default: all)")
    p.add_argument("--dataset", choices=sorted(DATASETS), help="only this dataset's runs")
    p.add_argument("--catalogue", type=existing_file, default=str(CATALOGUE_FILE), help=f"catalogue file (default: {CATALOGUE_FILE})")
    p.add_argument("--promote", action="store_true", help="copy finished runs to manipulated_models/<id>/")
    p.add_argument("--workers", type=positive_int, default=1, help="attacks in parallel processes on the one device")
    p.add_argument("--list", action="store_true", help="print the plan and each run's status; run nothing")
    p.add_argument("--progress", action="store_true", help="per-epoch progress bars (single worker only)")
    common_options(p)
    p.set_defaults(save_path="output/catalogue")
    a = p.parse_args()
    ids = [i for chunk in a.ids or [] for i in chunk.split(",") if i]
    if a.device is None and ids and DEVICE.fullmatch(ids[-1]):
        a.device = ids.pop()  # "--ids 154 156 cpu": nargs="+" swallowed the device
    runs = select(load_catalogue(a.catalogue), ids, a.dataset)
    if a.list:
        print(tabulate(plan_table(runs, a.save_path, a.seed), headers=PLAN_HEADERS, tablefmt="github",
                       disable_numparse=True))
        return 0
    if not a.device:
        raise UserError("give a device (cpu, cuda, cuda:N or mps), or --list")
    parse_device(a.device)  # fail now, not once per run
    print(f"{len(runs)} catalogue run(s) -> {a.save_path} on {a.device} with {a.workers} worker(s)", flush=True)
    outcomes = build(runs, a.device, a.save_path, workers=a.workers, data_root=a.data_root, seed=a.seed,
                     do_promote=a.promote, progress=a.progress and a.workers == 1)
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[o.status] = counts.get(o.status, 0) + 1
    print("summary: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), flush=True)
    return 1 if counts.get("failed") else 0


if __name__ == "__main__":
    run_cli(main)
