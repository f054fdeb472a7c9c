#!/usr/bin/env python
"""Run every grid point of attack files through submitit, here or on a SLURM cluster; or summarise a sweep.

python scripts/sweep.py 154 cuda:0,cuda:1 --max-parallel 2             # this machine, one process per point
python scripts/sweep.py 154 256 cuda --backend slurm --slurm-partition gpu --slurm-gpus-per-task 1 --max-parallel 8
python scripts/sweep.py --summary 154 [--promote]                       # table + CSV; best point by validation
"""
from __future__ import annotations

import argparse

from tabulate import tabulate

from bnbackdoor.cli import ArgumentParser, common_options, positive_int
from bnbackdoor.errors import UserError, run_cli
from bnbackdoor.campaigns.sweep import BACKENDS, BEST_RULE, SweepOptions, promote, summarize, sweep

SLURM_OPTIONS = {  # --slurm-<name> -> SlurmExecutor parameter (type)
    "partition": str, "gpus-per-task": positive_int, "cpus-per-task": positive_int, "mem": str, "account": str, "qos": str,
    "constraint": str,
}


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", metavar="ATTACKID... DEVICES",
                   help="attack ids (grid files), then the device spec: cpu, cuda:0,cuda:1 (local) or cuda (slurm)")
    p.add_argument("--gs-ids", default=None, help="grid points to run, e.g. 0-11,14 (default: all)")
    p.add_argument("--backend", choices=sorted(BACKENDS), default="local")
    p.add_argument("--max-parallel", type=positive_int, default=1, help="points running at once (default 1)")
    p.add_argument("--slurm-time", type=positive_int, default=None, metavar="MIN",
                   help="minutes per point (slurm --time; default 1440, also the local per-point timeout)")
    for name, typ in SLURM_OPTIONS.items():
        p.add_argument(f"--slurm-{name}", type=typ, default=None)
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before each job, e.g. 'source .venv/bin/activate' (repeatable)")
    p.add_argument("--no-wait", action="store_true", help="slurm: submit and exit instead of watching")
    p.add_argument("--summary", metavar="ATTACKID", help="summarise the finished points of ATTACKID")
    p.add_argument("--promote", action="store_true", help="with --summary: copy the best run to manipulated_models/")
    p.add_argument("--force", action="store_true", help="with --promote: replace an existing stored run")
    p.add_argument("--device", default="cpu", help="with --summary: device for the validation pass (default cpu)")
    p.add_argument("--val-size", type=positive_int, default=500, help="with --summary: validation images (default 500)")
    common_options(p)
    a = p.parse_args()
    if a.summary:
        return show_summary(a)
    if len(a.targets) < 2:
        raise UserError("give at least one attack id and a device spec, e.g. scripts/sweep.py 154 cpu")
    slurm = {name.replace("-", "_"): getattr(a, "slurm_" + name.replace("-", "_")) for name in SLURM_OPTIONS}
    opts = SweepOptions(max_parallel=a.max_parallel, timeout_min=a.slurm_time or 24 * 60,
                        slurm={k: v for k, v in slurm.items() if v is not None}, setup=a.setup, wait=not a.no_wait)
    results = sweep(a.targets[:-1], a.targets[-1], backend=a.backend, gs_ids=a.gs_ids, save_path=a.save_path,
                    data_root=a.data_root, seed=a.seed, opts=opts)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("sweep: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" -> {a.save_path}")
    return 1 if counts.get("failed") else 0


def show_summary(a: argparse.Namespace) -> int:
    s = summarize(a.summary, a.save_path, device=a.device, data_root=a.data_root, val_size=a.val_size)
    print(tabulate(s["rows"], headers="keys", floatfmt=".4f", missingval="n/a"))
    for note in s["notes"]:
        print(f"note: {note}")
    print(f"clean base model, validation accuracy: {', '.join(f'{v:.4f}' for v in s['clean_val_accuracy'])}")
    print(f"best: {s['best']['id']} (gs_id {s['best']['gs_id']}); rule: {BEST_RULE}")
    print(f"table -> {s['csv']}")
    if a.promote:
        dst = promote(str(s["attack_id"]), s["best"]["id"], a.save_path, force=a.force)
        print(f"promoted {s['best']['id']} -> {dst}")
    return 0


if __name__ == "__main__":
    run_cli(main)
