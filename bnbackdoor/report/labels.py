"""How tables and figures name things (torch-free, so reports that only read JSON can use it)."""
from __future__ import annotations

# Row labels of the stored JSON and the tables made from it. They are a contract with every shipped metrics.json and
# results/*.json (and so with RESULTS.md): each keeps its spelling, but it has one home here.
CLEAN_MODEL = "clean model"          # the clean base model's row (evaluation scripts, defense comparison, RESULTS.md)
MANIPULATED_MODEL = "manipulated model"  # the manipulated model's row of the evaluation scripts
NO_DEFENSE = "no defense"            # the manipulated model's row of the defense comparison
MANIPULATED = "manipulated"          # the manipulated model's state in RESULTS.md and the detectors' rows
CLEAN_BASE = "clean base"            # the clean base model's rows of the detector comparison


def loss_label(name: str) -> str:
    """How tables and figures name a loss: ``ssim``/``dssim`` -> DSSIM (what is computed), others upper-cased."""
    return "DSSIM" if name in ("ssim", "dssim") else name.upper()
