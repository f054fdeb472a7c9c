"""Issue 26, the cases a table row cannot hold: base-model provenance end to end, a full disk during an attack and an
evaluation, stale temp files, a FIFO as attack id, environment knobs, a failed first download, the unfinished-run
command, unreadable checkpoints. Tiny synthetic data; attacks of 8 images."""
from __future__ import annotations

import errno
import json
import os
import pickle
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import torch

import bnbackdoor.attack.regimes as regimes
import bnbackdoor.runs as experiment
import bnbackdoor.fileio as fileio
from bnbackdoor.cli import MAX_SEED
from bnbackdoor.data import build_cache
from bnbackdoor.errors import UserError
from bnbackdoor.evaluation.common import ROW_MANIPULATED
from bnbackdoor.evaluation.stored import evaluate_stored_model
from bnbackdoor.runs import load_run, run_attack
from bnbackdoor.models import build_model, knobs, load_model, read_checkpoint, save_checkpoint, weights_sha256
from bnbackdoor.attack.params import resolve_attack

from conftest import ROOT

_REAL_COMMIT = fileio._commit


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory with models/cifar10_resnet20/model_0.pth and a tiny attack's params.json (the time
    estimate, which measures real steps, is switched off)."""
    monkeypatch.setattr(regimes, "finetune_estimate", lambda *a, **kw: None)
    monkeypatch.setattr(experiment, "guard", lambda *a, **kw: None)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "models" / "cifar10_resnet20" / "model_0.pth", build_model("cifar10_resnet20").eval(),
                    {})
    p = resolve_attack("154", root=ROOT).replace(id="tiny", training_size=8, testing_size=4, batch_size=4,
                                                 max_epochs=1, loss_weight=0.0)
    p.save(tmp_path / "params.json")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _main(program: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", [program, *args])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / program), run_name="__main__")
    return e.value.code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


# --- base-model provenance ------------------------------------------------------------------------------------

def test_weights_checksum_names_the_weights_not_the_file(tmp_path):
    torch.manual_seed(0)
    m = build_model("cifar10_resnet20").eval()
    sha = weights_sha256(m)
    assert len(sha) == 64 and sha == weights_sha256(m.state_dict())
    save_checkpoint(tmp_path / "a.pth", m, {"anything": 1})
    torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}, tmp_path / "b.pth")
    assert weights_sha256(load_model("cifar10_resnet20", path=tmp_path / "a.pth")) == sha
    assert weights_sha256(load_model("cifar10_resnet20", path=tmp_path / "b.pth")) == sha  # DataParallel layout
    with torch.no_grad():
        m.bn1.running_var[0] += 1e-3
    assert weights_sha256(m) != sha


def test_a_run_records_its_base_and_evaluation_checks_it(work, tiny_data_root, monkeypatch, capsys):
    """Run (at the largest seed), evaluate (verified), swap the base (refused), name it (verified again, same
    numbers), and an unrecorded base: one notice line and verified false in the JSON."""
    p = resolve_attack("params.json")
    base_path = work / "models" / "cifar10_resnet20" / "model_0.pth"
    m = run_attack(p, torch.device("cpu"), save_path=work / "runs", data_root=tiny_data_root, seed=MAX_SEED,
                   models_root=work / "models", progress=False, defenses={})
    base = load_model("cifar10_resnet20", path=base_path)
    assert m["base_model"] == {"path": "models/cifar10_resnet20/model_0.pth", "sha256": weights_sha256(base)}
    run = work / "runs" / "tiny"
    assert json.loads((run / "metrics.json").read_text())["base_model"]["sha256"] == weights_sha256(base)
    assert read_checkpoint(run / "model.pth")[1]["base_model_sha256"] == weights_sha256(base)

    kw = dict(testing_size=4, batch_size=4, seed=MAX_SEED, models_root=work / "models", data_root=tiny_data_root,
              progress=False)
    ev = evaluate_stored_model(str(run), "cpu", save_path=work / "ev1", **kw)
    assert ev.base_model == {"path": "models/cifar10_resnet20/model_0.pth", "sha256": weights_sha256(base),
                             "recorded_sha256": weights_sha256(base), "verified": True, "source": "model_id"}
    assert ev.rows[ROW_MANIPULATED]["clean_accuracy"] == m["manipulated_model"]["clean_accuracy"]
    saved = json.loads(next((work / "ev1").rglob("evaluation.json")).read_text())
    assert saved["base_model"]["verified"] is True

    # another clean model where the base was: the comparison is refused, naming both checksums
    os.replace(base_path, work / "the_base.pth")
    torch.manual_seed(1)
    save_checkpoint(base_path, build_model("cifar10_resnet20").eval(), {})
    with pytest.raises(UserError, match=rf"was fine-tuned from a base model with weights sha256 "
                                        rf"{weights_sha256(base)[:12]}\.\.\., but .*model_0.pth has "
                                        rf"{weights_sha256(load_model('cifar10_resnet20', path=base_path))[:12]}"):
        evaluate_stored_model(str(run), "cpu", save_path=work / "ev2", **kw)
    assert not (work / "ev2").exists()

    # naming the real base: verified, and the very numbers of the first evaluation
    ev3 = evaluate_stored_model(str(run), "cpu", save_path=work / "ev3", clean_model=work / "the_base.pth", **kw)
    assert ev3.base_model["verified"] is True and ev3.base_model["source"] == "--clean-model"
    assert {k: {c: v for c, v in r.items() if c != "seconds"} for k, r in ev3.rows.items()} == \
        {k: {c: v for c, v in r.items() if c != "seconds"} for k, r in ev.rows.items()}

    # a run that records no base (made before provenance): one notice line on stderr, "verified": false
    state, meta = read_checkpoint(run / "model.pth")
    meta.pop("base_model_sha256")
    torch.save({"state_dict": state, "meta": meta}, run / "model.pth")
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["base_model"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    code, err = _main("evaluate_models.py", [str(run), "cpu", "--testing-size", "4", "--batchsize", "4",
                                             "--seed", str(MAX_SEED), "--clean-model", str(work / "the_base.pth"),
                                             "--data-root", str(tiny_data_root), "--save_path", "ev4"],
                      monkeypatch, capsys)
    assert code == 0, err
    notices = [line for line in err.splitlines() if line.startswith("notice: ")]
    assert len(notices) == 1 and "records no base model" in notices[0] and "unverified" in notices[0], err
    saved = json.loads(next((work / "ev4").rglob("evaluation.json")).read_text())
    assert saved["base_model"]["verified"] is False and saved["base_model"]["recorded_sha256"] is None
    assert saved["base_model"]["sha256"] == weights_sha256(base)


def test_every_shipped_run_records_the_base_it_is_compared_with():
    shas = {}
    folders = sorted(p.parent for p in (ROOT / "manipulated_models").glob("*/metrics.json"))
    assert len(folders) >= 70
    for folder in folders:
        recorded = json.loads((folder / "metrics.json").read_text())["base_model"]
        params = resolve_attack(str(folder / "parameters.json"))
        assert recorded["path"] == f"models/{params.canonical_modeltype}/model_{params.model_id}.pth", folder
        if recorded["path"] not in shas:
            shas[recorded["path"]] = weights_sha256(load_model(params.modeltype, path=ROOT / recorded["path"]))
        assert recorded["sha256"] == shas[recorded["path"]], folder


def test_a_resumed_run_records_the_base_it_started_from(work, tiny_data_root, monkeypatch):
    """resume.pt records the base's checksum; resuming from another base is refused (the run would record the new
    base for weights fine-tuned from the old one); with the base back, the run finishes and records it."""
    import bnbackdoor.attack.finetune as ft
    p = resolve_attack("params.json").replace(max_epochs=2)
    kw = dict(save_path=work / "runs", data_root=tiny_data_root, models_root=work / "models", progress=False,
              defenses={})
    real_step, calls = ft.attack_step, []

    def interrupted(*a, **k):  # 2 steps an epoch: killed in epoch 2
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real_step(*a, **k)
    monkeypatch.setattr(ft, "attack_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_attack(p, torch.device("cpu"), **kw)
    monkeypatch.setattr(ft, "attack_step", real_step)
    run, base_path = work / "runs" / "tiny", work / "models" / "cifar10_resnet20" / "model_0.pth"
    base_sha = weights_sha256(load_model("cifar10_resnet20", path=base_path))
    assert torch.load(run / "resume.pt", weights_only=True)["base_model_sha256"] == base_sha

    os.replace(base_path, work / "the_base.pth")
    torch.manual_seed(1)
    save_checkpoint(base_path, build_model("cifar10_resnet20").eval(), {})
    before = _files(work)
    with pytest.raises(UserError, match=rf"resume.pt was fine-tuned from a base model with weights sha256 "
                                        rf"{base_sha[:12]}\.\.\., but the clean model now has"):
        run_attack(p, torch.device("cpu"), **kw)
    assert _files(work) == before  # the interrupted run stays resumable

    os.replace(work / "the_base.pth", base_path)
    m = run_attack(p, torch.device("cpu"), **kw)
    assert m["base_model"]["sha256"] == base_sha and not (run / "resume.pt").exists()
    assert read_checkpoint(run / "model.pth")[1]["base_model_sha256"] == base_sha


def test_explanations_take_a_run_folder_and_the_model_beside_a_parameters_json(work, tiny_data_root):
    from bnbackdoor.evaluation.explanations import generate_explanations
    p = resolve_attack("params.json")
    run_attack(p, torch.device("cpu"), save_path=work / "runs", data_root=tiny_data_root, models_root=work / "models",
               progress=False, defenses={})
    run = work / "runs" / "tiny"
    for given in (run, run / "parameters.json"):
        rep = generate_explanations(str(given), "cpu", n_images=4, batch_size=4, models_root=work / "models",
                                    data_root=tiny_data_root, save_path=work / "ex", progress=False,
                                    force=True)  # both name the same output: the second replaces the first
        assert rep.notice is None and ROW_MANIPULATED in rep.rows and rep.base_model["verified"] is True


@pytest.mark.parametrize("listing", [False, True])
def test_a_damaged_metrics_json_is_not_taken_for_an_unfinished_catalogue_run(tmp_path, monkeypatch, capsys, listing):
    """The builder (and --list) name the damaged run folder to rebuild instead of redoing the run and putting its
    numbers aside as stale."""
    from bnbackdoor.runs import RUN_FILES
    run = tmp_path / "cat" / "54"
    run.mkdir(parents=True)
    if not listing:  # complete otherwise
        for name in RUN_FILES:
            (run / name).write_text("")
    (run / "metrics.json").write_bytes(b'{"seed": 0, ' if not listing else b'{"attack_name": "Caf\xe9"}')
    before = _files(tmp_path)
    monkeypatch.chdir(ROOT)  # the catalogue's settings files are relative to the repository
    args = (["--list"] if listing else ["cpu"]) + ["--ids", "54", "--save_path", str(tmp_path / "cat")]
    code, err = _main("scripts/build_catalogue.py", args, monkeypatch, capsys)
    line = _one_error_line(err)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    cause = ("is not UTF-8 text (byte 0xe9 at offset 20)" if listing else
             ": malformed JSON at line 1, column 13")
    assert f"{run / 'metrics.json'}{' ' if listing else ''}{cause}" in line, err
    assert f"it is damaged; rebuild the run folder {run}" in line, err
    assert _files(tmp_path) == before  # not moved aside as metrics.stale.json, no claim, no log


def test_an_evaluation_above_the_test_split_records_the_images_it_used_with_a_notice(work, tiny_data_root,
                                                                                      monkeypatch, capsys):
    run_attack(resolve_attack("params.json"), torch.device("cpu"), save_path=work / "runs",
               data_root=tiny_data_root, models_root=work / "models", progress=False, defenses={})
    code, err = _main("evaluate_models.py", ["runs/tiny", "cpu", "--testing-size", "100", "--batchsize", "16",
                                             "--data-root", str(tiny_data_root), "--save_path", "ev"],
                      monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err, err
    notices = [line for line in err.splitlines() if line.startswith("notice: ")]
    assert notices == ["notice: --testing-size 100 is above the cifar10 test split (48 images); evaluating on all "
                       "48 (the JSON records \"images\": 48, \"requested\": 100)"], err
    saved = json.loads(next((work / "ev").rglob("evaluation.json")).read_text())
    assert saved["test"]["images"] == 48 and saved["test"]["requested"] == 100


# --- a full disk ------------------------------------------------------------------------------------------------

def _full_disk_at(monkeypatch, name: str):
    real = fileio._commit

    def commit(tmp, path):
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        real(tmp, path)
    monkeypatch.setattr(fileio, "_commit", commit)


def test_a_full_disk_at_the_first_state_leaves_nothing(work, tiny_data_root, monkeypatch, capsys):
    _full_disk_at(monkeypatch, "resume.pt")
    before = _files(work)
    code, err = _main("attack.py", ["cpu", "params.json", "--save_path", "runs/new", "--data-root",
                                    str(tiny_data_root)], monkeypatch, capsys)
    line = _one_error_line(err)
    assert code == 2 and line.startswith("error: cannot write runs/new/tiny/resume.pt: No space left on device; "
                                         "free some space or write elsewhere (--save_path)"), err
    assert _files(work) == before  # no run folder, no --save_path folder, no temp file


def test_a_full_disk_at_the_model_keeps_the_run_resumable(work, tiny_data_root, monkeypatch, capsys):
    _full_disk_at(monkeypatch, "model.pth")
    code, err = _main("attack.py", ["cpu", "params.json", "--save_path", "runs", "--data-root",
                                    str(tiny_data_root)], monkeypatch, capsys)
    assert code == 2 and "cannot write runs/tiny/model.pth: No space left on device" in _one_error_line(err)
    assert sorted(f.name for f in (work / "runs" / "tiny").iterdir()) == ["parameters.json", "resume.pt"]
    monkeypatch.setattr(fileio, "_commit", _REAL_COMMIT)  # space again: the same command finishes the run
    code, err = _main("attack.py", ["cpu", "params.json", "--save_path", "runs", "--data-root",
                                    str(tiny_data_root)], monkeypatch, capsys)
    assert code == 0, err
    assert (work / "runs" / "tiny" / "metrics.json").is_file() and not (work / "runs" / "tiny" / "resume.pt").exists()



def test_a_full_disk_during_an_evaluation_leaves_no_folder(work, tiny_data_root, monkeypatch, capsys):
    run_attack(resolve_attack("params.json"), torch.device("cpu"), save_path=work / "runs",
               data_root=tiny_data_root, models_root=work / "models", progress=False, defenses={})
    _full_disk_at(monkeypatch, "evaluation.json")  # the figure was written: it must go too
    before = _files(work)
    code, err = _main("evaluate_models.py", ["runs/tiny", "cpu", "--testing-size", "4", "--data-root",
                                             str(tiny_data_root), "--save_path", "out/eval"], monkeypatch, capsys)
    line = _one_error_line(err)
    assert code == 2 and "cannot write out/eval/tiny@runs/evaluation.json: No space left on device" in line, err
    assert _files(work) == before


@pytest.fixture
def small_disk(tmp_path_factory):
    """A real 1 MiB file system (tmpfs), where this machine lets the tests mount one (root); else skipped."""
    import subprocess
    disk = tmp_path_factory.mktemp("disk")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small file system here ({r.stderr.decode().strip()[:80]})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> list[str]:
    """Fill ``disk`` up to ``leave`` free bytes; returns the listing with the filler."""
    st = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return _files(disk)


def test_a_real_full_disk_during_an_attack_is_one_line_and_leaves_nothing(work, small_disk, tiny_data_root,
                                                                           monkeypatch, capsys):
    """Not a patched writer: the kernel's ENOSPC in the middle of writing resume.pt (parameters.json fitted)."""
    before, on_disk = _files(work), _fill(small_disk, 64 * 1024)
    code, err = _main("attack.py", ["cpu", "params.json", "--save_path", str(small_disk / "runs"), "--data-root",
                                    str(tiny_data_root)], monkeypatch, capsys)
    line = _one_error_line(err)
    assert code == 2 and line.startswith(f"error: cannot write {small_disk}/runs/tiny/resume.pt: No space left on "
                                         "device; free some space"), err
    assert _files(small_disk) == on_disk and _files(work) == before


def test_a_real_full_disk_during_an_evaluation_is_one_line_and_leaves_no_folder(work, small_disk, tiny_data_root,
                                                                                monkeypatch, capsys):
    run_attack(resolve_attack("params.json"), torch.device("cpu"), save_path=work / "runs",
               data_root=tiny_data_root, models_root=work / "models", progress=False, defenses={})
    before, on_disk = _files(work), _fill(small_disk, 4 * 1024)  # the figure does not fit
    code, err = _main("evaluate_models.py", ["runs/tiny", "cpu", "--testing-size", "4", "--data-root",
                                             str(tiny_data_root), "--save_path", str(small_disk / "ev")],
                      monkeypatch, capsys)
    line = _one_error_line(err)
    assert code == 2 and f"cannot write {small_disk}/ev/tiny@runs/evaluation.png: No space left on device" in line, err
    assert _files(small_disk) == on_disk and _files(work) == before


@pytest.mark.parametrize("err_no,fix", [(errno.EROFS, "the file system is read-only"),
                                        (errno.EACCES, "give a folder you may write to"),
                                        (errno.ENAMETOOLONG, "use a shorter name")])
def test_write_errors_are_one_line_naming_path_and_cause(tmp_path, monkeypatch, err_no, fix):
    monkeypatch.setattr(fileio, "_commit", lambda tmp, path: (_ for _ in ()).throw(OSError(err_no, os.strerror(err_no))))
    with pytest.raises(UserError) as e:
        fileio.write_json(tmp_path / "sub" / "x.json", {"a": 1})
    assert str(e.value).startswith(f"cannot write {tmp_path / 'sub' / 'x.json'}: {os.strerror(err_no)}; {fix}")
    assert list((tmp_path / "sub").iterdir()) == []  # no temp file


def test_undo_writes_removes_new_files_and_folders_only(tmp_path):
    (tmp_path / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with fileio.undo_writes():
            fileio.write_text(tmp_path / "old.txt", "new")
            fileio.write_text(tmp_path / "a" / "b" / "new.txt", "x")
            raise RuntimeError("later failure")
    assert _files(tmp_path) == ["old.txt"] and (tmp_path / "old.txt").read_text() == "new"


# --- stale temp files, FIFOs, knobs, downloads ----------------------------------------------------------------

def test_stale_temp_files_of_the_run_folder_are_swept_on_resume(work, tiny_data_root):
    run = work / "runs" / "tiny"
    run.mkdir(parents=True)
    for name in (".plot.png.abc123.tmp", ".model.pth.x.tmp"):
        (run / name).write_bytes(b"half a file")
    (run / "notes.tmp").write_text("the user's own file")  # not one of ours: stays
    run_attack(resolve_attack("params.json"), torch.device("cpu"), save_path=work / "runs",
               data_root=tiny_data_root, models_root=work / "models", progress=False, defenses={})
    names = sorted(f.name for f in run.iterdir())
    assert names == ["metrics.json", "model.pth", "notes.tmp", "parameters.json", "plot.png", "training_log.csv"]


def test_a_fifo_as_attack_id_says_what_it_is(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"attack id '.*pipe' is a FIFO \(named pipe\); give an attack id such as"):
        resolve_attack(str(fifo), root=tmp_path)


@pytest.mark.parametrize("name,value,needle", [
    ("MNV3_AUTO_EPOCHS", "-1", "MNV3_AUTO_EPOCHS=-1 is out of range; allowed: an integer >= 1 (unset it for the "
                               "default 60)"),
    ("WRN_AUTO_LR", "0", "WRN_AUTO_LR=0 is out of range; allowed: a number > 0"),
    ("VGG_AUTO_LR", "nan", "VGG_AUTO_LR=nan is out of range"),
    ("VIT_AUTO_BS", "0", "VIT_AUTO_BS=0 is out of range"),
    ("WRN_DROPRATE", "1.5", "WRN_DROPRATE=1.5 is out of range; allowed: a number in [0, 1)"),
    ("WRN_DEPTH", "27", "WRN_DEPTH=27 is not a WideResNet depth"),
    ("MNV3_AUTO_BS", "lots", "MNV3_AUTO_BS='lots' is not an integer"),
])
def test_environment_knobs_are_range_checked_where_read(name, value, needle):
    with pytest.raises(UserError) as e:
        knobs({name: value})
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert knobs({})["mobilenetv3small"]["train"]["epochs"] == 60


def test_a_knob_out_of_range_is_one_line_from_the_command(work, tiny_data_root, monkeypatch, capsys):
    monkeypatch.setenv("MNV3_AUTO_EPOCHS", "-1")
    before = _files(work)
    code, err = _main("attack.py", ["cpu", "params.json", "--data-root", str(tiny_data_root)], monkeypatch, capsys)
    assert code == 2 and "MNV3_AUTO_EPOCHS=-1 is out of range" in _one_error_line(err)
    assert _files(work) == before


def test_a_failed_first_download_leaves_the_data_root_as_it_was(tmp_path):
    def offline(root: Path):
        root.mkdir(parents=True)
        (root / "cifar-10-python.tar.gz.part").write_bytes(b"half")
        raise ConnectionError("no network")
    with pytest.raises(UserError, match="the download failed"):
        build_cache("cifar10", tmp_path, source=offline)
    assert list(tmp_path.iterdir()) == []


# --- messages ------------------------------------------------------------------------------------------------

def test_the_unfinished_run_message_proposes_a_command_that_resumes_that_folder(work, tiny_data_root, monkeypatch):
    p = resolve_attack("params.json")
    run = work / "elsewhere" / "tiny"
    p.save(run / "parameters.json")
    torch.save({"seed": 7, "epoch": 1}, run / "resume.pt")  # what read_state needs of it for the message
    with pytest.raises(UserError) as e:
        load_run(str(run), models_root=work / "models")
    msg = str(e.value)
    assert f"{run} is an unfinished run (interrupted after epoch 1, no model.pth); finish it with" in msg
    command = shlex.split(msg.split("finish it with '", 1)[1].rstrip("'"))
    assert command[:2] == ["python", "attack.py"] and "--seed" in command and "7" in command
    seen = {}
    import attack  # noqa: F401  (the script as a module: its main is what the command runs)
    monkeypatch.setattr(attack, "run_attack", lambda params, device, **kw: seen.update(params=params, **kw) or
                        {"clean_model": {}, "manipulated_model": {}})
    monkeypatch.setattr(sys, "argv", command[1:])
    assert attack.main() == 0
    assert experiment.run_dir(seen["save_path"], seen["params"]).resolve() == run.resolve() and seen["seed"] == 7


def test_an_unreadable_checkpoint_says_why_in_whole_words(tmp_path, capsys):
    path = tmp_path / "model.pth"
    with open(path, "wb") as f:
        pickle.dump({"weights": [1, 2, 3]}, f, protocol=4)
    with pytest.raises(UserError) as e:
        read_checkpoint(path)
    msg = str(e.value)
    assert "holds Python objects besides tensors" in msg and "delete it so that the next run trains a new one" in msg
    assert "\n" not in msg and capsys.readouterr().err == ""  # torch's pickle-protocol warning is not printed
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"cannot be loaded \(it is empty\)"):
        read_checkpoint(path)


def test_huge_strings_are_refused_quickly_in_one_short_line():
    import time
    from bnbackdoor.attack.params import AttackParams
    good = resolve_attack("154", root=ROOT).to_dict()
    t0 = time.time()
    for bad in ({**good, "attack_name": "x" * 50_000_000}, {**good, "y" * 1_000_000: 1},
                {**good, "id": "z" * 5_000_000}):
        with pytest.raises(UserError) as e:
            AttackParams.from_dict(bad, "big.json")
        assert len(str(e.value)) < 700 and "\n" not in str(e.value)
    assert time.time() - t0 < 5
