"""Grid sweeps on submitit: a real tiny 4-point grid through the local backend (two sweeps at once, two points in
parallel each), identical to a sequential run; failures; the summary's validation rule; the slurm job array."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from bnbackdoor.data import load_split, subset_indices
from bnbackdoor.errors import UserError
from bnbackdoor.runs import run_attack
from bnbackdoor.metrics import evaluate_attack
from bnbackdoor.models import build_model, load_model, save_checkpoint
from bnbackdoor.campaigns.sweep import (ACCURACY_TOLERANCE, SweepOptions, Task, choose_best, grid_of, parse_devices,
                              parse_gs_ids, promote, run_point, summarize, sweep, validation_split)

from conftest import ROOT

RUN_FILES = ["metrics.json", "model.pth", "parameters.json", "plot.png", "training_log.csv"]
LAUNCH = """
import json, sys
sys.path.insert(0, {root!r})
from bnbackdoor.campaigns.sweep import SweepOptions, sweep
res = sweep([sys.argv[1]], "cpu", save_path=sys.argv[2], data_root=sys.argv[3], models_root=sys.argv[4],
            opts=SweepOptions(max_parallel=2))
print(json.dumps(res))
"""


def tiny_grid(path, attack_id=9154):
    g = json.loads((ROOT / "experimentsettings" / "154.json").read_text())
    g.update(attack_id=attack_id, training_size=16, testing_size=8, max_epochs=1, batch_size_options=[16],
             loss_weight_options=[0.9, 0.5], learning_rate_options=[1e-3, 5e-4])
    path.write_text(json.dumps(g))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_data_root):
    """Two sweeps of one 4-point grid started at once into one save path (each at most 2 points in parallel)."""
    tmp = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    models = tmp / "models"
    save_checkpoint(models / "cifar10_resnet20" / "model_0.pth", build_model("cifar10_resnet20").eval(), {})
    grid = tiny_grid(tmp / "grid.json")
    (tmp / "launch.py").write_text(LAUNCH.format(root=str(ROOT)))
    cmd = [sys.executable, str(tmp / "launch.py"), str(grid), str(tmp / "out"), str(tiny_data_root), str(models)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    return {"tmp": tmp, "grid": grid, "models": models, "out": tmp / "out", "results": results,
            "stderr": [e for _, e in outs], "data": tiny_data_root}


def test_two_concurrent_sweeps_run_each_point_once_and_match_a_sequential_run(swept):
    out = swept["out"]
    statuses = sorted(r["status"] for res in swept["results"] for r in res)
    assert len(statuses) == 8 and "failed" not in statuses and statuses.count("ran") == 4
    # exactly one RUN marker per grid point over both sweeps' job logs
    logs = "".join(p.read_text() for p in (out / "sweep_logs" / "9154").glob("*_log.out"))
    runs = re.findall(r"\[sweep\] RUN (\S+) on cpu", logs)
    assert sorted(runs) == ["9154_0", "9154_1", "9154_2", "9154_3"]
    assert all("queued 0 running 0 finished 4 failed 0" in e for e in swept["stderr"])
    # every run folder complete and identical to a sequential in-process run with the same seed
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # what each of 2 parallel local jobs used
    try:
        for p in grid_of(swept["grid"]):
            folder = out / p.id
            assert sorted(f.name for f in folder.iterdir()) == RUN_FILES, p.id
            ref = run_attack(p, torch.device("cpu"), save_path=swept["tmp"] / "seq", data_root=swept["data"],
                             models_root=swept["models"], progress=False)
            got = json.loads((folder / "metrics.json").read_text())
            for k in ("clean_model", "manipulated_model", "parameters", "seed"):
                assert got[k] == ref[k], (p.id, k)
            assert (folder / "parameters.json").read_text() == (swept["tmp"] / "seq" / p.id / "parameters.json"
                                                                ).read_text(), p.id
            # the training log too, but for its one wall-clock column (fine-tuning seconds so far)
            assert _log_without_seconds(folder) == _log_without_seconds(swept["tmp"] / "seq" / p.id), p.id
            a = load_model(p.modeltype, path=folder / "model.pth").state_dict()
            b = load_model(p.modeltype, path=swept["tmp"] / "seq" / p.id / "model.pth").state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a), p.id
    finally:
        torch.set_num_threads(threads)


def _log_without_seconds(folder):
    with (folder / "training_log.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["seconds"]) >= 0 for r in rows)
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_a_failed_point_shows_its_log_and_the_others_go_on(swept, tmp_path, capfd):
    out = tmp_path / "out"
    shutil.copytree(swept["out"] / "9154_1", out / "9154_1")   # finished: skipped
    (out / "9154_0").mkdir()                                  # a finished run of something else: refused
    other = json.loads((swept["out"] / "9154_0" / "metrics.json").read_text())
    other["parameters"]["learning_rate"] = 0.1
    (out / "9154_0" / "metrics.json").write_text(json.dumps(other))
    res = sweep([str(swept["grid"])], "cpu", gs_ids="0-1", save_path=out, data_root=swept["data"],
                models_root=swept["models"], opts=SweepOptions(max_parallel=2))
    assert {r["gs_id"]: r["status"] for r in res} == {0: "failed", 1: "skipped"}
    assert "holds a finished run with other parameters or seed" in res[[r["gs_id"] for r in res].index(0)]["message"]
    err = capfd.readouterr().err
    assert re.search(r"9154_0: FAILED; last lines of \S+_0_log\.err:\n", err)
    assert "UserError: " in err and "finished 1 failed 1" in err


def test_summary_picks_the_best_point_on_held_out_training_images_and_promotes_it(swept, tmp_path):
    s = summarize(str(swept["grid"]), swept["out"], data_root=swept["data"], models_root=swept["models"],
                  val_size=32, progress=False)
    rows = s["rows"]
    assert [r["gs_id"] for r in rows] == [0, 1, 2, 3] and s["varying"] == ["loss_weight", "learning_rate"]
    assert [(r["loss_weight"], r["learning_rate"]) for r in rows] == [(0.9, 1e-3), (0.9, 5e-4), (0.5, 1e-3),
                                                                       (0.5, 5e-4)]
    assert s["notes"] == []  # 16 of 96 training images trained on: the validation images are held out
    points = grid_of(swept["grid"])
    x_val, y_val, held_out = validation_split(points[0], 0, 32, swept["data"])
    x_train, _ = load_split("cifar10", "train", size=16, seed=0, data_root=swept["data"])
    x_test, _ = load_split("cifar10", "test", data_root=swept["data"])
    assert held_out and len(y_val) == 32 and len(subset_indices(96, 16, 0)) == 16
    flat = x_val.flatten(1)
    assert not (flat[:, None] == x_train.flatten(1)[None]).all(-1).any()  # none of the training images
    assert not (flat[:, None] == x_test.flatten(1)[None]).all(-1).any()   # none of the test images
    clean = load_model("cifar10_resnet20", root=swept["models"])
    for p, r in zip(points, rows):
        model = load_model(p.modeltype, path=swept["out"] / p.id / "model.pth")
        val = evaluate_attack(model, clean, p, x_val, y_val, progress=False)
        assert (r["val_clean_accuracy"], r["val_attack_success_rate"], r["val_expl_dssim_to_target"]) == \
            (val["clean_accuracy"], val["attack_success_rate"], val["expl_dssim_to_target"])
        test = json.loads((swept["out"] / p.id / "metrics.json").read_text())["manipulated_model"]
        assert r["test_attack_success_rate"] == test["attack_success_rate"]
    # the documented rule, by hand
    clean_acc = s["clean_val_accuracy"][0]
    ok = [r for r in rows if r["val_clean_accuracy"] >= clean_acc - ACCURACY_TOLERANCE] or rows
    best = sorted(ok, key=lambda r: (-r["val_attack_success_rate"], r["val_expl_dssim_to_target"], r["gs_id"]))[0]
    assert s["best"] is best and [r["best"] for r in rows].count("*") == 1
    with open(s["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [t["id"] for t in table] == ["9154_0", "9154_1", "9154_2", "9154_3"]
    assert [t["best"] for t in table] == [r["best"] for r in rows]
    dst = promote("9154", best["id"], swept["out"], root=tmp_path)
    assert dst == tmp_path / "manipulated_models" / "9154"
    assert sorted(f.name for f in dst.iterdir()) == RUN_FILES
    for f in RUN_FILES:
        assert (dst / f).read_bytes() == (swept["out"] / best["id"] / f).read_bytes()
    with pytest.raises(UserError, match="exists; pass --force"):
        promote("9154", best["id"], swept["out"], root=tmp_path)


def test_choose_best_rule():
    rows = [dict(gs_id=i, _base="m", val_clean_accuracy=a, val_attack_success_rate=s, val_expl_dssim_to_target=d)
            for i, (a, s, d) in enumerate([(0.70, 1.0, 0.1), (0.89, 0.95, 0.2), (0.90, 0.95, 0.1),
                                           (0.91, 0.95, 0.1)])]
    assert choose_best(rows, {"m": 0.92}) == (rows[2], True)   # 0 fails the accuracy bar; 2 and 3 tie -> gs_id
    assert choose_best(rows, {"m": 0.99}) == (rows[0], False)  # nobody within 2 pp: the same order over all


def test_gs_ids_and_device_specs():
    assert parse_gs_ids("0-3,7, 5", 8) == [0, 1, 2, 3, 5, 7] and parse_gs_ids(None, 3) == [0, 1, 2]
    for spec, needle in [("0-12", "12 is out of range; the grid has 12 points (0-11)"), ("3-1", "cannot read '3-1'"),
                         ("a", "cannot read 'a'")]:
        with pytest.raises(UserError, match=re.escape(needle)):
            parse_gs_ids(spec, 12)
    assert parse_devices("cpu") == ["cpu"] and parse_devices("cuda:0,cuda:1", check=False) == ["cuda:0", "cuda:1"]
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        parse_devices("tpu", check=False)


FAKE_SBATCH = """#!/bin/sh
cp "$1" "$SBATCH_COPY"
echo "Submitted batch job 4242"
"""


def test_slurm_backend_submits_one_job_array(tmp_path):
    import submitit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # only looked for, never run here
    for f in ("sbatch", "srun"):
        (bin_dir / f).chmod(0o755)
    grid = tiny_grid(tmp_path / "grid.json")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "SBATCH_COPY": str(tmp_path / "job.sh")}
    r = subprocess.run([sys.executable, "scripts/sweep.py", str(grid), "cuda", "--backend", "slurm", "--gs-ids",
                        "0-2", "--max-parallel", "2", "--slurm-partition", "gpu", "--slurm-gpus-per-task", "1",
                        "--slurm-time", "180", "--slurm-cpus-per-task", "4", "--setup", "source venv/bin/activate",
                        "--no-wait", "--save_path", str(tmp_path / "out")],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "submitted job array 4242 (3 points, at most 2 at once)" in r.stderr
    assert "sweep: 3 submitted" in r.stdout
    script = (tmp_path / "job.sh").read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --time=180", "#SBATCH --cpus-per-task=4", "source venv/bin/activate",
                 f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}", "-m submitit.core._submit"):
        assert line in script.splitlines() or line in script, line
    logs = tmp_path / "out" / "sweep_logs" / "9154"
    tasks = sorted((submitit.core.utils.DelayedSubmission.load(p) for p in logs.glob("4242_*/*_submitted.pkl")),
                   key=lambda d: d.args[0].gs_id)
    assert [d.function for d in tasks] == [run_point] * 3
    assert [d.args[0] for d in tasks] == [
        Task(str(grid.resolve()), i, f"9154_{i}", "cuda", str((tmp_path / "out").resolve()),
             str((ROOT / "models").resolve()), None, 0) for i in range(3)]
