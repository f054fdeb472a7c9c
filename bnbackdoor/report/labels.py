"""How tables and figures name things (torch-free, so reports that only read JSON can use it)."""
from __future__ import annotations


def loss_label(name: str) -> str:
    """How tables and figures name a loss: ``ssim``/``dssim`` -> DSSIM (what is computed), others upper-cased."""
    return "DSSIM" if name in ("ssim", "dssim") else name.upper()
