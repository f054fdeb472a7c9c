"""Evaluation metrics. All batched; a tqdm bar for long passes."""
from __future__ import annotations

import torch
import torch.nn as nn
from tqdm import tqdm


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500, device: torch.device | str | None = None,
            progress: bool = True, desc: str = "predict") -> torch.Tensor:
    """Predicted labels of ``x`` (float images in [0, 1]) in eval mode; returns a CPU tensor."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
        out.append(model(x[i:i + batch_size].to(device, non_blocking=True)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> float:
    """Share of ``x`` classified as ``y``."""
    return (predict(model, x, **kw) == y.cpu()).float().mean().item()
