#!/usr/bin/env python
"""Run an explanation-aware backdoor attack: python attack.py <device> <attackid> [--grad-layer L] | --list

Fine-tunes the clean base model named by the attack's parameters and writes <save_path>/<id>/ (model.pth,
parameters.json, metrics.json, training_log.csv, plot.png). Interrupted, the same command resumes.
"""
from __future__ import annotations

import time

from tabulate import tabulate

from bnbackdoor.attack.ids import catalogue, catalogue_table
from bnbackdoor.cli import ArgumentParser, command_line, common_options, non_negative_int, positive_int
from bnbackdoor.device import parse_device
from bnbackdoor.errors import run_cli
from bnbackdoor.runs import run_attack, run_dir, time_summary
from bnbackdoor.attack.gradlog import parse_grad_layer
from bnbackdoor.attack.params import resolve_attack

SHOWN = ("clean_accuracy", "fidelity", "attack_success_rate", "expl_mse_to_target", "expl_dssim_to_target",
         "expl_mse_to_clean", "expl_dssim_to_clean")


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("device", nargs="?", help="cpu, cuda, cuda:N or mps")
    p.add_argument("attackid", nargs="?",
                   help="attack id (e.g. 154, 10156, GTSRBWRN154L1) or a path to a JSON file; --list shows them")
    p.add_argument("--list", action="store_true",
                   help="list every attack id (kind, method, loss, triggers, targets, stored model) and exit")
    p.add_argument("--grad-layer", type=parse_grad_layer, default=None, metavar="L",
                   help="record per-step update sizes of block L (-1 = last; 'all' = the whole model, "
                        "per parameter group) to gradients_epoch<E>.csv")
    p.add_argument("--gs-id", type=non_negative_int, default=None, help="grid point of an experimentsettings grid (default 0)")
    p.add_argument("--force", action="store_true", help="redo a finished run")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="E",
                   help="stop once epoch E of the run's own schedule is done, the run kept unfinished (the same "
                        "command without it finishes it): with --grad-layer, a capture of the first epochs")
    common_options(p)
    a = p.parse_args()
    if a.list:
        print(catalogue_table(catalogue()))
        return 0
    if a.device is None or a.attackid is None:
        p.error("the arguments <device> <attackid> are required (or --list to see the attack ids)")
    device = parse_device(a.device)
    params = resolve_attack(a.attackid, gs_id=a.gs_id)
    t0 = time.time()
    # without --force a finished run is returned as it is (or refused): its time is not this process's
    finished = not a.force and (run_dir(a.save_path, params) / "metrics.json").exists()
    m = run_attack(params, device, save_path=a.save_path, data_root=a.data_root, seed=a.seed,
                   grad_layer=a.grad_layer, force=a.force, command=command_line(), stop_after=a.stop_after)
    rows = [[k, m["clean_model"].get(k), m["manipulated_model"].get(k)] for k in SHOWN]
    print(tabulate(rows, headers=["metric", "clean model", "manipulated"], floatfmt=".4f", missingval="n/a"))
    print(f"attack {params.id}: {time_summary(m, time.time() - t0, finished)} -> {run_dir(a.save_path, params)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
