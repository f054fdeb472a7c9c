#!/usr/bin/env python
"""Plot per-step update sizes, attacked vs clean fine-tuning, one panel per parameter group.

python scripts/plot_gradients.py --attacked output/gradients_epoch1.csv --clean output/gradients_epoch1_clean.csv \
       --save output/gradients_epoch1_compare.png --xmax 1500
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnbackdoor.errors import run_cli  # noqa: E402
from bnbackdoor.gradlog import read_csv  # noqa: E402
from bnbackdoor.plots import gradient_comparison  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacked", required=True, help="gradients_epoch<E>.csv of the attack")
    p.add_argument("--clean", help="gradients_epoch<E>_clean.csv of the clean baseline (percentage_trigger 0)")
    p.add_argument("--save", required=True, help="output PNG")
    p.add_argument("--xmax", type=int, default=None, help="last optimizer step shown")
    a = p.parse_args()
    groups, attacked = read_csv(a.attacked)
    clean = read_csv(a.clean)[1] if a.clean else None
    out = gradient_comparison(groups, attacked, clean, a.save, xmax=a.xmax,
                              title=f"{Path(a.attacked).name} vs {Path(a.clean).name if a.clean else '-'}")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
