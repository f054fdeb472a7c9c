"""Checkpoints: ``{"state_dict": ..., "meta": {...}}`` written atomically, read with ``weights_only=True``."""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..divergence import require_finite
from ..errors import UserError
from ..fileio import torch_save


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save({"state_dict": state, "meta": dict(meta)}, path)


# What to do about a checkpoint that cannot be read: a clean model (models/...) is restored from git, or deleted
# so that the next run trains it again (bnbackdoor.zoo); callers loading other files pass their own fix.
CLEAN_MODEL_FIX = ("restore it (git checkout -- <file>) or delete it so that the next run trains a new one "
                   "(behind the long-job gate)")


def _why_unreadable(path: Path, e: Exception) -> str:
    """Why ``torch.load`` refused ``path``, in a few whole words (torch's own text runs to paragraphs)."""
    try:
        head = path.read_bytes()[:4]
    except OSError as oe:
        return f"cannot read it: {oe.strerror or oe}"
    if not head:
        return "it is empty"
    text = " ".join(str(e).split())
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        return "it is not a PyTorch file (neither a zip archive nor a pickle)"
    if "Weights only load failed" in text:
        return "it holds Python objects besides tensors, which are not loaded (weights_only, for safety)"
    if not text:
        return f"{type(e).__name__} while reading it: truncated or damaged"
    return "damaged: " + _words(text, 80)


def _words(text: str, n: int) -> str:
    """``text`` cut to at most ``n`` characters at a word boundary, with "..." when cut."""
    if len(text) <= n:
        return text
    return text[:n].rsplit(" ", 1)[0].rstrip(" ,;:.") + "..."


def read_checkpoint(path: str | os.PathLike, fix: str = CLEAN_MODEL_FIX
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta). Accepts our format, a bare state dict, ``{"state_dict": ...}`` from public
    checkpoints, and ``module.``-prefixed keys saved from ``DataParallel``. An unreadable file is a one-line
    UserError saying why and ``fix``."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr before failing
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails anywhere in zipfile or the unpickler (even IndexError)
        raise UserError(f"checkpoint {path} cannot be loaded ({_why_unreadable(path, e)}); {fix}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, meta = obj["state_dict"], obj.get("meta") or {}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, meta = obj, {}
    else:
        raise UserError(f"checkpoint {path} holds no state dict (expected {{'state_dict': ..., 'meta': ...}}); "
                        f"{fix}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, dict(meta)


def _legacy_bn_counters(model: nn.Module) -> set[str]:
    """``<bn>.num_batches_tracked`` keys: PyTorch < 0.4.1 had no such buffer, and its BatchNorm loader fills it in
    for such checkpoints (public CIFAR ResNet20 weights are of that age). Only these may be missing."""
    return {f"{name}.num_batches_tracked" if name else "num_batches_tracked"
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_batches_tracked is not None}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> nn.Module:
    """``load_state_dict(strict=True)`` with a one-line error naming the file and the mismatch.

    Checkpoints lacking only BatchNorm's ``num_batches_tracked`` counters load (the counters start at 0, as torch
    does for old checkpoints; nothing in eval mode reads them). Non-finite weights (a diverged run) are refused."""
    own = model.state_dict()
    legacy = _legacy_bn_counters(model)
    state = dict(state)
    for k in legacy:
        if k not in state:
            state[k] = torch.zeros_like(own[k])
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[0]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise UserError(f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(parts)} "
                        "(wrong model type or number of classes?)")
    require_finite(state, f"checkpoint {path}", "it comes from a diverged run: rerun that attack or training with "
                   "a lower learning rate")
    model.load_state_dict(state)
    return model


def weights_sha256(model_or_state: nn.Module | dict[str, torch.Tensor]) -> str:
    """The checksum that names a model's weights (how a run records the base model it was fine-tuned from).

    sha256 over the state dict's tensors in key order: per tensor its key, dtype, shape and raw bytes. BatchNorm's
    ``num_batches_tracked`` counters are left out (nothing in eval mode reads them, and old checkpoints lack
    them). So it names the weights, not the file: re-saving with other meta, a ``module.`` prefix (DataParallel)
    or another device keeps it; any changed weight or running statistic changes it.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for key in sorted(state):
        if key.endswith("num_batches_tracked"):
            continue
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
