"""Figures people look at: explanation grids, gradient comparisons, bar charts, curves (matplotlib, Agg).

Every figure's title should say what it shows: :func:`figure_title` names the attack id, kind, explanation
method, loss and target class of an :class:`~bnbackdoor.params.AttackParams`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .fileio import save_figure  # noqa: E402


MAP_CMAP = "jet"


def figure_title(params, what: str = "") -> str:
    """``attack 154 (RedHerring, grad_cam, MSE, target class 1 'automobile')[: what]`` for any figure of a run."""
    from .data import dataset_info

    classes = dataset_info(params.dataset).classes
    targets = ["keep label" if c is None else f"{c} '{classes[c]}'" for c in params.target_classes]
    if len(targets) > 1 and len(set(targets)) == 1:
        targets = [f"{targets[0]} (each trigger)"]
    loss = "DSSIM" if params.lossStr == "ssim" else params.lossStr.upper()
    head = (f"attack {params.id} ({params.attack_name}, {params.explanation_methodStr}, {loss}, "
            f"target class{'es' if len(targets) > 1 else ''} {', '.join(targets)})")
    return f"{head}: {what}" if what else head


def _show(ax, t: torch.Tensor, vmin: float = 0.0, vmax: float = 1.0):
    t = t.detach().float().cpu()
    if t.shape[0] == 3:  # an image in [0, 1]
        im = None
        ax.imshow(t.permute(1, 2, 0).clamp(0, 1).numpy())
    else:                 # a one-channel explanation map, on its column's colour scale
        im = ax.imshow(t[0].numpy(), cmap=MAP_CMAP, vmin=vmin, vmax=vmax)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _map_scale(maps: Sequence[torch.Tensor]) -> tuple[float, float]:
    """[0, 1] for normalised maps (all the maps explanations produce), else the maps' own range."""
    lo = min(float(m.min()) for m in maps)
    hi = max(float(m.max()) for m in maps)
    if lo >= 0 and hi <= 1:
        return 0.0, 1.0
    return lo, max(hi, lo + 1e-8)


def _finish(fig, path: str | Path, title: str = "", fontsize: int = 10) -> Path:
    """Title, layout, atomic save, close: the common end of every figure here."""
    if title:
        fig.suptitle(title, fontsize=fontsize)
    if fig.get_layout_engine() is None:  # constrained-layout figures (colour bars) lay themselves out
        fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def image_grid(cells: Sequence[Sequence[tuple[torch.Tensor, str]]], col_titles: Sequence[str], path: str | Path,
               title: str = "", cell: float = 1.6) -> Path:
    """A grid of images / maps: ``cells[row][col] = (tensor (3|1, H, W), caption)``. Saved atomically.

    One-channel cells are explanation maps: each map column is drawn on one colour scale ([0, 1] for normalised
    maps) and the figure gets a colour bar for it (one shared bar when every map column has the same scale)."""
    rows, cols = len(cells), len(col_titles)
    map_cols = [c for c in range(cols) if any(row[c][0].shape[0] == 1 for row in cells)]
    scales = {c: _map_scale([row[c][0] for row in cells if row[c][0].shape[0] == 1]) for c in map_cols}
    shared = len(set(scales.values())) <= 1
    extra = 0.6 if shared else 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + (0.9 if map_cols and shared else 0),
                                                  cell * rows + extra), squeeze=False, layout="constrained")
    images = {}
    for r, row in enumerate(cells):
        for c, (t, caption) in enumerate(row):
            im = _show(axes[r][c], t, *scales.get(c, (0.0, 1.0)))
            if im is not None:
                images[c] = im
            axes[r][c].set_xlabel(caption, fontsize=7)
    for c, name in enumerate(col_titles):
        axes[0][c].set_title(name, fontsize=8)
    label = "explanation (normalised per image)"
    if map_cols and shared:
        cb = fig.colorbar(images[map_cols[0]], ax=axes.ravel().tolist(), location="right", shrink=0.8, aspect=30)
        cb.set_label(label, fontsize=8)
        cb.ax.tick_params(labelsize=7)
    else:
        for c in map_cols:
            cb = fig.colorbar(images[c], ax=axes[:, c].tolist(), location="bottom", shrink=0.9, aspect=12)
            cb.ax.tick_params(labelsize=6)
    return _finish(fig, path, title)


def gradient_xlim(attacked: dict[str, list[float]], clean: dict[str, list[float]] | None = None,
                  xmax: float | None = None) -> tuple[float, float]:
    """The optimizer steps the logs cover (attacked and clean together), cut at ``xmax`` when given."""
    steps = list(attacked["global_step"]) + (list(clean["global_step"]) if clean is not None else [])
    lo, hi = (min(steps), max(steps)) if steps else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1
    return lo, (xmax if xmax else hi)


def gradient_figure(groups: Sequence[str], attacked: dict[str, list[float]], clean: dict[str, list[float]] | None,
                    xmax: int | None = None):
    """The figure of :func:`gradient_comparison`, not yet titled or saved (tests look at its axes)."""
    n = len(groups)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.0 * rows), squeeze=False)
    for i, g in enumerate(groups):
        ax = axes[i // cols][i % cols]
        ax.plot(attacked["global_step"], attacked[g], lw=0.8, color="tab:red", label="attacked")
        if clean is not None and g in clean:
            ax.plot(clean["global_step"], clean[g], lw=0.8, color="tab:blue", alpha=0.8, label="clean")
        ax.set_title(g, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("update size (L2)")
        ax.set_xlim(*gradient_xlim(attacked, clean, xmax))  # the data's steps, not a fixed 1500
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    return fig


def gradient_comparison(groups: Sequence[str], attacked: dict[str, list[float]], clean: dict[str, list[float]] | None,
                        path: str | Path, xmax: int | None = None, title: str = "") -> Path:
    """One panel per parameter group: per-step update size, attacked vs clean fine-tuning; x from the data's
    first to last step unless ``xmax`` cuts it."""
    return _finish(gradient_figure(groups, attacked, clean, xmax), path, title, fontsize=11)


# Which way is better for the defender, by metric name (raw key or display name; first match wins).
BETTER: tuple[tuple[str, str], ...] = (
    ("untriggered", "lower"), ("attack success", "lower"), ("attack_success", "lower"),
    ("accuracy", "higher"), ("fidelity", "higher"),
    ("to target", "higher"), ("to_target", "higher"),   # explanation far from the attacker's target
    ("to clean", "lower"), ("to_clean", "lower"),        # explanation close to the clean model's
)
_ARROW = {"higher": "↑ higher", "lower": "↓ lower"}


def better_direction(metric: str) -> str | None:
    """``"higher"`` / ``"lower"``: which values of ``metric`` are better for the defender (None: unknown)."""
    m = metric.lower()
    return next((d for key, d in BETTER if key in m), None)


def bar_chart(rows: dict[str, dict[str, float | None]], metrics: Sequence[str], path: str | Path,
              title: str = "", better: dict[str, str] | None = None) -> Path:
    """Grouped bars: one group per metric, one bar per row (e.g. clean / manipulated / manipulated + Re-BN).

    Each panel says which direction is better for the defender (``better[metric]`` or :func:`better_direction`).
    """
    import numpy as np

    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes[0], metrics):
        vals = [rows[r].get(m) for r in rows]
        ax.bar(np.arange(len(rows)), [0 if v is None else v for v in vals], color=colors[:len(rows)])
        for i, v in enumerate(vals):
            ax.text(i, 0 if v is None else v, "n/a" if v is None else f"{v:.3f}", ha="center", va="bottom",
                    fontsize=7)
        ax.set_xticks(np.arange(len(rows)), list(rows), rotation=30, ha="right", fontsize=7)
        direction = (better or {}).get(m) or better_direction(m)
        ax.set_title(m + (f"\n({_ARROW[direction]} is better)" if direction else ""), fontsize=8)
    return _finish(fig, path, title)


def curves(x: Sequence[float], series: dict[str, Sequence[float | None]], path: str | Path, xlabel: str,
           ylabel: str, title: str = "", logx: bool = True) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, ys in series.items():
        ax.plot(x, [float("nan") if v is None else v for v in ys], marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return _finish(fig, path, title)
