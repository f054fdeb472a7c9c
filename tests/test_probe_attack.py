"""scripts/probe_attack.py records every epoch as it goes, so a probe stopped early keeps its numbers and a rerun
resumes it; a finished probe is not rerun."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from conftest import ROOT

TINY = {"training_size": 8, "testing_size": 8, "batch_size": 4, "max_epochs": 2}


def _probe(cwd, data_root):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_attack.py"), "p", "--set", json.dumps(TINY),
                           "--models-root", str(ROOT / "models"), "--data-root", str(data_root)],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_probe_records_each_epoch_resumes_an_unfinished_one_and_keeps_a_finished_one(tmp_path, tiny_data_root):
    (tmp_path / "experimentsettings").mkdir()
    shutil.copy(ROOT / "experimentsettings" / "155.json", tmp_path / "experimentsettings")
    out = tmp_path / "output" / "probes" / "p.json"  # the default --save-dir (the shipped probes: results/probes)
    r = _probe(tmp_path, tiny_data_root)
    assert r.returncode == 0, r.stderr
    full = json.loads(out.read_text())
    assert full["finished"] is True and [e["epoch"] for e in full["epochs"]] == [1, 2]
    # as if stopped after epoch 1 was recorded (the run's resume state holds both epochs): the rerun resumes,
    # runs nothing more and writes the whole record
    out.write_text(json.dumps({**full, "finished": False, "epochs": full["epochs"][:1]}))
    r = _probe(tmp_path, tiny_data_root)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    again = json.loads(out.read_text())
    assert again["finished"] is True and again["epochs"] == full["epochs"]
    r = _probe(tmp_path, tiny_data_root)
    assert r.returncode == 0 and "exists; delete it to rerun" in r.stderr
