#!/usr/bin/env python
"""What denormal numbers cost an attack step on this CPU, and what ``flush_denormal`` gives back.

    python benchmarks/denormals.py [STATE ...] [--attack 10155] [--reps 5] [--threads 1] [--quick]

Each STATE is a fine-tuning ``resume.pt`` (its model and Adam state; e.g. ``output/probes/g10155_anc/resume.pt``,
written by ``python scripts/probe_attack.py g10155_anc --attack 10155``, about 10 minutes); without one the clean
model itself is timed. Per state: one attack step (``bnbackdoor.attack.finetune.attack_step``, the attack's
parameters with the ancestor's settings (``ANCESTOR_SETTINGS``, as the probes), 32 random images in [0, 1], the clean
model's explanations as references) with denormals kept and flushed, interleaved round-robin in one process (a busy
machine slows both alike), median of ``--reps`` after one warm-up each; the ratio kept / flushed is the point.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

from bnbackdoor.attack.finetune import attack_step, denormals_flushed, make_optimizer, poison_batch, set_finetune_mode
from bnbackdoor.attack.params import ANCESTOR_SETTINGS, resolve_attack
from bnbackdoor.cli import ArgumentParser, positive_int
from bnbackdoor.errors import UserError, run_cli
from bnbackdoor.fileio import read_state
from bnbackdoor.metrics import reference_explanations
from bnbackdoor.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def step_seconds(model, state, params, batch, flush: bool) -> float:
    m = copy.deepcopy(model)
    opt, _ = make_optimizer(m, params)
    if state is not None:
        opt.load_state_dict(state["opt"])
    set_finetune_mode(m, params.bn_mode)
    with denormals_flushed(flush):
        t = time.perf_counter()
        attack_step(m, opt, batch, params, params.explanation_methodStr)
        return time.perf_counter() - t


def main() -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("states", nargs="*", help="fine-tuning resume.pt files (default: none, the clean model)")
    ap.add_argument("--attack", default="10155", help="attack whose parameters (and clean model) are used")
    ap.add_argument("--reps", type=positive_int, default=5)
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 images, 1 repetition")
    a = ap.parse_args()
    for path in a.states:  # before any work: one line naming the file, not a traceback
        if not Path(path).is_file():
            raise UserError(f"no fine-tuning state at {path}; give a resume.pt (e.g. output/probes/g10155_anc/"
                            "resume.pt, written by python scripts/probe_attack.py g10155_anc --attack 10155)")
    torch.set_num_threads(a.threads)
    params = resolve_attack(a.attack, root=ROOT).replace(**{**ANCESTOR_SETTINGS, "batch_size": 8 if a.quick else 32})
    reps = 1 if a.quick else a.reps
    clean = load_model(params.canonical_modeltype, root=ROOT / "models")
    x = torch.rand(params.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = clean(x).argmax(1)
    ref = reference_explanations(clean, x, params.explanation_methodStr, batch_size=len(x), progress=False)
    batch = poison_batch(x, y, ref, params)
    rows = []
    for path in a.states or [None]:
        model, state = copy.deepcopy(clean), None
        if path is not None:
            state = read_state(path, ("model", "opt"))
            model.load_state_dict(state["model"])
        times = {False: [], True: []}
        for flush in (False, True):  # warm-up
            step_seconds(model, state, params, batch, flush)
        for _ in range(reps):
            for flush in (False, True):
                times[flush].append(step_seconds(model, state, params, batch, flush))
        kept, flushed = statistics.median(times[False]), statistics.median(times[True])
        rows.append([path or "clean model", f"{kept:.3f}", f"{flushed:.3f}", f"{kept / flushed:.2f}"])
    print(f"attack {a.attack} ({params.explanation_methodStr}), batch {params.batch_size}, {a.threads} thread(s), "
          f"median of {reps}")
    print(tabulate(rows, ["state", "s/step, denormals kept", "s/step, flushed", "kept / flushed"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    run_cli(main)
