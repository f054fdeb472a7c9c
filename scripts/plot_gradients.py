#!/usr/bin/env python
"""Plot per-step update sizes, attacked vs clean fine-tuning, one panel per parameter group.

python scripts/plot_gradients.py --attacked output/gradients_epoch1.csv --clean output/gradients_epoch1_clean.csv \
       --save output/gradients_epoch1_compare.png [--xmax STEP] [--block NAME]

The x axis covers the logged steps (``--xmax`` cuts it). The title names the attack (from ``parameters.json`` in
the CSV's folder when there is one, else the file names) and the block (``--block``, else the sidecar
``<csv>.json`` that the attack writes beside the CSV when there is one, else the block index is unknown).
"""
from __future__ import annotations

import json
from pathlib import Path

from bnbackdoor.cli import ArgumentParser, existing_file, image_file, positive_int
from bnbackdoor.errors import UserError, run_cli
from bnbackdoor.attack.gradlog import read_csv
from bnbackdoor.attack.params import PARAMS_FILE, resolve_attack
from bnbackdoor.plots import figure_title, gradient_comparison


def block_name(csv_path: Path, given: str | None) -> str | None:
    if given:
        return given
    side = csv_path.with_suffix(".json")
    try:
        return json.loads(side.read_text(encoding="utf-8")).get("block") if side.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def title(attacked: Path, clean: Path | None, block: str | None) -> str:
    """``attack 154 (RedHerring, grad_cam, MSE, target class 1 ...): update sizes of block layer3.2, attacked vs
    clean``; without a parameters.json beside the CSV the file names stand for the attack."""
    what = f"update sizes of block {block}" if block else "update sizes of the logged block"
    what += ", attacked vs clean" if clean else ", attacked"
    params_file = attacked.parent / PARAMS_FILE
    if params_file.is_file():
        try:
            return figure_title(resolve_attack(str(params_file)), what)
        except UserError:
            pass
    names = attacked.name + (f" vs {clean.name}" if clean else "")
    return f"{names}: {what}"


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacked", type=existing_file, required=True, help="gradients_epoch<E>.csv of the attack")
    p.add_argument("--clean", type=existing_file, help="gradients_epoch<E>_clean.csv of the clean baseline (percentage_trigger 0)")
    p.add_argument("--save", type=image_file, required=True, help="output figure (.png, .pdf, .svg or .jpg)")
    p.add_argument("--xmax", type=positive_int, default=None, help="last optimizer step shown (default: the last logged)")
    p.add_argument("--block", default=None, help="block name for the title (e.g. layer3.2)")
    a = p.parse_args()
    attacked_path, clean_path = Path(a.attacked), Path(a.clean) if a.clean else None
    groups, attacked = read_csv(attacked_path)
    clean = read_csv(clean_path)[1] if clean_path else None
    out = gradient_comparison(groups, attacked, clean, a.save, xmax=a.xmax,
                              title=title(attacked_path, clean_path, block_name(attacked_path, a.block)))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
