#!/usr/bin/env python
"""Short attack probes for issue 27: which setting makes an attack take without breaking the clean model?

    python scripts/probe_attack.py NAME [--attack 155] [--set '{"learning_rate": 5e-4, "max_epochs": 2}']
                                   [--scale S] [--head-scale H] [--models-root DIR] [--threads N]
                                   [--save-dir output/probes]

Fine-tunes a copy of the clean model (``models/<modeltype>/model_0.pth``, or under ``--models-root``) with the
attack's stored parameters, then the ancestor's settings (:data:`bnbackdoor.attack.params.ANCESTOR_SETTINGS`), then
``--set``; ``--scale S`` first rescales every convolution -> BatchNorm pair by S (:mod:`bnbackdoor.models.rescale`:
the same function, weights S times larger); ``--head-scale H`` multiplies the classifier head by H (logits H times
larger, the same predictions). Writes every epoch's numbers to ``<save-dir>/NAME.json`` (default ``output/probes``; the shipped probes are
``results/probes``) (atomically, after every
epoch, ``"finished": false`` until the last, so a probe stopped early keeps what it measured; rerunning an unfinished
NAME resumes it from ``output/probes/NAME/``, a finished NAME is not rerun; a stored probe of the wrong shape is one line). Folders are recorded relative to the
repository. The table in ``experimentsettings/README.md`` is generated from these files
(``make_results.py``).
"""
from __future__ import annotations

import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from bnbackdoor.cli import ArgumentParser, existing_dir, output_dir, positive_int
from bnbackdoor.errors import UserError, run_cli
from bnbackdoor.fileio import write_json
from bnbackdoor.stored_json import read_probe, repo_relative
from bnbackdoor.attack.finetune import examples_per_epoch, finetune
from bnbackdoor.models import load_model
from bnbackdoor.models.rescale import rescale_conv_bn, scale_head
from bnbackdoor.attack.params import ANCESTOR_SETTINGS, resolve_attack

PROBES = Path("output") / "probes"  # the default --save-dir; the shipped probes are in results/probes


def clean_record(clean: torch.nn.Module) -> dict:
    """Where the probe's clean model came from (its checkpoint's meta): the command, seed and test accuracy."""
    meta = getattr(clean, "meta", None) or {}
    out = {k: meta.get(k) for k in ("modeltype", "command", "seed", "test_accuracy", "train_seconds")}
    if isinstance(out["command"], str):  # the clean model's command names its folders relative to the repository
        out["command"] = shlex.join(relative_argv(shlex.split(out["command"])))
    return out


def relative_argv(args: list[str]) -> list[str]:
    """The command's arguments with absolute paths named relative to the repository (records name no machine)."""
    return [repo_relative(x) if x.startswith("/") else x for x in args]


def epoch_row(row: dict) -> dict:
    """An epoch's numbers without the per-trigger lists and dicts."""
    return {k: v for k, v in row.items() if not isinstance(v, (list, dict))}


def main() -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="probe name: <save-dir>/<name>.json")
    ap.add_argument("--attack", default="155", help="attack id whose parameters are the start (default 155)")
    ap.add_argument("--set", default="{}", help="JSON object of parameter overrides, applied last")
    ap.add_argument("--scale", type=float, default=None, help="rescale conv->BN pairs of the copy by this factor")
    ap.add_argument("--head-scale", type=float, default=None,
                    help="multiply the copy's classifier head (its logits) by this factor")
    ap.add_argument("--models-root", type=existing_dir, default=None, help="clean models folder (default: models/)")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads, >= 1 (default 1)")
    ap.add_argument("--data-root", type=existing_dir, default=None)
    ap.add_argument("--save-dir", type=output_dir, default=str(PROBES),
                    help="folder of the probe files (default output/probes; the shipped ones: results/probes)")
    a = ap.parse_args()
    out = Path(a.save_dir) / f"{a.name}.json"
    stored = read_probe(out) if out.exists() else None  # a damaged or misshapen probe: one line, before any work
    if stored is not None and stored.get("finished", True):
        print(f"{out} exists; delete it to rerun", file=sys.stderr)
        return 0
    try:
        overrides = json.loads(a.set)
    except json.JSONDecodeError as e:
        raise UserError(f"--set is not JSON ({e.msg}); give an object such as '{{\"max_epochs\": 2}}'") from None
    if not isinstance(overrides, dict):
        raise UserError("--set must be a JSON object of parameter fields")
    for flag, v in (("--scale", a.scale), ("--head-scale", a.head_scale)):
        if v is not None and not v > 0:
            raise UserError(f"{flag} is {v}; give a factor > 0")
    torch.set_num_threads(a.threads)
    settings = {**ANCESTOR_SETTINGS, **overrides}
    p = resolve_attack(a.attack).replace(**settings)
    kw = {"root": a.models_root} if a.models_root else {}
    clean = load_model(p.canonical_modeltype, model_id=0, device="cpu", **kw)
    model = copy.deepcopy(clean)
    if a.scale is not None:
        rescale_conv_bn(model, a.scale)
    if a.head_scale is not None:
        scale_head(model, a.head_scale)
    t0 = time.time()
    run_dir = Path("output") / "probes" / a.name
    run_dir.mkdir(parents=True, exist_ok=True)
    done = list(stored["epochs"]) if stored is not None else []  # resuming: rows so far

    def record(rows: list[dict], finished: bool) -> None:
        write_json(out, {"name": a.name, "command": "python scripts/probe_attack.py " + shlex.join(relative_argv(sys.argv[1:])),
                         "cfg": {**settings, "scale": a.scale, "head_scale": a.head_scale, "attack": a.attack,
                                 "models_root": repo_relative(a.models_root) if a.models_root else None},
                         "clean_model": clean_record(clean),
                         "examples_per_epoch": examples_per_epoch(p.training_size, p),
                         "seconds": time.time() - t0, "finished": finished, "epochs": rows})

    def on_epoch(epoch: int, row: dict, _model) -> None:
        # an epoch recorded before a stop but not in the resume state (saved after this call) is run again
        done[:] = [r for r in done if r["epoch"] < epoch] + [epoch_row(row)]
        record(done, finished=False)

    res = finetune(model, clean, p, device=torch.device("cpu"), run_dir=run_dir, data_root=a.data_root,
                   progress=False, on_epoch=on_epoch)
    rows = [epoch_row(r) for r in res.history if r["batch"] == ""]
    record(rows, finished=True)
    last = rows[-1]
    print(f"{a.name}: clean acc {last['clean_accuracy']:.3f}, attack success {last.get('attack_success_rate')}, "
          f"DSSIM to target {last['expl_dssim_to_target']:.3f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
