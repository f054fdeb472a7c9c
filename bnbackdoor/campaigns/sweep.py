"""Grid sweeps: every grid point of an attack file as one job, on this machine or a SLURM cluster (submitit).

Each grid point is one :func:`bnbackdoor.runs.run_attack` into its own run folder ``<save_path>/<id>_<gs_id>``
(resume, skip finished, atomic files as for ``attack.py``). Jobs are submitit jobs:

- ``local``: :class:`submitit.LocalExecutor`, one process per grid point, at most ``max_parallel`` at once; process
  slot k gets device k mod len(devices) of the spec (``cuda:0,cuda:1`` or ``cpu``). A CUDA slot sees only its GPU
  (``CUDA_VISIBLE_DEVICES``), so inside the job it is ``cuda:0``.
- ``slurm``: one job array (:class:`submitit.SlurmExecutor`), ``%max_parallel`` tasks at a time; each task runs on
  the device its allocation gives (``cuda`` or ``cpu``).

Two sweeps (or a sweep and ``attack.py``) over one save path are safe: a grid point job claims its run folder
(:mod:`bnbackdoor.claim`); a point already finished is skipped, one claimed by another live process is reported as
``busy`` and left to it. Job logs: ``<save_path>/sweep_logs/<attack_id>/``; each job prints a marker line
``[sweep] RUN <id>`` when it really trains (``SKIP``/``BUSY`` otherwise).

Summary and the choice of the best point (``summarize``): see :data:`BEST_RULE`.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from ..claim import ClaimedElsewhere, claim_run
from ..data import load_cache, load_split, subset_indices
from ..device import parse_device
from ..errors import UserError
from ..runs import promote_run, read_run_metrics, run_attack, run_dir, write_csv
from ..metrics import accuracy, evaluate_attack
from ..models import MODEL_ROOT, load_model
from ..attack.params import (MANIPULATED_DIR, AttackParams, attack_file, expand_grid, is_grid, load_attack_file,
                     read_json)

REPO_ROOT = Path(__file__).resolve().parents[2]
MARKER = "[sweep]"


# ------------------------------------------------------------------------------------------------ the grid
def grid_of(path: Path) -> list[AttackParams]:
    d = read_json(path)
    return expand_grid(d, str(path)) if is_grid(d) else [load_attack_file(path)]


def parse_gs_ids(spec: str | None, n: int) -> list[int]:
    """``"0-11,14"`` -> [0, ..., 11, 14] (sorted, unique); ``None`` -> every point. Checked against the grid size."""
    if spec is None:
        return list(range(n))
    ids: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise UserError(f"--gs-ids: cannot read '{part}'; use e.g. 0-11,14")
        lo = int(m.group(1))
        ids.update(range(lo, int(m.group(2) or lo) + 1))
    bad = sorted(i for i in ids if i >= n)
    if bad:
        raise UserError(f"--gs-ids: {bad[0]} is out of range; the grid has {n} point{'s' * (n != 1)} (0-{n - 1})")
    return sorted(ids)


def parse_devices(spec: str, check: bool = True) -> list[str]:
    """``cuda:0,cuda:1`` / ``cpu`` -> device strings (each checked on this machine when ``check``)."""
    devices = [s.strip().lower() for s in spec.split(",") if s.strip()]
    if not devices:
        raise UserError("empty device spec; use e.g. cpu or cuda:0,cuda:1")
    for d in devices:
        if check:
            parse_device(d)
        elif not re.fullmatch(r"cpu|mps|cuda(:\d+)?", d):
            raise UserError(f"unknown device '{d}'; use cpu, cuda, cuda:N or mps")
    return devices


# ------------------------------------------------------------------------------------------------ one job
@dataclass(frozen=True)
class Task:
    """One grid point job (picklable: plain values only; paths absolute, jobs may start elsewhere)."""
    attack_file: str
    gs_id: int
    point_id: str
    device: str
    save_path: str
    models_root: str
    data_root: str | None = None
    seed: int = 0
    threads: int | None = None  # CPU threads of the job (local: the cores shared among the parallel points)


def run_point(task: Task) -> dict[str, Any]:
    """Run one grid point (in the job's process). Returns ``{"status": ran|skipped|busy, "id", ...metrics}``."""
    if task.threads:
        torch.set_num_threads(task.threads)
    params = grid_of(Path(task.attack_file))[task.gs_id]
    folder = run_dir(task.save_path, params)
    out = {"id": params.id, "gs_id": task.gs_id, "device": task.device}
    try:
        with claim_run(folder, command=f"sweep {task.attack_file} gs_id {task.gs_id}"):
            if finished_metrics(folder, params, task.seed) is not None:
                print(f"{MARKER} SKIP {params.id} (already finished)", flush=True)
                return {**out, "status": "skipped"}
            print(f"{MARKER} RUN {params.id} on {task.device} (pid {os.getpid()})", flush=True)
            m = run_attack(params, parse_device(task.device), save_path=task.save_path, data_root=task.data_root,
                           seed=task.seed, models_root=task.models_root, progress=False,
                           command=f"python scripts/sweep.py {params.attack_id} --gs-ids {task.gs_id}")
    except ClaimedElsewhere as e:
        print(f"{MARKER} BUSY {params.id}: {e}", flush=True)
        return {**out, "status": "busy", "message": str(e)}
    return {**out, "status": "ran", **{k: m["manipulated_model"].get(k) for k in SUMMARY_METRICS}}


def finished_metrics(folder: Path, params: AttackParams, seed: int) -> dict | None:
    """``metrics.json`` of a finished run of exactly these parameters and seed, else None."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    done = read_run_metrics(folder)  # damaged: one line saying which folder to rebuild
    return done if params.is_run(done, seed, key="parameters") else None


# ------------------------------------------------------------------------------------------------ backends
@dataclass
class SweepOptions:
    max_parallel: int = 1
    timeout_min: int = 24 * 60         # local: per point; slurm: --time
    slurm: dict[str, Any] | None = None  # extra SlurmExecutor parameters (partition, gpus_per_task, ...)
    setup: Sequence[str] = ()           # shell lines run before each job (module load, venv activation)
    wait: bool = True


def _setup_lines(extra: Sequence[str]) -> list[str]:
    # Jobs import bnbackdoor from this checkout wherever they start (a SLURM job's cwd is the submit folder).
    return [*extra, f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"]


def log_folder(save_path: str | Path, attack_id: Any) -> Path:
    return Path(save_path).resolve() / "sweep_logs" / str(attack_id)


class Progress:
    """Live counts of queued / running / finished / failed (+ skipped, busy) points; failures show their log."""

    def __init__(self, total: int, enabled: bool = True):
        self.counts = {"queued": total, "running": 0, "finished": 0, "failed": 0}
        self.results: list[dict[str, Any]] = []
        self.bar = tqdm(total=total, desc="sweep", unit="point", disable=not enabled, file=sys.stderr)
        self.enabled = enabled
        self._show()

    def _show(self) -> None:
        self.bar.set_postfix_str(" ".join(f"{k} {v}" for k, v in self.counts.items()), refresh=True)

    def started(self, n: int = 1) -> None:
        self.counts["queued"] -= n
        self.counts["running"] += n
        self._show()

    def done(self, job, task: Task) -> None:
        self.counts["running"] -= 1
        try:
            result = job.result()
            self.counts["finished"] += 1
            line = f"{task.point_id}: {result['status']}"
            if result["status"] == "ran":
                line += " " + ", ".join(f"{k} {_fmt(result.get(k))}" for k in SUMMARY_METRICS)
            elif result["status"] == "busy":
                line += f" ({result['message']})"
        except Exception as e:  # noqa: BLE001 - a failed point must not stop the others
            result = {"id": task.point_id, "gs_id": task.gs_id, "status": "failed", "message": _last_line(e)}
            self.counts["failed"] += 1
            line = f"{task.point_id}: FAILED; last lines of {_log_path(job)}:\n" + tail(_log_text(job), 12)
        self.results.append(result)
        self.bar.write(line, file=sys.stderr)
        self.bar.update(1)
        self._show()

    def close(self) -> None:
        self.bar.close()


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _last_line(e: BaseException) -> str:
    """The job's own exception line (``UserError: ...``) from submitit's FailedJobError text (a traceback)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    pattern = re.compile(r"(?:\w+\.)*(\w+(?:Error|Exception|Interrupt|Exit)\b.*)")
    raised = [m.group(1) for s in lines if (m := pattern.match(s))]
    return raised[-1] if raised else (lines[0] if lines else type(e).__name__)


def _log_path(job) -> Path:
    return job.paths.stderr


def _log_text(job) -> str:
    try:
        return job.paths.stderr.read_text(errors="replace")
    except OSError:
        return "(no log)"


def tail(text: str, n: int) -> str:
    return "\n".join("    " + s for s in text.rstrip().splitlines()[-n:])


def run_local(tasks: list[Task], devices: list[str], folder: Path, opts: SweepOptions,
              progress: bool = True) -> list[dict[str, Any]]:
    """One submitit local job per task, at most ``opts.max_parallel`` at once, devices round-robin over slots."""
    import submitit

    executor = submitit.LocalExecutor(folder=folder)
    queue, running, free = list(tasks), {}, list(range(opts.max_parallel))
    threads = max(1, (os.cpu_count() or 1) // opts.max_parallel)  # no oversubscription of the cores
    prog = Progress(len(tasks), progress)
    try:
        while queue or running:
            while queue and free:
                slot = free.pop(0)
                device = devices[slot % len(devices)]
                gpu = re.fullmatch(r"cuda(?::(\d+))?", device)
                executor.update_parameters(timeout_min=opts.timeout_min, setup=_setup_lines(opts.setup),
                                           gpus_per_node=1 if gpu else 0,
                                           visible_gpus=(int(gpu.group(1) or 0),) if gpu else ())
                task = queue.pop(0)
                task = Task(**{**asdict(task), "device": "cuda:0" if gpu else device, "threads": threads})
                running[executor.submit(run_point, task)] = (task, slot)
                prog.started()
            for job in [j for j in running if j.done()]:
                task, slot = running.pop(job)
                free.append(slot)
                prog.done(job, task)
            time.sleep(0.1)
    except KeyboardInterrupt:
        for job in running:  # SIGINT: the point saves its last finished epoch and releases its claim
            job.cancel()
        raise
    finally:
        prog.close()
    return prog.results


def slurm_executor(folder: Path, opts: SweepOptions):
    """The SlurmExecutor of a sweep: a job array, ``%max_parallel`` tasks at a time."""
    import submitit

    if shutil.which("srun") is None:  # submitit's own check, as one line
        raise UserError("--backend slurm: no SLURM here ('srun' not found); run it on the cluster's login node "
                        "or use --backend local")
    executor = submitit.SlurmExecutor(folder=folder / "%j")
    executor.update_parameters(time=opts.timeout_min, array_parallelism=opts.max_parallel,
                               setup=_setup_lines(opts.setup), **(opts.slurm or {}))
    return executor


def run_slurm(tasks: list[Task], devices: list[str], folder: Path, opts: SweepOptions,
              progress: bool = True) -> list[dict[str, Any]]:
    """Submit every task as one job array; with ``opts.wait`` watch it like the local backend."""
    if len(devices) != 1 or ":" in devices[0]:
        raise UserError("a slurm sweep takes one device kind, cuda or cpu (each task uses the GPU it is given)")
    device = devices[0]
    executor = slurm_executor(folder, opts)
    tasks = [Task(**{**asdict(t), "device": device}) for t in tasks]
    jobs = executor.map_array(run_point, tasks)
    print(f"submitted job array {jobs[0].job_id.split('_')[0]} ({len(jobs)} points, at most {opts.max_parallel} "
          f"at once); logs: {folder}", file=sys.stderr)
    if not opts.wait:
        return [{"id": t.point_id, "gs_id": t.gs_id, "status": "submitted", "job_id": j.job_id}
                for t, j in zip(tasks, jobs)]
    prog = Progress(len(tasks), progress)
    pending = dict(zip(jobs, tasks))
    started: set = set()
    try:
        while pending:
            for job, task in list(pending.items()):
                if job not in started and job.state not in ("PENDING", "UNKNOWN", "REQUEUED"):
                    started.add(job)
                    prog.started()
                if job.done():
                    if job not in started:
                        prog.started()
                    pending.pop(job)
                    prog.done(job, task)
            time.sleep(10)
    finally:
        prog.close()
    return prog.results


BACKENDS: dict[str, Callable[..., list[dict[str, Any]]]] = {"local": run_local, "slurm": run_slurm}


def sweep(attackids: Sequence[str], device_spec: str, *, backend: str = "local", gs_ids: str | None = None,
          save_path: str | Path = "output", data_root: str | None = None, seed: int = 0,
          models_root: str | Path | None = None, root: str | Path = ".", opts: SweepOptions | None = None,
          progress: bool = True) -> list[dict[str, Any]]:
    """Run (or submit) the chosen grid points of every attack; returns one result dict per point."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'; use {' or '.join(BACKENDS)}")
    opts = opts or SweepOptions()
    if opts.max_parallel < 1:
        raise UserError(f"--max-parallel must be at least 1, got {opts.max_parallel}")
    devices = parse_devices(device_spec, check=backend == "local")

    models_root = str(Path(models_root or Path(root) / MODEL_ROOT).resolve())
    results = []
    for attackid in attackids:
        path = attack_file(attackid, root, grid_first=True).resolve()
        points = grid_of(path)
        chosen = [points[i] for i in parse_gs_ids(gs_ids, len(points))]
        tasks = [Task(str(path), p.gs_id, str(p.id), devices[0], str(Path(save_path).resolve()), models_root,
                      str(Path(data_root).resolve()) if data_root else None, seed) for p in chosen]
        folder = log_folder(save_path, points[0].attack_id)
        results += BACKENDS[backend](tasks, devices, folder, opts, progress)
    return results


# ------------------------------------------------------------------------------------------------ summary
SUMMARY_METRICS = ("clean_accuracy", "attack_success_rate", "expl_dssim_to_target")
ACCURACY_TOLERANCE = 0.02
BEST_RULE = (
    "best point = among the points whose validation clean accuracy is within 2 percentage points of the clean "
    "base model's on the same images, the highest validation attack success rate; ties -> lowest validation "
    "DSSIM to the target explanation, then lowest gs_id (no point within 2 pp: the same order over all points). "
    "Validation images: a seeded slice of the TRAINING split that the run did not train on (the images outside its "
    "training_size subset); when training_size covers the whole split there are none, and the slice is of images "
    "the run trained on (said in the output). The test images the catalogue reports are never used for the choice.")


def validation_split(params: AttackParams, seed: int, size: int, data_root=None
                     ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(x, y, held_out): ``size`` training images outside the run's training subset when there are any."""
    n = len(load_cache(params.dataset, data_root)["y_train"])
    used = subset_indices(n, params.training_size, seed)
    held_out = len(used) < n
    x, y = load_split(params.dataset, "train", size=min(size, n - len(used)) if held_out else size, seed=seed + 1,
                      data_root=data_root, exclude=used if held_out else None)
    return x, y, held_out


def finished_runs(attackid: str, save_path: str | Path, root: str | Path = ".") -> list[tuple[AttackParams, dict]]:
    """(params, metrics.json) of every finished grid point of ``attackid`` under ``save_path``, in gs_id order."""
    runs = []
    for p in grid_of(attack_file(attackid, root, grid_first=True).resolve()):
        folder = run_dir(save_path, p)
        if (folder / "metrics.json").is_file() and (folder / "model.pth").is_file():
            m = read_run_metrics(folder)
            if p.same_as(m.get("parameters")):
                runs.append((p, m))
    return runs


def varying_fields(params: Sequence[AttackParams]) -> list[str]:
    skip = {"id", "gs_id"}
    dicts = [p.to_dict() for p in params]
    return [k for k in dicts[0] if k not in skip and any(d[k] != dicts[0][k] for d in dicts[1:])]


def choose_best(rows: list[dict[str, Any]], clean_accuracy: dict[Any, float]) -> tuple[dict[str, Any], bool]:
    """The row :data:`BEST_RULE` picks, and whether it met the accuracy bar. ``clean_accuracy``: per base model key."""
    def ok(r):
        return r["val_clean_accuracy"] >= clean_accuracy[r["_base"]] - ACCURACY_TOLERANCE

    def key(r):
        asr = r["val_attack_success_rate"]
        dssim = r["val_expl_dssim_to_target"]
        return (-(asr if asr is not None else 0.0), dssim if dssim is not None else float("inf"), r["gs_id"])

    good = [r for r in rows if ok(r)]
    return min(good or rows, key=key), bool(good)


def summarize(attackid: str, save_path: str | Path = "output", *, device: str = "cpu", data_root=None,
              models_root: str | Path | None = None, root: str | Path = ".", val_size: int = 500,
              batch_size: int = 100, progress: bool = True) -> dict[str, Any]:
    """Evaluate every finished point on validation images; returns {rows, columns, best, note, csv}."""
    runs = finished_runs(attackid, save_path, root)
    if not runs:
        raise UserError(f"no finished grid points of '{attackid}' under {save_path}; run scripts/sweep.py first")
    dev = parse_device(device)
    models_root = models_root or Path(root) / MODEL_ROOT
    varying = varying_fields([p for p, _ in runs])
    rows, clean_acc, notes = [], {}, set()
    for p, m in tqdm(runs, desc="validation", disable=not progress, file=sys.stderr):
        seed = m.get("seed", 0)
        x, y, held_out = validation_split(p, seed, val_size, data_root)
        if not held_out:
            notes.add(f"training_size {p.training_size} covers the training split: the {len(y)} validation images "
                      "were seen in training")
        base = (p.modeltype, p.model_id, p.dataset, p.training_size, seed)
        clean = load_model(p.modeltype, p.model_id, device=dev, root=models_root)
        if base not in clean_acc:
            clean_acc[base] = accuracy(clean, x, y, device=dev, progress=False)
        model = load_model(p.modeltype, path=run_dir(save_path, p) / "model.pth", device=dev)
        val = evaluate_attack(model, clean, p, x, y, batch_size=batch_size, device=dev, progress=False)
        row = {"gs_id": p.gs_id, "id": p.id, **{k: p.to_dict()[k] for k in varying}}
        row.update({f"val_{k}": val.get(k) for k in SUMMARY_METRICS})
        row.update({f"test_{k}": m["manipulated_model"].get(k) for k in SUMMARY_METRICS})
        row["_base"] = base
        rows.append(row)
    best, met_bar = choose_best(rows, clean_acc)
    for r in rows:
        r["best"] = "*" if r is best else ""
        r.pop("_base")
    csv_path = Path(save_path) / f"sweep_summary_{runs[0][0].attack_id}.csv"
    write_csv(csv_path, rows)
    if not met_bar:
        notes.add(f"no point kept its validation clean accuracy within {ACCURACY_TOLERANCE:.0%} of the clean "
                  "model's; the best is chosen over all points")
    return {"rows": rows, "best": best, "notes": sorted(notes), "csv": csv_path, "varying": varying,
            "attack_id": runs[0][0].attack_id,
            "clean_val_accuracy": sorted(clean_acc.values())}


def promote(attackid: str, best_id: str, save_path: str | Path = "output", root: str | Path = ".",
            force: bool = False) -> Path:
    """Copy run folder ``<save_path>/<best_id>`` to ``manipulated_models/<attackid>/`` (one rename,
    :func:`bnbackdoor.runs.promote_run`); an existing model is replaced only with ``force``."""
    src = Path(save_path) / best_id
    dst = Path(root) / MANIPULATED_DIR / str(attackid)
    if dst.exists() and not force:
        raise UserError(f"{dst} exists; pass --force to replace it with {src}")
    return promote_run(src, dst)