"""Parse the ``<device>`` argument every script takes."""
from __future__ import annotations

import re
import sys
from typing import Callable

import torch

from .errors import UserError


def parse_device(spec: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` -> ``torch.device``; unavailable devices are a UserError."""
    s = str(spec).strip().lower()
    if s == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", s)
    if m:
        if not torch.cuda.is_available():
            raise UserError(f"device '{spec}' requested but no CUDA GPU is available here; use 'cpu'")
        idx = int(m.group(1) or 0)
        if idx >= torch.cuda.device_count():
            raise UserError(f"device '{spec}' does not exist: this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", idx)
    if s == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError("device 'mps' requested but Apple MPS is not available here; use 'cpu'")
        return torch.device("mps")
    raise UserError(f"unknown device '{spec}'; use cpu, cuda, cuda:N or mps")


# ------------------------------------------------------------------------------------------------ precision
# The arithmetic of a training step: "fp32" (every stored run), or "bf16" = torch.autocast to bfloat16 for the
# step's forward and backward passes (convolutions and linear layers in bf16; master weights, optimizer state,
# BatchNorm statistics and the losses stay fp32). Evaluation, reference explanations and Re-BN are always fp32.
PRECISIONS = ("fp32", "bf16")


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that says so, a CPU with AVX512-BF16 or AMX (elsewhere
    oneDNN emulates bf16, slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


def resolve_precision(precision: str, device: torch.device, notice: Callable[[str], None] | None = None) -> str:
    """The precision a step on ``device`` will run in: ``precision``, except that bf16 where the device has no native
    bf16 falls back to fp32 with a one-line notice (to ``notice``, default stderr): a slow emulation would defeat
    the point."""
    if precision not in PRECISIONS:
        raise UserError(f"precision is '{precision}'; allowed: {', '.join(PRECISIONS)}")
    if precision == "bf16" and not bf16_supported(device):
        line = f"notice: {torch.device(device)} has no native bf16 arithmetic; training in fp32 instead"
        notice(line) if notice is not None else print(line, file=sys.stderr)
        return "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context of a training step in ``precision`` (fp32: autocast off, nothing changes)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
