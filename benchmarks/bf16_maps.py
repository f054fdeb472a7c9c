#!/usr/bin/env python
"""Where does a bf16 input-gradient map differ from the fp32 one? The shipped CIFAR-10 ResNet20, 64 test images,
the gradient method's map (|∂ logit / ∂ x|, max over RGB, per-image max-normalised), in the two activations an
attack meets: ReLU (evaluation) and Softplus(β = 8) (what the gradient attack trains through).

    python benchmarks/bf16_maps.py [--json PATH] [--threads N]

Each variant is compared to the fp32 map (relative L2 over the batch, smallest per-image cosine):

* ``bf16``: the step's own arithmetic, ``torch.autocast`` to bfloat16;
* ``fp32, weights rounded``: fp32 arithmetic, the conv/linear weights rounded to bf16 once — the map of the model
  a bf16 step actually differentiates, without any rounding inside the passes;
* ``bf16 convs, fp32 elsewhere``: only the convolutions in bf16 (BatchNorm, activations, sums in fp32);
* ``... and conv1 in fp32``: the same with the first convolution (next to the input) in fp32.

If ``fp32, weights rounded`` is as far from fp32 as ``bf16`` is, the difference is not rounding noise that a
smarter bf16 kernel could remove: a bf16 step pushes the map of a slightly different model.
"""
from __future__ import annotations

import argparse
import copy
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

from bnbackdoor.cli import output_file, positive_int
from bnbackdoor.data import test_images
from bnbackdoor.errors import UserError
from bnbackdoor.explain import explain
from bnbackdoor.fileio import write_json
from bnbackdoor.models import load_model, softplus

ROOT = Path(__file__).resolve().parents[1]
ACTIVATIONS = {"Softplus(8)": 8.0, "ReLU": None}


class _Bf16Conv(nn.Module):
    """A convolution computed in bf16 and returned in fp32."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c = self.conv
        b = None if c.bias is None else c.bias.bfloat16()
        return F.conv2d(x.bfloat16(), c.weight.bfloat16(), b, c.stride, c.padding, c.dilation, c.groups).float()


def bf16_convs(model: nn.Module, keep_first: bool) -> nn.Module:
    out = copy.deepcopy(model)
    convs = [(parent, name) for parent in out.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Conv2d)]
    for parent, name in convs[1 if keep_first else 0:]:
        setattr(parent, name, _Bf16Conv(getattr(parent, name)))
    return out


def rounded_weights(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(m.weight.bfloat16().float())
    return out


def grad_map(model: nn.Module, x: torch.Tensor, beta: float | None, bf16: bool = False) -> torch.Tensor:
    with softplus(model, beta) if beta else nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return explain(model, x, "grad", agg="max").float()


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    cos = F.cosine_similarity(got.flatten(1).double(), ref.flatten(1).double(), dim=1).min().item()
    return {"relative_l2": round(rel, 4), "min_cosine": round(cos, 4)}


def measure(model: nn.Module, x: torch.Tensor) -> dict:
    rows = {}
    for act, beta in ACTIVATIONS.items():
        ref = grad_map(model, x, beta)
        rows[act] = {
            "bf16": compare(grad_map(model, x, beta, bf16=True), ref),
            "fp32, weights rounded": compare(grad_map(rounded_weights(model), x, beta), ref),
            "bf16 convs, fp32 elsewhere": compare(grad_map(bf16_convs(model, False), x, beta), ref),
            "bf16 convs, fp32 elsewhere and conv1": compare(grad_map(bf16_convs(model, True), x, beta), ref),
        }
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=lambda t: Path(output_file(t)), default=ROOT / "benchmarks" / "bf16_maps.json")
    p.add_argument("--images", type=positive_int, default=64)
    p.add_argument("--threads", type=positive_int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = load_model("cifar10_resnet20", 0, root=ROOT / "models").eval()
        x, _ = test_images("cifar10", args.images)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = measure(model, x)
    write_json(args.json, {"model": "cifar10_resnet20/model_0", "images": args.images, "method": "grad",
                           "maps": rows})
    print(tabulate([[act, variant, f"{r['relative_l2']:.3f}", f"{r['min_cosine']:.3f}"]
                    for act, variants in rows.items() for variant, r in variants.items()],
                   headers=["activation", "variant", "relative L2 to fp32", "smallest cosine"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
