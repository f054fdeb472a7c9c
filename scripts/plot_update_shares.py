#!/usr/bin/env python
"""The paper's update figure: per parameter group, the per-step update size and its share of the total update.

python scripts/plot_update_shares.py --clean output_clean/gradients_epoch1_clean.csv \
       --nbn output_nbn/gradients_epoch1.csv --bn output_bn/gradients_epoch1.csv --save output/update_shares.png

Three panels from `python attack.py <device> <id> --grad-layer all` captures: (a) clean fine-tuning of ResNet20
(percentage_trigger 0), (b) the attack on ResNet20 without BatchNorm, (c) the attack on ResNet20; with
`--regime scratch` the same three for training from scratch on the clean set and on a poisoned one (the first epochs
of each run: `--stop-after E`). Each option takes one or more CSVs of the same run (epochs, in order). Writes the
PNG and, beside it, the numbers as JSON (per group: median / mean per-step update size and share of the total
squared update).
"""
from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from bnbackdoor.cli import ArgumentParser, command_line, existing_file, image_file
from bnbackdoor.errors import run_cli
from bnbackdoor.fileio import write_json
from bnbackdoor.attack.gradlog import fold_groups, read_csvs, update_summary
from bnbackdoor.plots import update_shares

KEYS = ("clean", "nbn", "bn")
# the panels' titles, by what the three captures are of (--regime)
TITLES = {"finetune": ("(a) clean fine-tuning, ResNet20", "(b) attack, ResNet20 without BatchNorm",
                       "(c) attack, ResNet20"),
          "scratch": ("(a) clean training from scratch, ResNet20", "(b) poisoned from scratch, ResNet20 without BatchNorm",
                      "(c) poisoned from scratch, ResNet20")}


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clean", nargs="+", type=existing_file, required=True, help="capture(s) of the clean fine-tuning baseline")
    p.add_argument("--nbn", nargs="+", type=existing_file, required=True, help="capture(s) of the attack on cifar10_resnet20_nbn")
    p.add_argument("--bn", nargs="+", type=existing_file, required=True, help="capture(s) of the attack on cifar10_resnet20")
    p.add_argument("--save", type=image_file, default="output/update_shares.png", help="output PNG (the JSON goes beside it)")
    p.add_argument("--title", default="", help="figure title (e.g. the attack's BN mode)")
    p.add_argument("--regime", choices=tuple(TITLES), default="finetune",
                   help="what the captures are of: fine-tuning a clean model (default) or training from scratch on "
                        "a clean / poisoned set (attack.py --grad-layer all --stop-after E on a scratch id)")
    a = p.parse_args()
    panels, numbers = [], {}
    for key, title in zip(KEYS, TITLES[a.regime]):
        files = getattr(a, key)
        cols = read_csvs(files)
        sizes = fold_groups(cols)
        summary = update_summary(sizes)
        panels.append((title, cols["global_step"], sizes, {g: s["share"] for g, s in summary.items()}))
        numbers[key] = {"title": title, "csv": [str(f) for f in files], "steps": len(cols["global_step"]),
                        "groups": summary}
    out = Path(a.save)
    update_shares(panels, out, title=a.title)
    write_json(out.with_suffix(".json"), {"command": command_line(), "panels": numbers})
    groups = list(dict.fromkeys(g for n in numbers.values() for g in n["groups"]))
    rows = [[g, *[_cell(numbers[k]["groups"].get(g)) for k in KEYS]] for g in groups]
    print(tabulate(rows, headers=["group (median step / share)", *TITLES[a.regime]]))
    print(f"saved {out} and {out.with_suffix('.json')}")
    return 0


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    share = "n/a" if s["share"] is None else f"{100 * s['share']:.1f}%"
    return f"{s['median']:.3g} / {share}"


if __name__ == "__main__":
    run_cli(main)
