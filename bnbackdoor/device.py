"""Parse the ``<device>`` argument every script takes."""
from __future__ import annotations

import re

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
