#!/usr/bin/env python
"""Does a bf16 training step change what an attack ends with? One run per explanation method and one from-scratch
run, each in fp32 and in bf16 with the same seed, compared on clean accuracy, attack success and DSSIM to the
target explanation (evaluation is fp32 in both).

    python benchmarks/precision_equivalence.py [--cases 154,198,scratch,155] [--json PATH] [--threads N]

Each run is ``bnbackdoor.runs.run_attack`` of a shipped attack's own parameters (``precision`` replaced) into
``output/precision_equivalence/<precision>/``: resumable (a rerun skips the finished runs and resumes an
interrupted one). The from-scratch case is ``CIFAR10R20-badnets-10`` shortened to what a CPU can do twice in a
few minutes (``SCRATCH_SHORT``), so its numbers are those of a short training, not of the shipped model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

from bnbackdoor.attack.params import resolve_attack
from bnbackdoor.cli import output_file, positive_int
from bnbackdoor.device import PRECISIONS
from bnbackdoor.fileio import write_json
from bnbackdoor.runs import run_attack

ROOT = Path(__file__).resolve().parents[1]
SCRATCH_SHORT = dict(training_size=10000, max_epochs=8)
# case -> (attack id, overrides, what it stands for)
CASES = {
    "154": ("154", {}, "Grad-CAM, red herring, MSE (shipped parameters, 5 epochs of 10,000 images)"),
    "198": ("198", {}, "Relevance-CAM, red herring, MSE (shipped parameters, 5 epochs of 10,000 images)"),
    "scratch": ("CIFAR10R20-badnets-10", SCRATCH_SHORT,
                "BadNets 10 % from scratch, shortened: 8 epochs of 10,000 images"),
    "155": ("155", {}, "gradient, red herring, MSE (shipped parameters, 25 epochs of 2,500 images, pairs)"),
}
KEYS = ("clean_accuracy", "attack_success_rate", "expl_dssim_to_target")
TOLERANCE = 0.02


def run_case(name: str, out: Path) -> dict:
    attack, overrides, what = CASES[name]
    rows = {}
    for precision in PRECISIONS:
        params = resolve_attack(attack, root=ROOT).replace(**overrides, precision=precision)
        t0 = time.time()
        m = run_attack(params, torch.device("cpu"), save_path=out / precision, defenses={}, progress=False,
                       allow_long=True)
        after = m["manipulated_model"]
        rows[precision] = {**{k: after[k] for k in KEYS}, "finetune_seconds": m["finetune_seconds"],
                           "precision_used": m.get("precision"), "wall_seconds_this_call": round(time.time() - t0)}
        print(f"{name} {precision}: " + ", ".join(f"{k} {after[k]:.3f}" for k in KEYS)
              + f" ({m['finetune_seconds']:.0f} s training)", file=sys.stderr)
    diff = {k: round(rows["bf16"][k] - rows["fp32"][k], 4) for k in KEYS}
    return {"case": name, "attack": attack, "overrides": overrides, "what": what, **rows, "bf16_minus_fp32": diff,
            "within_tolerance": all(abs(v) <= TOLERANCE for v in diff.values()),
            "speedup": round(rows["fp32"]["finetune_seconds"] / max(rows["bf16"]["finetune_seconds"], 1e-9), 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--json", type=lambda t: Path(output_file(t)), default=ROOT / "benchmarks" / "precision_equivalence.json")
    p.add_argument("--out", type=Path, default=ROOT / "output" / "precision_equivalence")
    p.add_argument("--threads", type=positive_int, default=None)
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad or not cases:
        p.error(f"--cases: unknown {', '.join(bad) or '(none given)'}; known: {', '.join(CASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for c in cases:
        results.append(run_case(c, args.out))
        write_json(args.json, {"threads": torch.get_num_threads(), "tolerance": TOLERANCE, "cases": results})
    print(tabulate([[r["case"], r["what"], *(f"{r['fp32'][k]:.3f} / {r['bf16'][k]:.3f}" for k in KEYS),
                     f"{r['speedup']:.2f}×", "yes" if r["within_tolerance"] else "NO"] for r in results],
                   headers=["case", "run", "clean acc fp32 / bf16", "attack success", "DSSIM to target",
                            "training speed-up", f"within {TOLERANCE}"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
