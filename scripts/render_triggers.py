#!/usr/bin/env python
"""Render the paper's triggers (on a few CIFAR-10 test images) and target explanations into one PNG grid.

python scripts/render_triggers.py [--save output/triggers.png] [--data-root DIR] [--n 4] [--all]

The rows are the paper's triggers plus `fixrandom8x8`, `original` and `inverted`; `--all` adds our earlier
`white8x8_*` shapes. The last row shows the fixed target maps (white = high relevance).

Without the CIFAR-10 cache it falls back to synthetic images (smooth colour gradients) and says so.
"""
from __future__ import annotations

import sys

import torch

from bnbackdoor.cli import ArgumentParser, existing_dir, image_file, positive_int, seed_int
from bnbackdoor.errors import UserError, run_cli
from bnbackdoor.fileio import save_figure
from bnbackdoor.targets import DERIVED, TARGETS, target_mask
from bnbackdoor.triggers import TRIGGERS, apply_trigger


def sample_images(n: int, data_root: str | None, seed: int) -> tuple[torch.Tensor, str]:
    from bnbackdoor.data import load_split

    try:
        x, _ = load_split("cifar10", "test", size=n, seed=seed, data_root=data_root, download=False)
        return x, "CIFAR-10 test images"
    except UserError as e:
        print(f"notice: {e}; using synthetic images", file=sys.stderr)
    ramp = torch.linspace(0, 1, 32)
    base = torch.stack([ramp.view(1, -1).expand(32, 32), ramp.view(-1, 1).expand(32, 32),
                        torch.full((32, 32), 0.5)])
    shift = torch.linspace(0, 1, n).view(-1, 1, 1, 1)
    return (base.unsqueeze(0) + shift) % 1.0, "synthetic images"


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--save", type=image_file, default="output/triggers.png", help="output figure (.png, .pdf, .svg or .jpg)")
    p.add_argument("--data-root", type=existing_dir, help="default: $BNBACKDOOR_DATA, else ./datasets")
    p.add_argument("--n", type=positive_int, default=4, help="images per trigger")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--all", action="store_true", help="also draw the white8x8_* triggers")
    a = p.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, source = sample_images(a.n, a.data_root, a.seed)
    shapes = [t for t in TARGETS if t not in DERIVED]  # input-dependent targets have no fixed picture
    names = [t for t in TRIGGERS if a.all or not t.startswith("white8x8_")]
    rows = len(names) + 1
    cols = max(a.n, len(shapes))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 1.2, 1.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, name in enumerate(names):
        triggered = apply_trigger(name, images)
        for c in range(a.n):
            axes[r, c].imshow(triggered[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axes[r, 0].text(-4, 16, name, ha="right", va="center", fontsize=8)
    for c, name in enumerate(shapes):
        axes[-1, c].imshow(target_mask(name)[0, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[-1, c].set_title(f"target: {name}", fontsize=8)
    fig.suptitle(f"triggers on {source} (rows) and target explanations (last row)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, a.save, dpi=120)
    print(f"wrote {a.save}")
    return 0


if __name__ == "__main__":
    run_cli(main)
