"""Figures people look at: explanation grids, gradient comparisons, bar charts, curves (matplotlib, Agg).

Every figure's title should say what it shows: :func:`figure_title` names the attack id, kind, explanation
method, loss and target class of an :class:`~bnbackdoor.attack.params.AttackParams`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .data import dataset_info  # noqa: E402
from .fileio import save_figure  # noqa: E402
from .report.labels import loss_label  # noqa: E402


MAP_CMAP = "jet"


def figure_title(params, what: str = "") -> str:
    """``attack 154 (RedHerring, grad_cam, MSE, target class 1 'automobile')[: what]`` for any figure of a run."""
    classes = dataset_info(params.dataset).classes
    targets = ["keep label" if c is None else f"{c} '{classes[c]}'" for c in params.target_classes]
    if len(targets) > 1 and len(set(targets)) == 1:
        targets = [f"{targets[0]} (each trigger)"]
    loss = loss_label(params.lossStr)
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


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def curves(x: Sequence[float], series: dict[str, Sequence[float | None]], path: str | Path, xlabel: str,
           ylabel: str, title: str = "", logx: bool = True,
           references: dict[str, float | None] | None = None) -> Path:
    """Series against ``x`` (each its own marker and line style, drawn with a small horizontal offset so that
    series which coincide stay visible) and ``references`` as dashed horizontal lines (e.g. the no-defense
    baselines)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs = np.asarray(x, dtype=float)
    k = len(series)
    for i, (name, ys) in enumerate(series.items()):
        shift = (i - (k - 1) / 2) * 0.02          # a fraction of a decade (log x) or of the x range
        xi = xs * 10 ** shift if logx else xs + shift * (np.ptp(xs) or 1.0)
        ax.plot(xi, [float("nan") if v is None else v for v in ys], marker=_MARKERS[i % len(_MARKERS)],
                linestyle=("-", "--", "-.", ":")[i % 4], color=colors[i % len(colors)], label=name, alpha=0.9)
    for j, (name, v) in enumerate((references or {}).items()):
        if v is not None:
            ax.axhline(v, color=colors[j % len(colors)], linestyle=":", linewidth=1.2, label=f"{name} ({v:.3f})")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return _finish(fig, path, title)


def defense_scatter(points: Sequence[dict], path: str | Path, title: str = "", x: str = "clean_accuracy",
                    y: str = "attack_success_rate", xlabel: str = "clean accuracy",
                    ylabel: str = "attack success") -> Path:
    """Scatter of ``points`` (dicts with ``group``, ``size`` and the ``x``/``y`` keys): one colour per group (a
    defense), one marker per size (clean images); points whose size is None (references such as "no defense") in
    black with their own markers. Missing values are left out."""
    groups = list(dict.fromkeys(p["group"] for p in points if p.get("size") is not None))
    refs = list(dict.fromkeys(p["group"] for p in points if p.get("size") is None))
    sizes = sorted({p["size"] for p in points if p.get("size") is not None})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {g: colors[i % len(colors)] for i, g in enumerate(groups)}
    marks = "os^Dvp<>h"
    marker = {s: marks[i % len(marks)] for i, s in enumerate(sizes)}
    ref_marker = {g: "*X+"[i % 3] for i, g in enumerate(refs)}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for p in points:
        if p.get(x) is None or p.get(y) is None:
            continue
        if p.get("size") is None:
            ax.scatter(p[x], p[y], color="black", marker=ref_marker[p["group"]], s=110, zorder=3)
        else:
            ax.scatter(p[x], p[y], color=color[p["group"]], marker=marker[p["size"]], s=55, alpha=0.85,
                       edgecolors="black", linewidths=0.4)
    handles = [Line2D([], [], color=color[g], marker="o", ls="", label=g) for g in groups]
    handles += [Line2D([], [], color="gray", marker=marker[s], ls="", label=f"{s} clean images") for s in sizes]
    handles += [Line2D([], [], color="black", marker=ref_marker[g], ls="", markersize=10, label=g) for g in refs]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    return _finish(fig, path, title)


def composition_plot(points: Sequence[dict], path: str | Path, baseline: dict | None = None, title: str = "") -> Path:
    """Attack success (left) and clean accuracy (right) against the triggered fraction f of each test batch,
    one line per test batch size B (``points``: dicts with test_batch, trigger_fraction, attack_success_rate,
    clean_accuracy); the no-defense values as dotted reference lines."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sizes = sorted({p["test_batch"] for p in points})
    for ax, key, label in zip(axes, ("attack_success_rate", "clean_accuracy"), ("attack success", "clean accuracy")):
        for i, b in enumerate(sizes):
            ps = sorted((p for p in points if p["test_batch"] == b), key=lambda p: p["trigger_fraction"])
            ax.plot([p["trigger_fraction"] for p in ps], [float("nan") if p[key] is None else p[key] for p in ps],
                    marker=_MARKERS[i % len(_MARKERS)], color=colors[i % len(colors)], label=f"B = {b}")
        ref = None if baseline is None else baseline.get(key)
        if ref is not None:
            ax.axhline(ref, color="gray", linestyle=":", label=f"no defense ({ref:.3f})")
        ax.set_xscale("log")
        ax.set_xlabel("triggered share f of each test batch (log; leftmost: 1/B)", fontsize=9)
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _finish(fig, path, title)


def ablation_bars(groups: Sequence[str], restored: Sequence[dict], only: Sequence[dict], manipulated: dict,
                  clean: dict, path: str | Path, title: str = "") -> Path:
    """Where the backdoor lives, at a glance: per parameter group, attack success (red) and clean accuracy (blue)
    of "restore G" (left panel) and "only G" (right), with the manipulated (dashed) and clean (dotted) models'
    values as lines. Rows are metric dicts with ``attack_success_rate`` and ``clean_accuracy``."""
    metrics = (("attack_success_rate", "attack success", "tab:red"), ("clean_accuracy", "clean accuracy", "tab:blue"))
    x = np.arange(len(groups))
    w = 0.38
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.5 + 1.1 * len(groups)), 3.8), sharey=True, squeeze=False)
    panels = (("restore G: manipulated model, G set back to clean", restored),
              ("only G: clean model, only G from the manipulated one", only))
    for ax, (name, rows) in zip(axes[0], panels):
        for j, (key, label, color) in enumerate(metrics):
            vals = [r.get(key) for r in rows]
            ax.bar(x + (j - 0.5) * w, [0 if v is None else v for v in vals], w, color=color, alpha=0.85,
                   label=label)
            for i, v in enumerate(vals):
                ax.text(x[i] + (j - 0.5) * w, 0 if v is None else v, "n/a" if v is None else f"{v:.2f}",
                        ha="center", va="bottom", fontsize=6)
            for ref, style, who in ((manipulated, "--", "manipulated"), (clean, ":", "clean")):
                if ref.get(key) is not None:
                    ax.axhline(ref[key], ls=style, color=color, lw=1, label=f"{label}, {who} model")
        ax.set_xticks(x, list(groups), rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("rate")
    axes[0][1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _finish(fig, path, title)


def update_shares(panels: Sequence[tuple[str, Sequence[float], dict[str, Sequence[float]], dict[str, float | None]]],
                  path: str | Path, title: str = "") -> Path:
    """One column per panel ``(title, steps, group -> per-step update size, group -> share of the total)``: top,
    each group's per-step update size over steps (log scale; a group that never moves is named in the legend,
    not drawn); bottom, each group's share of the squared update, summed over all steps."""
    n = len(panels)
    fig, axes = plt.subplots(2, n, figsize=(4.6 * n, 6.2), squeeze=False,
                             gridspec_kw={"height_ratios": [2.2, 1]})
    names = list(dict.fromkeys(g for _, _, sizes, _ in panels for g in sizes))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for c, (name, steps, sizes, shares) in enumerate(panels):
        ax = axes[0][c]
        for g, vals in sizes.items():
            v = np.asarray(vals, dtype=float)
            if not np.any(v > 0):  # e.g. running statistics with BatchNorm in eval mode
                ax.plot([], [], color=colors[g], label=f"{g} (0 throughout)")
                continue
            ax.plot(steps, np.where(v > 0, v, np.nan), lw=0.7, color=colors[g], label=g)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("update size (L2)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        ax = axes[1][c]
        groups = list(shares)
        vals = [shares[g] or 0.0 for g in groups]
        ax.bar(np.arange(len(groups)), vals, color=[colors[g] for g in groups])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{100 * v:.1f}%", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("share of ‖update‖²")
        ax.grid(axis="y", alpha=0.3)
    return _finish(fig, path, title)
