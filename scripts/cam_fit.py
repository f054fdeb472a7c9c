#!/usr/bin/env python
"""The best DSSIM to each target that any Grad-CAM map of a given resolution can reach: python scripts/cam_fit.py

python scripts/cam_fit.py [--resolutions 4,8] [--targets square,triangle,circle,cross] [--loss ssim]
                          [--steps 600] [--save output/cam_fit.json] [--force]

A CAM layer with an h×w map can only draw what a non-negative h×w grid, bilinearly upsampled to 32×32, can draw:
the numbers are a floor for every attack explained at that resolution (bnbackdoor/evaluation/cam_fit.py says how it is searched).
ResNet20 and MobileNetV3 explain on 8×8; MobileNetV3's final 1×1-conv map is 4×4.
"""
from __future__ import annotations

import sys

from tabulate import tabulate

from bnbackdoor.evaluation.cam_fit import best_fit
from bnbackdoor.cli import ArgumentParser, int_at_least, output_file
from bnbackdoor.errors import UserError, run_cli
from bnbackdoor.fileio import refuse_overwrite, write_json
from bnbackdoor.report.labels import loss_label
from bnbackdoor.losses import LOSSES
from bnbackdoor.targets import DERIVED, TARGETS, target_mask

FIXED_TARGETS = [t for t in TARGETS if t not in DERIVED]


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--resolutions: '{text}' is not a comma-separated list of whole numbers (e.g. 4,8)") from None
    if not values or min(values) < 1 or max(values) > 32:
        raise UserError(f"--resolutions: '{text}' must list map sizes from 1 to 32 (e.g. 4,8)")
    return values


def target_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in FIXED_TARGETS]
    if not names or bad:
        raise UserError(f"--targets: unknown or input-dependent target(s) {', '.join(bad) or text!r}; "
                        f"known fixed targets: {', '.join(FIXED_TARGETS)}")
    return names


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolutions", default="4,8", help="CAM map sizes h (= w), comma-separated (default 4,8)")
    p.add_argument("--targets", default="square,triangle,circle,cross", help="fixed target explanations")
    p.add_argument("--loss", choices=sorted(LOSSES), default="ssim", help="the loss to minimise and report "
                   "(default ssim, i.e. DSSIM, the acceptance measure)")
    p.add_argument("--steps", type=int_at_least(1), default=600, help="Adam steps per fit (default 600)")
    p.add_argument("--save", type=output_file, default="output/cam_fit.json",
                   help="JSON written atomically (default output/cam_fit.json; the shipped one is results/cam_fit.json)")
    p.add_argument("--force", action="store_true", help="replace an existing --save file instead of refusing")
    a = p.parse_args()
    refuse_overwrite([a.save], force=a.force, what="CAM fit", elsewhere="--save")
    resolutions, targets = int_list(a.resolutions), target_list(a.targets)

    rows = []
    for name in targets:
        for res in resolutions:
            rows.append({"target": name, "resolution": res, "loss": a.loss,
                         "best": round(best_fit(target_mask(name), res, a.loss, steps=a.steps).loss, 6)})
    write_json(a.save, {"command": " ".join(["python scripts/cam_fit.py", *sys.argv[1:]]), "steps": a.steps,
                        "rows": rows})
    print(tabulate([[r["target"], f"{r['resolution']}×{r['resolution']}", f"{r['best']:.3f}"] for r in rows],
                   headers=["target", "CAM map", f"best {loss_label(a.loss)} to target"], tablefmt="github"))
    print(f"-> {a.save}")
    return 0


if __name__ == "__main__":
    run_cli(main)
