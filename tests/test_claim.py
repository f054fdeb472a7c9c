"""The run-folder claim: one writer per run folder across real processes; stale claims are taken over and resume."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import torch

from bnbackdoor.claim import CLAIM_FILE, ClaimedElsewhere, claim_run
from bnbackdoor.errors import UserError
from bnbackdoor.runs import run_attack
from bnbackdoor.models import build_model, load_model, save_checkpoint
from bnbackdoor.attack.params import resolve_attack

from conftest import ROOT

# A child that waits for <dir>/go, claims <dir>/run, reports, and holds the claim until <dir>/release exists.
HOLDER = """
import sys, time, pathlib
sys.path.insert(0, {root!r})
from bnbackdoor.claim import claim_run
from bnbackdoor.errors import run_cli
d = pathlib.Path(sys.argv[1])
(d / f"ready{{sys.argv[2]}}").touch()
while not (d / "go").exists():
    time.sleep(0.01)
def main():
    with claim_run(d / "run", command="holder " + sys.argv[2]):
        (d / f"won{{sys.argv[2]}}").touch()
        while not (d / "release").exists():
            time.sleep(0.01)
run_cli(main)
"""


def _wait_for(cond, timeout=120.0):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.02)


def _holders(tmp_path, n):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(root=str(ROOT)))
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(i)], stderr=subprocess.PIPE,
                              text=True) for i in range(n)]
    _wait_for(lambda: all((tmp_path / f"ready{i}").exists() for i in range(n)))
    return procs


def test_concurrent_processes_one_wins_the_others_exit_2_naming_it(tmp_path):
    procs = _holders(tmp_path, 3)
    (tmp_path / "go").touch()  # all three race for the claim at once
    _wait_for(lambda: sum(p.poll() is not None for p in procs) == 2)
    winners = [i for i in range(3) if (tmp_path / f"won{i}").exists()]
    assert len(winners) == 1
    owner = json.loads((tmp_path / "run" / CLAIM_FILE).read_text())
    assert owner["pid"] == procs[winners[0]].pid and owner["host"] == socket.gethostname()
    assert owner["command"] == f"holder {winners[0]}"
    for i, p in enumerate(procs):
        if i != winners[0]:
            err = p.stderr.read()
            assert p.wait() == 2
            assert err.count("\n") == 1 and "Traceback" not in err
            assert f"is being written by pid {owner['pid']} on {owner['host']} since " in err
            assert "wait for it or use another --save_path" in err
    (tmp_path / "release").touch()
    assert procs[winners[0]].wait(60) == 0
    assert not (tmp_path / "run").exists()  # released, and the empty folder it created is gone


def test_attack_py_refuses_a_folder_that_a_live_process_writes(tmp_path):
    procs = _holders(tmp_path, 1)
    (tmp_path / "go").touch()
    _wait_for(lambda: (tmp_path / "won0").exists())
    p = resolve_attack("154", root=ROOT).replace(id="run", training_size=16, testing_size=8)
    p.save(tmp_path / "run.json")
    r = subprocess.run([sys.executable, "attack.py", "cpu", str(tmp_path / "run.json"), "--save_path", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    (tmp_path / "release").touch()
    assert procs[0].wait(60) == 0
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and f"is being written by pid {procs[0].pid} on " in r.stderr


def test_claim_release_nesting_and_foreign_hosts(tmp_path):
    folder = tmp_path / "a" / "run"
    with pytest.raises(RuntimeError):
        with claim_run(folder, command="x") as info:
            assert json.loads((folder / CLAIM_FILE).read_text()) == info
            with claim_run(folder):  # the owner itself: shares the claim
                pass
            assert (folder / CLAIM_FILE).exists()
            raise RuntimeError
    assert not folder.exists()  # released on the exception; the empty folder it made is removed
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("x")
    foreign = {"pid": 1, "host": "elsewhere-node", "started": 0}
    (folder / CLAIM_FILE).write_text(json.dumps(foreign))
    with pytest.raises(ClaimedElsewhere, match=r"pid 1 on elsewhere-node since .*delete .*\.claim"):
        with claim_run(folder):
            pass
    assert json.loads((folder / CLAIM_FILE).read_text()) == foreign and (folder / "keep.txt").exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_stale_claim_on_this_host_is_reported_and_taken_over(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / CLAIM_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": 0}))
    with claim_run(folder) as info:
        assert json.loads((folder / CLAIM_FILE).read_text())["token"] == info["token"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "taking over the stale claim" in err and "is gone; resuming" in err
    assert not (folder / CLAIM_FILE).exists() and folder.exists()  # it existed before: kept


# ---------------------------------------------------------------------------------------------- run_attack
KILLED_AFTER_EPOCH_1 = """
import os, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
import bnbackdoor.attack.finetune as F
from bnbackdoor.runs import run_attack
from bnbackdoor.attack.params import load_attack_file
save = F.torch_save
def save_then_die(obj, path):
    save(obj, path)
    if obj.get("epoch") == 1:
        os._exit(9)  # killed hard: no cleanup, the claim stays behind
F.torch_save = save_then_die
run_attack(load_attack_file(sys.argv[1]), torch.device("cpu"), save_path=sys.argv[2], data_root=sys.argv[3],
           models_root=sys.argv[4], progress=False)
"""


@pytest.fixture
def tiny(tmp_path, tiny_data_root):
    torch.manual_seed(0)
    models_root = tmp_path / "models"
    save_checkpoint(models_root / "cifar10_resnet20" / "model_0.pth", build_model("cifar10_resnet20").eval(), {})
    p = resolve_attack("154", root=ROOT).replace(id="tiny", training_size=16, testing_size=8, batch_size=16,
                                                 max_epochs=2)
    return p, models_root


def test_killed_attack_leaves_a_stale_claim_and_the_rerun_resumes_bit_identically(tmp_path, tiny_data_root, tiny,
                                                                                   capfd):
    p, models_root = tiny
    p.save(tmp_path / "tiny.json")
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AFTER_EPOCH_1.format(root=str(ROOT)))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "tiny.json"), str(out), str(tiny_data_root),
                        str(models_root)], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    stale = json.loads((out / "tiny" / CLAIM_FILE).read_text())
    assert (out / "tiny" / "resume.pt").exists() and not (out / "tiny" / "metrics.json").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capfd.readouterr()
        kw = dict(data_root=tiny_data_root, models_root=models_root, progress=False)
        resumed = run_attack(p, torch.device("cpu"), save_path=out, **kw)
        err = capfd.readouterr().err
        reference = run_attack(p, torch.device("cpu"), save_path=tmp_path / "ref", **kw)
    finally:
        torch.set_num_threads(threads)
    assert f"taking over the stale claim on {out / 'tiny'}: pid {stale['pid']} on {stale['host']}" in err
    assert "resuming" in err and "after epoch 1/2" in err
    assert not (out / "tiny" / CLAIM_FILE).exists() and not (out / "tiny" / "resume.pt").exists()
    a = load_model(p.modeltype, path=out / "tiny" / "model.pth")
    b = load_model(p.modeltype, path=tmp_path / "ref" / "tiny" / "model.pth")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert resumed["manipulated_model"] == reference["manipulated_model"]

    # a finished run: same parameters -> skipped; other parameters, other seed or --grad-layer -> refused
    assert run_attack(p, torch.device("cpu"), save_path=out, **kw) == resumed
    for kwargs, needle in [(dict(params=p.replace(learning_rate=0.5)), "finished run with other parameters or seed"),
                           (dict(seed=1), "finished run with other parameters or seed"),
                           (dict(grad_layer=-1), "--grad-layer would record nothing; pass --force")]:
        call = {"params": p, "device": torch.device("cpu"), "save_path": out, **kw, **kwargs}
        with pytest.raises(UserError, match=needle):
            run_attack(**call)
    assert json.loads((out / "tiny" / "metrics.json").read_text()) == resumed  # untouched
    assert not (out / "tiny" / CLAIM_FILE).exists()
