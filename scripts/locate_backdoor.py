#!/usr/bin/env python
"""Where does the backdoor live? Restore one parameter group at a time (and take only that group) and measure.

python scripts/locate_backdoor.py <attackid> <device> [--save_path output] [--testing-size N]

Loads the stored run (manipulated_models/<id>/ or a run folder) and its clean base model, evaluates for every
parameter group G (BN running statistics, BN affine, convolution weights per stage, classifier) "restore G" and
"only G" on the attack's test images, prints the table and writes <save_path>/<name>_anatomy.{json,csv,png}
(<name>: the id for a stored model, <folder>@<parent> for a run folder, as every evaluation script names its output).
"""
from __future__ import annotations

import time

from tabulate import tabulate

from bnbackdoor.evaluation.anatomy import (TABLE_HEADERS, locate_backdoor, parameter_groups, report_paths, save_report,
                                         table_rows)
from bnbackdoor.cli import (ArgumentParser, clean_model_option, command_line, common_options, existing_dir,
                            force_option, positive_int)
from bnbackdoor.data import load_split
from bnbackdoor.device import parse_device
from bnbackdoor.errors import run_cli
from bnbackdoor.fileio import refuse_overwrite
from bnbackdoor.runs import load_run, run_name


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("attackid", help="stored attack id (manipulated_models/<id>) or a run folder")
    p.add_argument("device", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--testing-size", type=positive_int, default=None,
                   help="test images (default: the attack's testing_size)")
    p.add_argument("--batch-size", type=positive_int, default=200, help="evaluation batch size (default 200)")
    p.add_argument("--models-root", type=existing_dir, default=None, help="clean base models folder (default: ./models)")
    clean_model_option(p)
    force_option(p, "anatomy report (its .json, .csv and figure)")
    common_options(p)
    a = p.parse_args()
    device = parse_device(a.device)
    refuse_overwrite(list(report_paths(a.save_path, run_name(a.attackid)).values()), force=a.force,
                     what="anatomy report")  # before any work
    t0 = time.time()
    params, model, clean = load_run(a.attackid, device, models_root=a.models_root, data_root=a.data_root,
                                    clean_model=a.clean_model)
    size = a.testing_size or params.testing_size
    x, y = load_split(params.dataset, "test", size=size, seed=a.seed, data_root=a.data_root)
    groups = parameter_groups(model)
    rows = locate_backdoor(params, clean, model, x, y, groups=groups, batch_size=a.batch_size, device=device)
    print(tabulate(table_rows(rows), headers=TABLE_HEADERS, floatfmt=".4f", missingval="n/a"))
    paths = save_report(rows, groups, params, a.save_path, name=run_name(a.attackid),
                        extra={"testing_size": len(y), "seed": a.seed, "device": str(device),
                               "base_model": model.base_model,
                               "command": command_line(), "seconds": round(time.time() - t0, 1)})
    print(f"attack {params.id}: {len(groups)} groups, {len(y)} test images, {time.time() - t0:.0f} s -> "
          f"{paths['json']}, {paths['csv']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
