#!/usr/bin/env python
"""Explanation throughput on ResNet20 (CPU): images/s per method, with and without create_graph, and the cost of
an attack step relative to a plain training step.

python benchmarks/bench_explain.py [--quick] [--threads N] [--batch 32 256] [--reps 5]

Each timing is the median of ``--reps`` repetitions after one warm-up. The attack step is what fine-tuning does
per batch: one forward pass giving logits and maps (create_graph=True, Softplus), cross-entropy + explanation
MSE, backward into the parameters; the plain step is forward + cross-entropy + backward.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from bnbackdoor.cli import ArgumentParser, positive_int
from bnbackdoor.explain import METHODS, explain, explain_with_logits
from bnbackdoor.losses import explanation_loss
from bnbackdoor.models import build_model, softplus
from bnbackdoor.targets import target_mask


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up (allocator, autograd graph caches)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plain_step(model, x, y):
    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return run


def attack_step(model, x, y, method, target):
    def run():
        model.zero_grad(set_to_none=True)
        with softplus(model, 10.0):
            logits, maps = explain_with_logits(model, x, method, y, create_graph=True, agg="max")
            loss = 0.5 * F.cross_entropy(logits, y) + 0.5 * explanation_loss(maps, target, "mse")
        loss.backward()
    return run


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: batch 8, 2 repetitions")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[32, 256])
    p.add_argument("--reps", type=positive_int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    batches, reps = ([8], 2) if a.quick else (a.batch, a.reps)

    torch.manual_seed(0)
    model = build_model("cifar10_resnet20")
    target = target_mask("square")
    rows, steps = [], []
    for b in batches:
        x, y = torch.rand(b, 3, 32, 32), torch.randint(0, 10, (b,))
        model.eval()
        with torch.no_grad():
            fwd = median_seconds(lambda: model(x), reps)
        rows.append(["forward only (no_grad)", b, "-", f"{b / fwd:,.0f}"])
        for method in METHODS:
            for cg in (False, True):
                def run(method=method, cg=cg):
                    maps = explain(model, x, method, y, create_graph=cg)
                    if cg:
                        maps.sum().backward()  # the graph is the point of create_graph: include its use
                        model.zero_grad(set_to_none=True)
                t = median_seconds(run, reps)
                rows.append([method, b, "yes (+backward)" if cg else "no", f"{b / t:,.0f}"])
        model.train()
        base = median_seconds(plain_step(model, x, y), reps)
        steps.append(["plain train step", b, f"{base * 1e3:.1f}", "1.00"])
        for method in METHODS:
            t = median_seconds(attack_step(model, x, y, method, target), reps)
            steps.append([f"attack step ({method})", b, f"{t * 1e3:.1f}", f"{t / base:.2f}"])
    print(f"ResNet20, CPU, {torch.get_num_threads()} thread(s), median of {reps} after 1 warm-up")
    print(tabulate(rows, headers=["method", "batch", "create_graph", "images/s"], tablefmt="github"))
    print()
    print(tabulate(steps, headers=["step", "batch", "ms", "× plain"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
