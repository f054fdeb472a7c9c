#!/usr/bin/env python
"""Does a bf16 training step change what an attack ends with? One run per explanation method and one from-scratch
run, each in fp32 and in bf16 with the same seed, compared on clean accuracy, attack success and DSSIM to the
target explanation (evaluation is fp32 in both).

    python benchmarks/precision_equivalence.py [--cases 154,198,scratch,155] [--seeds 0,1] [--json PATH] [--threads N]

Each run is ``bnbackdoor.runs.run_attack`` of a shipped attack's own parameters (``precision`` replaced) into
``output/precision_equivalence/<precision>/``: resumable (a rerun skips the finished runs and resumes an
interrupted one). The from-scratch case is ``CIFAR10R20-badnets-10`` shortened to what a CPU can do twice in a
few minutes (``SCRATCH_SHORT``), so its numbers are those of a short training, not of the shipped model.

``--seeds`` runs each case with several seeds in both precisions (seed 0 under ``<precision>/``, seed N under
``<precision>/seed<N>/``). Why: a gradient attack's map can move in a sudden drop whose epoch differs from run to
run, so "bf16 within 0.02 of fp32" is only meaningful beside how far two fp32 runs with different seeds lie apart.
A case's record keeps one entry per seed, and the JSON keeps the cases this call did not run.
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


def run_dir(out: Path, precision: str, seed: int) -> Path:
    return out / precision if seed == 0 else out / precision / f"seed{seed}"


def run_case(name: str, out: Path, seed: int = 0) -> dict:
    attack, overrides, what = CASES[name]
    rows = {}
    for precision in PRECISIONS:
        params = resolve_attack(attack, root=ROOT).replace(**overrides, precision=precision)
        t0 = time.time()
        m = run_attack(params, torch.device("cpu"), save_path=run_dir(out, precision, seed), defenses={},
                       progress=False, allow_long=True, seed=seed)
        after = m["manipulated_model"]
        rows[precision] = {**{k: after[k] for k in KEYS}, "finetune_seconds": m["finetune_seconds"],
                           "precision_used": m.get("precision"), "wall_seconds_this_call": round(time.time() - t0)}
        print(f"{name} seed {seed} {precision}: " + ", ".join(f"{k} {after[k]:.3f}" for k in KEYS)
              + f" ({m['finetune_seconds']:.0f} s training)", file=sys.stderr)
    diff = {k: round(rows["bf16"][k] - rows["fp32"][k], 4) for k in KEYS}
    return {"case": name, "seed": seed, "attack": attack, "overrides": overrides, "what": what, **rows, "bf16_minus_fp32": diff,
            "within_tolerance": all(abs(v) <= TOLERANCE for v in diff.values()),
            "speedup": round(rows["fp32"]["finetune_seconds"] / max(rows["bf16"]["finetune_seconds"], 1e-9), 2)}


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers, e.g. 0,1") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"'{text}': give distinct seeds >= 0, e.g. 0,1")
    return seeds


def _stored(path: Path) -> list[dict]:
    """The cases an earlier call recorded (kept unless this call reruns them); a file of another shape is not ours
    to merge into: refused."""
    if not path.exists():
        return []
    try:
        cases = json.loads(path.read_text())["cases"]
        assert isinstance(cases, list) and all(isinstance(c, dict) and c.get("case") in CASES for c in cases)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise SystemExit(f"error: {path} is not a precision_equivalence record; move it aside or pass another --json")
    return cases


def seed_spread(results: list[dict]) -> dict:
    """Per case run with more than one seed: the largest distance between two seeds' fp32 results, and between
    two seeds' bf16 results, per metric - what "bf16 minus fp32" has to be read against."""
    spread = {}
    for case in CASES:
        rows = [r for r in results if r["case"] == case]
        if len(rows) > 1:
            spread[case] = {p: {k: round(max(r[p][k] for r in rows) - min(r[p][k] for r in rows), 4) for k in KEYS}
                            for p in PRECISIONS}
    return spread


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--json", type=lambda t: Path(output_file(t)), default=ROOT / "benchmarks" / "precision_equivalence.json")
    p.add_argument("--out", type=Path, default=ROOT / "output" / "precision_equivalence")
    p.add_argument("--seeds", type=seed_list, default=[0], help="comma-separated seeds, e.g. 0,1 (default 0)")
    p.add_argument("--threads", type=positive_int, default=None)
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad or not cases:
        p.error(f"--cases: unknown {', '.join(bad) or '(none given)'}; known: {', '.join(CASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [r for r in _stored(args.json) if (r.get("case"), r.get("seed", 0)) not in
               {(c, s) for c in cases for s in args.seeds}]
    for c in cases:
        for seed in args.seeds:
            results.append(run_case(c, args.out, seed))
            results.sort(key=lambda r: (list(CASES).index(r["case"]), r.get("seed", 0)))
            write_json(args.json, {"threads": torch.get_num_threads(), "tolerance": TOLERANCE, "cases": results,
                                   "seed_spread": seed_spread(results)})
    print(tabulate([[r["case"], r.get("seed", 0), r["what"], *(f"{r['fp32'][k]:.3f} / {r['bf16'][k]:.3f}" for k in KEYS),
                     f"{r['speedup']:.2f}×", "yes" if r["within_tolerance"] else "NO"] for r in results],
                   headers=["case", "seed", "run", "clean acc fp32 / bf16", "attack success", "DSSIM to target",
                            "training speed-up", f"within {TOLERANCE}"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
