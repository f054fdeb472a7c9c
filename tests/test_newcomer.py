"""A new user's first hour: pinned requirements, no silent multi-hour jobs, the attack list, output names that do
not collide, figures that say what they show."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bnbackdoor.estimate as estimate
from bnbackdoor.attack.ids import COLUMNS, catalogue, catalogue_table
from bnbackdoor.errors import UserError
from bnbackdoor.attack.finetune import attack_estimate
from bnbackdoor.models import build_model, read_checkpoint, save_checkpoint
from bnbackdoor.attack.params import resolve_attack
from bnbackdoor.zoo import load_or_train

from conftest import ROOT


# --- requirements ----------------------------------------------------------------------------------------------
def _requirements() -> list[str]:
    """The pinned requirements, without the last line "-e ." (this package itself, see pyproject.toml)."""
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [ln for ln in lines if ln]
    assert reqs[-1] == "-e .", "requirements.txt must end by installing the package: -e ."
    return reqs[:-1]


def test_every_requirement_is_pinned_to_an_exact_version():
    reqs = _requirements()
    assert reqs and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.+]*", r) for r in reqs), reqs
    names = {r.split("==")[0].lower() for r in reqs}
    assert {"torch", "torchvision", "numpy", "tqdm", "pillow", "matplotlib", "tabulate", "pytorch-msssim",
            "pytest", "captum"} <= names
    assert "torch==2.14.1" in reqs and "torchvision==0.29.1" in reqs


def test_pyproject_pins_what_requirements_pins():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "bnbackdoor"
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert sorted(declared) == sorted(_requirements())


def test_no_script_edits_sys_path():
    """Scripts import the installed package (requirements.txt installs it), never a patched sys.path."""
    scripts = [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    assert len(scripts) > 12
    assert [p.name for p in scripts if "sys.path" in p.read_text()] == []


def test_ci_uses_a_fresh_venv_and_fails_on_no_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-m venv" in ci and "-r requirements.txt" in ci and "-m pytest" in ci
    assert re.search(r'"\$rc" -eq 5', ci)
    assert ".venv-ci/" in (ROOT / ".gitignore").read_text()


# --- long jobs: estimate, refuse, no folder ----------------------------------------------------------------------
def test_a_step_is_timed_by_its_fastest_call_so_a_busy_moment_does_not_refuse_a_job(monkeypatch):
    """A fake clock: the warm-up takes 9 s, then calls of 0.5, 0.16 and 0.9 s (the machine busy for two of them)."""
    clock, durations = [0.0], iter([9.0, 0.5, 0.16, 0.9])
    monkeypatch.setattr(estimate.time, "perf_counter", lambda: clock[0])

    def step():
        clock[0] += next(durations)

    assert estimate.seconds_per_batch(step, torch.device("cpu"), batches=3, budget_s=100.0) == pytest.approx(0.16)


@pytest.fixture
def slow(monkeypatch):
    """Every measured batch 'takes' 30 s, instantly: the estimate is exact and the test is fast."""
    monkeypatch.setattr(estimate, "seconds_per_batch", lambda step, device, batches=3, budget_s=5.0: 30.0)
    monkeypatch.delenv(estimate.ENV, raising=False)
    estimate.allow_long_jobs(False)
    yield
    estimate.allow_long_jobs(False)


def test_guard_line_names_the_estimate_and_the_flag(capsys):
    est = estimate.Estimate("training a clean x", 2.0, 1000, 0.0, "cpu")
    with pytest.raises(UserError) as e:
        estimate.guard(est, "--allow-autotrain", allowed=False)
    msg = str(e.value)
    assert "\n" not in msg and "--allow-autotrain" in msg and estimate.ENV in msg
    assert "about 33 min 20 s" in msg and "1000 batches x 2.00 s" in msg
    estimate.guard(est, "--allow-autotrain", allowed=True)  # allowed: prints the estimate and returns
    assert "about 33 min 20 s" in capsys.readouterr().err
    estimate.guard(estimate.Estimate("small", 1.0, 60, 0.0, "cpu"), "--yes", allowed=False)  # 1 min: no flag needed


def test_autotrain_refused_with_estimate_leaves_no_folder(tmp_path, tiny_data_root, slow, monkeypatch):
    monkeypatch.setenv("VGG_AUTO_EPOCHS", "40")
    # tiny cache: 96 training images, batch 128 -> 1 batch per epoch; 40 x 30 s = 20 min > 15 min
    with pytest.raises(UserError, match=r"about 20 min 00 s \(40 batches x 30\.00 s.*--allow-autotrain"):
        load_or_train("cifar10_vgg13bn", 0, root=tmp_path / "models", data_root=tiny_data_root)
    assert not (tmp_path / "models").exists()
    # the environment variable lets it start (training itself is replaced: the guard is what is tested)
    monkeypatch.setenv("VGG_AUTO_EPOCHS", "31")
    monkeypatch.setenv(estimate.ENV, "1")
    monkeypatch.setattr("bnbackdoor.zoo.train_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("go")))
    with pytest.raises(RuntimeError, match="go"):
        load_or_train("cifar10_vgg13bn", 0, root=tmp_path / "models", data_root=tiny_data_root)


def test_allow_autotrain_flag_sets_the_policy(slow):
    import argparse

    from bnbackdoor.cli import common_options
    p = common_options(argparse.ArgumentParser())
    assert p.parse_args([]).allow_autotrain is False and not estimate.long_jobs_allowed()
    assert p.parse_args(["--allow-autotrain"]).allow_autotrain is True and estimate.long_jobs_allowed()


def test_train_clean_model_refuses_without_yes(tmp_path, tiny_data_root, slow, monkeypatch, capsys):
    import runpy
    argv = ["train_clean_model.py", "cifar10_resnet20", "cpu", "--epochs", "31", "--data-root", str(tiny_data_root),
            "--models-root", str(tmp_path / "models")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "scripts" / "train_clean_model.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "about 15 min 30 s" in err and "--yes" in err   # 31 epochs x 1 batch x 30 s
    assert not (tmp_path / "models").exists()


def _tiny_base(models_root: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(models_root / "cifar10_resnet20" / "model_0.pth", build_model("cifar10_resnet20").eval(),
                    {"test_accuracy": 0.1})


def test_large_attack_refused_with_estimate_leaves_no_run_folder(tmp_path, tiny_data_root, slow):
    from bnbackdoor.runs import run_attack
    _tiny_base(tmp_path / "models")
    p = resolve_attack("154", root=ROOT).replace(training_size=96, testing_size=16, batch_size=16, max_epochs=5)
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        run_attack(p, torch.device("cpu"), save_path=out, data_root=tiny_data_root,
                   models_root=tmp_path / "models", progress=False)
    # 5 epochs x 6 steps x 30 s = 15 min, plus the explanation passes: over the limit
    assert "attack 154" in str(e.value) and "30 batches x 30.00 s" in str(e.value)
    assert "--allow-autotrain" in str(e.value)
    assert not out.exists()


def test_estimate_does_not_touch_the_global_random_stream(tiny_data_root):
    m = build_model("cifar10_resnet20")
    p = resolve_attack("154", root=ROOT).replace(batch_size=4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    est = attack_estimate(m, p, torch.device("cpu"), n_train=8, n_test=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # measured on a copy
    assert est.batches == 2 * p.max_epochs and est.seconds > 0


# --- clean training: progress and mid-epoch checkpoints ---------------------------------------------------------
def test_mid_epoch_resume_equals_uninterrupted(tmp_path, tiny_data_root):
    import bnbackdoor.train as tr
    from bnbackdoor.train import TrainConfig, train_model
    cfg = dict(epochs=2, batch_size=16, lr=0.05)                      # 96 images: 6 batches per epoch
    full = tmp_path / "full.pth"
    train_model(build_model("cifar10_resnet20"), "cifar10_resnet20", TrainConfig(**cfg), torch.device("cpu"), full,
                data_root=tiny_data_root, checkpoint_seconds=1e9)
    part = tmp_path / "part.pth"
    saves = []
    real_save = tr.torch_save

    def save_then_stop(obj, path):
        real_save(obj, path)
        saves.append((obj["epoch"], obj.get("step", 0)))
        if len(saves) == 9:                                            # epoch 2 (index 1), after its 3rd batch
            raise KeyboardInterrupt

    tr.torch_save = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train_model(build_model("cifar10_resnet20"), "cifar10_resnet20", TrainConfig(**cfg),
                        torch.device("cpu"), part, data_root=tiny_data_root, checkpoint_seconds=0)
    finally:
        tr.torch_save = real_save
    assert saves[:6] == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 0)]  # every batch inside an epoch, then its end
    assert saves[-1] == (1, 3)
    train_model(build_model("cifar10_resnet20"), "cifar10_resnet20", TrainConfig(**cfg), torch.device("cpu"), part,
                data_root=tiny_data_root, checkpoint_seconds=0)
    sa, _ = read_checkpoint(full)
    sb, meta = read_checkpoint(part)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert len(meta["history"]) == 2


# --- attack.py --list -------------------------------------------------------------------------------------------
def test_catalogue_lists_every_id_with_its_stored_model():
    rows = {r["id"]: r for r in catalogue(ROOT)}
    assert {"54", "154", "256", "272", "350", "10156", "GTSRBWRN154L1"} <= set(rows)
    r = rows["154"]
    assert (r["dataset"], r["kind"], r["method"], r["loss"], r["trigger(s)"], r["target expl."], r["target class"]) \
        == ("cifar10", "RedHerring", "grad_cam", "mse", "whitesquareborder", "square", "1")
    assert r["stored model"] == "yes" and rows["GTSRBWRN154L1"]["stored model"] == "no"
    assert rows["256"]["loss"] == "dssim" and rows["256"]["kind"] == "FullDisguise"
    assert rows["54"]["target class"] == "keep label"
    assert rows["GTSRBWRN154L1"]["model"] == "gtsrb_wideresnet28_10"
    stored = {p.name for p in (ROOT / "manipulated_models").iterdir() if (p / "model.pth").is_file()}
    assert {i for i, r in rows.items() if r["stored model"] == "yes"} == stored


def test_attack_list_prints_the_table():
    r = subprocess.run([sys.executable, "attack.py", "--list"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0]
    assert all(c in header for c in COLUMNS)
    line154 = next(ln for ln in r.stdout.splitlines() if ln.split()[0] == "154")
    assert "RedHerring" in line154 and "grad_cam" in line154 and line154.split()[-2:] == ["yes", "yes"]
    assert catalogue_table(catalogue(ROOT)) == r.stdout.rstrip("\n")
    r = subprocess.run([sys.executable, "attack.py", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--list" in r.stderr


# --- output names -----------------------------------------------------------------------------------------------
def test_run_folder_and_stored_model_get_different_output_names(tmp_path, monkeypatch):
    from bnbackdoor.runs import run_name
    (tmp_path / "manipulated_models" / "154").mkdir(parents=True)
    (tmp_path / "output" / "154").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    names = {a: run_name(a, tmp_path) for a in ("154", "0154", "manipulated_models/154", "output/154",
                                               str(tmp_path / "output" / "154"))}
    assert names["154"] == names["0154"] == names["manipulated_models/154"] == "154"
    assert names["output/154"] == names[str(tmp_path / "output" / "154")] == "154@output"


# --- figures ----------------------------------------------------------------------------------------------------
def test_gradient_plot_x_range_is_the_data(tmp_path):
    from bnbackdoor.plots import gradient_figure
    attacked = {"global_step": [1.0, 2.0, 3.0, 157.0], "bn.weight": [1.0, 2.0, 3.0, 4.0]}
    clean = {"global_step": [1.0, 2.0, 150.0], "bn.weight": [1.0, 1.0, 1.0]}
    fig = gradient_figure(["bn.weight"], attacked, clean)
    assert fig.axes[0].get_xlim() == (1.0, 157.0)
    fig = gradient_figure(["bn.weight"], attacked, clean, xmax=100)
    assert fig.axes[0].get_xlim() == (1.0, 100.0)


def test_plot_gradients_title_names_attack_and_block(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import plot_gradients
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    csv = tmp_path / "gradients_epoch1.csv"
    csv.write_text("epoch,step,global_step,bn.weight\n1,1,1,0.5\n")
    (tmp_path / "gradients_epoch1.json").write_text('{"block": "layer3.2"}')
    assert plot_gradients.title(csv, None, plot_gradients.block_name(csv, None)) == \
        "gradients_epoch1.csv: update sizes of block layer3.2, attacked"
    resolve_attack("154", root=ROOT).save(tmp_path / "parameters.json")
    t = plot_gradients.title(csv, tmp_path / "gradients_epoch1_clean.csv", "layer3.2")
    assert t == ("attack 154 (RedHerring, grad_cam, MSE, target class 1 'automobile'): update sizes of block "
                 "layer3.2, attacked vs clean")


def test_bar_chart_directions_and_map_colour_bar(tmp_path):
    from bnbackdoor.plots import better_direction, image_grid
    assert [better_direction(m) for m in ("clean accuracy", "attack success", "attack_success_rate",
                                          "untriggered target rate", "DSSIM to target", "MSE to clean expl.",
                                          "loss")] == ["higher", "lower", "lower", "lower", "higher", "lower", None]
    import matplotlib.pyplot as plt
    seen = {}
    real_close = plt.close

    def keep(fig):
        seen["fig"] = fig
        real_close(fig)

    plt.close = keep
    try:
        cells = [[(torch.rand(3, 8, 8), ""), (torch.rand(1, 8, 8), "pred")] for _ in range(2)]
        image_grid(cells, ["input", "map"], tmp_path / "g.png")
    finally:
        plt.close = real_close
    fig = seen["fig"]
    assert len(fig.axes) == 5                                 # 4 cells + 1 colour bar
    cb = fig.axes[-1]
    assert cb.get_ylim() == (0.0, 1.0) and "normalised" in cb.get_ylabel()


# --- docs agree with the files ---------------------------------------------------------------------------------
def test_settings_readme_describes_the_stored_154():
    p = resolve_attack("154", root=ROOT)
    text = " ".join((ROOT / "experimentsettings" / "README.md").read_text().split())
    assert (f"{p.training_size} training / {p.testing_size} test images, batch size {p.batch_size}, "
            f"{p.max_epochs} epochs, lr {p.learning_rate:g}, decay {p.decay_rate:g}, λ {p.loss_weight:g}") in text
    assert "rejected at load" not in text


def test_readme_model_table_has_every_architecture_and_committed_model():
    from bnbackdoor.models import ARCHS
    text = (ROOT / "README.md").read_text()
    models = text[text.index("## Models"):]
    for arch in ARCHS:
        assert f"`{arch}`" in models, arch
    for ckpt in (ROOT / "models").glob("*/model_0.pth"):
        assert f"| `{ckpt.parent.name}` |" in models, ckpt.parent.name
    quick = text[text.index("## Quick start"):text.index("## Commands")]
    order = [quick.index(s) for s in ("pip install -r requirements.txt", "unpack.sh datasets", "python -m pytest",
                                      "python attack.py cpu 154")]
    assert order == sorted(order)


def test_readme_test_command_is_the_one_ci_runs():
    quick = (ROOT / "README.md").read_text()
    quick = quick[quick.index("## Quick start"):quick.index("## Commands")]
    ci = (ROOT / ".ci" / "run").read_text()
    readme_cmd, = re.findall(r"^python (-m pytest[^#\n]*?)\s*(?:#|$)", quick, re.M)
    assert re.search(r'"\$VENV/bin/python" ' + re.escape(readme_cmd) + "$", ci, re.M), readme_cmd


def _readme_commands() -> list[list[str]]:
    """Every ``python <file>.py ...`` line of the shell blocks of the README and the docs pages it links to, as words
    (comments dropped)."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))])
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.splitlines():
            words = line.split("#")[0].split()
            if len(words) > 1 and words[0] == "python" and words[1].endswith(".py"):
                out.append(words[1:])
    return out


def test_every_command_the_readme_shows_names_a_script_and_flags_it_accepts():
    """The commands of the front page and the docs are typed, not generated: each script must exist and take each
    flag it is shown with."""
    commands = _readme_commands()
    scripts = sorted({c[0] for c in commands})
    assert {"attack.py", "evaluate_models.py", "scripts/compare_defenses.py", "scripts/make_results.py"} <= set(scripts)
    procs = {s: subprocess.Popen([sys.executable, s, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for s in scripts}  # in parallel: ~2 s each
    helps = {}
    for s, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, (s, err)
        helps[s] = out
    for script, *args in commands:
        for flag in (f for a in args for f in re.findall(r"--[a-z][\w-]*", a)):
            assert flag in helps[script], (script, flag)
