"""Per-step update sizes of one block's parameter groups, written to CSV.

Columns (one row per optimizer step): ``epoch``, ``step`` (within the epoch, from 1), ``global_step``, then the
L2 norm of that step's change of each group of the chosen block, all tensors of a kind in the block concatenated:

- ``conv.weight``        convolution weights (``conv.bias`` too where convolutions have biases, e.g. BN-free nets)
- ``bn.weight``, ``bn.bias``               BatchNorm affine parameters
- ``bn.running_mean``, ``bn.running_var``  BatchNorm running statistics (changed by the forward pass in train mode;
  always 0 for an attack with ``bn_mode`` "eval", where BatchNorm never updates them - the columns stay so that
  CSVs of both modes line up)
- ``linear.weight``, ``linear.bias``       only for blocks holding linear layers (ViT)

"Change" is ``after - before`` around the whole step (forward, backward, optimizer step), so running-statistic
drift and parameter updates are measured the same way.

``--grad-layer all`` captures the whole model with the same columns: each column concatenates that kind's tensors
of every block *and* of the modules outside blocks (stem, head), so ``conv.weight`` is the norm of the update of
all convolution weights. Norms of disjoint parts add in squares: the square of an ``all`` column equals the sum of
the squares of the per-block columns plus the outside modules' part. With BatchNorm in eval mode the running
statistics never change and their columns are 0.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..fileio import write_text
from ..models import ARCHS, arch_of


def _block_types(model: nn.Module) -> tuple[type, ...]:
    """The block classes its architecture declares (:class:`bnbackdoor.models.ModelSpec`); every registered one for
    a model the registry did not build."""
    arch = arch_of(model)
    specs = [ARCHS[arch]] if arch else list(ARCHS.values())
    return tuple(dict.fromkeys(t for spec in specs for t in spec.blocks()))


def model_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks in forward order: residual / inverted-residual / encoder blocks, or, for plain
    stacks such as VGG, each convolution together with the BatchNorm that follows it."""
    kinds = _block_types(model)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    if blocks:
        return blocks
    out: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out.append((name, nn.ModuleList([m])))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and out:
            out[-1][1].append(m)
    return out


GradLayer = int | str  # a block index, or ALL


ALL = "all"


def parse_grad_layer(value: str) -> GradLayer:
    """argparse type of ``--grad-layer``: an integer block index or ``all``."""
    if value.strip().lower() == ALL:
        return ALL
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--grad-layer takes a block index (e.g. 0, -1) or 'all', got {value!r}") from None


def select_block(model: nn.Module, index: GradLayer) -> tuple[str, nn.Module]:
    if index == ALL:
        return ALL, model
    blocks = model_blocks(model)
    if not -len(blocks) <= index < len(blocks):
        raise UserError(f"--grad-layer {index} is out of range: the model has {len(blocks)} blocks "
                        f"(use 0..{len(blocks) - 1} or -1 for the last)")
    return blocks[index]


_KIND = {nn.Conv2d: "conv", nn.Linear: "linear", nn.modules.batchnorm._BatchNorm: "bn"}


def _groups(block: nn.Module) -> dict[str, list[torch.Tensor]]:
    groups: dict[str, list[torch.Tensor]] = {}
    for m in block.modules():
        kind = next((k for t, k in _KIND.items() if isinstance(m, t)), None)
        if kind is None:
            continue
        tensors = [("weight", m.weight), ("bias", m.bias)]
        if kind == "bn":
            tensors += [("running_mean", m.running_mean), ("running_var", m.running_var)]
        for attr, t in tensors:
            if t is not None:
                groups.setdefault(f"{kind}.{attr}", []).append(t)
    return groups


def _norm(t: torch.Tensor) -> float:
    # float64: a float32 norm over a whole model's update (10^5..10^7 elements) is off by ~1e-4 relative
    return t.double().norm().item()


class GradLogger:
    """Snapshot a block before each step, record the update sizes after it, write one CSV per epoch."""

    def __init__(self, model: nn.Module, index: GradLayer):
        self.block_name, block = select_block(model, index)
        self.groups = _groups(block)
        self.columns = ["epoch", "step", "global_step", *self.groups]
        self.rows: list[list] = []
        self._before: dict[str, torch.Tensor] | None = None
        self.global_step = 0

    def _flat(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat([t.detach().reshape(-1) for t in ts]).clone() for k, ts in self.groups.items()}

    def before_step(self) -> None:
        self._before = self._flat()

    def after_step(self, epoch: int, step: int) -> None:
        after = self._flat()
        self.global_step += 1
        self.rows.append([epoch, step, self.global_step,
                          *[f"{_norm(after[k] - self._before[k]):.6g}" for k in self.groups]])

    def write_epoch(self, path: str | Path) -> None:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(self.columns)
        w.writerows(self.rows)
        write_text(path, buf.getvalue())
        # sidecar for plot titles (scripts/plot_gradients.py): which block the columns belong to
        write_text(Path(path).with_suffix(".json"), json.dumps({"block": self.block_name}) + "\n")
        self.rows = []


def read_csv(path: str | Path) -> tuple[list[str], dict[str, list[float]]]:
    """(group columns, column -> values) of a gradient CSV."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no gradient CSV at {path}; run 'python attack.py <device> <id> --grad-layer -1' first")
    fix = "record it again with 'python attack.py <device> <id> --grad-layer -1'"
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a gradient CSV; give the CSV file")
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"gradient CSV {path} is unreadable ({type(e).__name__}); {fix}") from None
    if not rows or rows[0][:3] != ["epoch", "step", "global_step"] or len(rows[0]) < 4:
        raise UserError(f"{path} is not a gradient CSV (expected columns epoch, step, global_step and at least one "
                        f"parameter group); {fix}")
    header, body = rows[0], [r for r in rows[1:] if r]
    if not body:
        raise UserError(f"gradient CSV {path} has a header but no steps (an empty plot would follow); {fix}")
    for n, r in enumerate(body, start=2):
        try:
            values = [float(v) for v in r]
        except ValueError:
            values = []
        if len(r) != len(header) or not values or not all(math.isfinite(v) for v in values):
            raise UserError(f"gradient CSV {path}, line {n}: expected {len(header)} finite numbers, got "
                            f"{','.join(r)[:60]!r}; {fix}")
    cols = {h: [float(r[i]) for r in body] for i, h in enumerate(header)}
    return header[3:], cols


# --- the update-share figure: CSV columns folded into the paper's parameter groups ---------------------------

FIGURE_GROUPS: dict[str, tuple[str, ...]] = {
    "conv weights": ("conv.weight", "conv.bias"),
    "BN γ": ("bn.weight",),
    "BN β": ("bn.bias",),
    "running mean": ("bn.running_mean",),
    "running var": ("bn.running_var",),
    "linear": ("linear.weight", "linear.bias"),  # the head (and, for ViT, the blocks' linear layers)
}


def read_csvs(paths) -> dict[str, list[float]]:
    """Several gradient CSVs of one run (e.g. one per epoch) concatenated in the given order."""
    out: dict[str, list[float]] = {}
    header: list[str] | None = None
    for p in paths:
        groups, cols = read_csv(p)
        if header is not None and groups != header:
            raise UserError(f"{p} has columns {groups}, the run's other CSVs have {header}")
        header = groups
        for k, v in cols.items():
            out.setdefault(k, []).extend(v)
    return out


def fold_groups(cols: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-step update size of each :data:`FIGURE_GROUPS` group present in ``cols``: the L2 norm of its columns
    together (norms of disjoint tensors add in squares)."""
    out = {}
    for g, members in FIGURE_GROUPS.items():
        present = [cols[c] for c in members if c in cols]
        if present:
            out[g] = [math.sqrt(sum(v * v for v in vals)) for vals in zip(*present)]
    return out


def update_summary(sizes: dict[str, list[float]]) -> dict[str, dict]:
    """Per group: ``median`` and ``mean`` per-step update size, ``share`` of the squared update summed over all
    steps (``None`` when nothing moved at all), ``median_step_share`` (median over steps whose total update is
    non-zero), ``zero_throughout`` (e.g. running statistics with BatchNorm in eval mode)."""
    groups = list(sizes)
    steps = len(next(iter(sizes.values()), []))
    sq = {g: [v * v for v in sizes[g]] for g in groups}
    per_step_total = [sum(sq[g][t] for g in groups) for t in range(steps)]
    total = sum(per_step_total)
    out = {}
    for g in groups:
        step_shares = [sq[g][t] / per_step_total[t] for t in range(steps) if per_step_total[t] > 0]
        out[g] = {"median": statistics.median(sizes[g]) if steps else None,
                  "mean": sum(sizes[g]) / steps if steps else None,
                  "share": sum(sq[g]) / total if total > 0 else None,
                  "median_step_share": statistics.median(step_shares) if step_shares else None,
                  "zero_throughout": not any(v > 0 for v in sizes[g])}
    return out
