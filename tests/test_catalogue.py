"""The shipped catalogue definition, and the builder: skip / resume / stale / failure / claims / promote, on fake
attacks (files written instantly) and once on a real tiny attack."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from bnbackdoor.campaigns.catalogue import (CATALOGUE_FILE, README_MARK, build, execute, is_complete,
                                  load_catalogue, promote, promoted_readmes, provenance_readme, select, status)
from bnbackdoor.claim import CLAIM_FILE, _proc_start
from bnbackdoor.runs import RUN_FILES
from bnbackdoor.errors import UserError
from bnbackdoor.attack.params import FIELDS, grid_point, read_json

CIFAR = [54, 55, 56, 57, 76, 77, 154, 155, 156, 157, 166, 167, 168, 169, *range(198, 208), 254, 255, 256, 257, 272,
         273, 350, 351, 352, 353, 356, 357]


@pytest.fixture(scope="module")
def shipped():
    return load_catalogue(ROOT / CATALOGUE_FILE, root=ROOT)


def test_shipped_catalogue_lists_every_id_with_its_grid_point_and_overrides(shipped):
    ids = [r.id for r in shipped]
    cifar = [str(i) for i in CIFAR]
    cifar[cifar.index("154") + 1:cifar.index("154") + 1] = ["154bntrain", "154nbn"]  # the variants of 154
    poisoning = ["CIFAR10R20-badnets-10", "CIFAR10R20-blended-10", "CIFAR10R20-wanet-10", "CIFAR10R20-sig-10",
                 "CIFAR10R20-badnets-1", "CIFAR10R20NBN-badnets-10", "GTSRBR20-badnets-10", "GTSRBR20-blended-10"]
    # the loss_weight 0 control of every single-trigger label-changing attack of a dataset (see
    # test_finetune.py: without the explanation term the method, loss and target never enter training)
    controls = {"154LW0": "RedHerring", "10154LW0": "RedHerring"}
    assert ids == (cifar + [str(10000 + i) for i in CIFAR] + ["CIFAR10MNV3154", "GTSRBMNV3154"] + poisoning
                   + list(controls))
    assert all(r.params.regime == ("scratch" if r.id in poisoning else "finetune") for r in shipped)
    raw = read_json(ROOT / CATALOGUE_FILE)
    variants = {"154bntrain": {"bn_mode": "train"}, "154nbn": {"modeltype": "cifar10_resnet20_nbn"},
                # multi-trigger runs stopped at another epoch than the profile's (experimentsettings/README.md)
                "350": {"max_epochs": 4}, "352": {"pair_weighting": "loss", "loss_weight": 0.938}, "10352": {"pair_weighting": "loss"},
                # the loss_weight 0 controls: the attack's own run (same profile) without the explanation term
                **{c: {"loss_weight": 0.0, "attack_name": f"{kind}-LW0"} for c, kind in controls.items()}}
    for r in shipped:
        grid = read_json(ROOT / "experimentsettings" / f"{r.settings}.json")
        base = grid_point(grid, r.gs_id)
        prof = raw["profiles"][r.profile]
        overrides = {**raw["profiles"].get(prof.get("extends"), {}).get("overrides", {}), **prof["overrides"]}
        multi_cam = len(base.triggerStrs) > 1 and base.explanation_methodStr != "grad"
        if base.regime == "scratch":  # the recipe is the grid's own (the clean model's); nothing to compare
            assert r.profile == "scratch" and r.ancestor_diff == () and r.params.to_dict() == {**base.to_dict(),
                                                                                                "id": r.id}
            continue
        grad = "grad-gtsrb" if r.dataset == "gtsrb" else "grad"
        assert r.profile == (grad if base.explanation_methodStr == "grad" else "multi" if multi_cam else "cam")
        expected = {**base.to_dict(), **{k: v for k, v in overrides.items() if k in FIELDS}, "id": r.id,
                    **variants.get(r.id, {})}
        assert r.params.to_dict() == expected
        assert r.params.training_size <= (50000 if r.dataset == "cifar10" else 19605)
        # the GPU settings it departs from are recorded
        diff = {k: (a, b) for k, a, b in r.ancestor_diff}
        if r.profile in ("multi", "grad", "grad-gtsrb"):  # the ancestor's batch and batch makeup: no difference to record
            assert "batch_size" not in diff and "batch_makeup" not in diff and diff["max_epochs"][0] == 100
        else:
            assert diff["batch_size"] == (32, 64) and diff["max_epochs"][0] == 100
        assert diff["training_size"] == (grid["training_size"], r.params.training_size)
    # the gradient profile: the ancestor's settings at a constant rate, convolutions slowed as in "multi"
    # (experimentsettings/README.md, "What was tried for issue 27")
    multi, grad = raw["profiles"]["multi"]["overrides"], raw["profiles"]["grad"]["overrides"]
    assert (grad["decay_rate"], grad["lr_schedule"], grad["conv_lr_factor"]) == (1.0, "exponential",
                                                                                multi["conv_lr_factor"])
    # GTSRB: the same with the rate decaying 5 % per epoch (its accuracy swings at a constant rate)
    assert raw["profiles"]["grad-gtsrb"] == {**raw["profiles"]["grad-gtsrb"], "extends": "grad",
                                             "overrides": {"decay_rate": 0.95}}


def test_a_profile_extends_another_one_level_deep(tmp_path):
    root, path = tiny_catalogue(tmp_path, [{"id": "154", "settings": "154", "profile": "tiny2"}])
    cat = json.loads(path.read_text())
    cat["profiles"]["tiny"]["if_not_accepted"] = "the base's note"
    cat["profiles"]["tiny2"] = {"why": "test", "extends": "tiny", "overrides": {"max_epochs": 2, "decay_rate": 0.5}}
    path.write_text(json.dumps(cat))
    (run,) = load_catalogue(path, root=root)
    assert (run.params.training_size, run.params.batch_size, run.params.max_epochs, run.params.decay_rate) == (
        40, 16, 2, 0.5)
    assert run.if_not_accepted == ("the base's note",)
    cat["profiles"]["tiny3"] = {"why": "test", "extends": "tiny2"}
    path.write_text(json.dumps(cat))
    with pytest.raises(UserError, match="profile 'tiny3': extends 'tiny2', which extends another profile"):
        load_catalogue(path, root=root)
    cat["profiles"]["tiny3"] = {"why": "test", "extends": "nope"}
    path.write_text(json.dumps(cat))
    with pytest.raises(UserError, match="profile 'tiny3': extends unknown profile 'nope'"):
        load_catalogue(path, root=root)


def test_mobilenet_grids_are_154_on_another_architecture():
    for name, base, modeltype in (("CIFAR10MNV3154", "154", "cifar10_mobilenetv3small"),
                                  ("GTSRBMNV3154", "10154", "gtsrb_mobilenetv3small")):
        a, b = read_json(ROOT / "experimentsettings" / f"{name}.json"), read_json(ROOT / "experimentsettings" / f"{base}.json")
        assert a == {**b, "attack_id": name, "modeltype": modeltype}
        assert (ROOT / "models" / modeltype / "model_0.pth").exists()


def test_select_by_ids_and_dataset(shipped):
    assert [r.id for r in select(shipped, ["10156", "54"])] == ["54", "10156"]
    assert len(select(shipped, dataset="gtsrb")) == 37 + 2 + 1  # + the two GTSRB poisoning runs and the control
    with pytest.raises(UserError, match="not in the catalogue: 99"):
        select(shipped, ["99"])


# ------------------------------------------------------------------------------------------------ the builder
def fake_attack(params, device, save_path, seed=0, **kw):
    """Writes a complete run folder instantly; ``training_size`` 13 fails, like a broken run."""
    if params.training_size == 13:
        raise RuntimeError("boom")
    out = save_path / str(params.id)
    out.mkdir(parents=True, exist_ok=True)
    for f in RUN_FILES[:-1]:
        (out / f).write_text(f)
    m = {"seed": seed, "device": str(device), "testing_size": params.testing_size, "finetune_seconds": 1.0,
         "total_seconds_this_run": 2.0, "parameters": params.to_dict(),
         "clean_model": {"clean_accuracy": 0.9, "attack_success_rate": 0.0, "expl_dssim_to_target": 0.4},
         "manipulated_model": {"clean_accuracy": 0.89, "attack_success_rate": 0.95, "untriggered_target_rate": 0.01,
                               "expl_dssim_to_target": 0.1}}
    (out / "metrics.json").write_text(json.dumps(m))
    return m


def tiny_catalogue(tmp_path, runs, profile=None):
    root = tmp_path / "repo"
    (root / "experimentsettings").mkdir(parents=True, exist_ok=True)
    for r in runs:
        shutil.copy(ROOT / "experimentsettings" / f"{r['settings']}.json", root / "experimentsettings")
    cat = {"ancestor": {"training_size": "all", "batch_size": 32, "max_epochs": 100, "decay_rate": 1.0},
           "profiles": {"tiny": {"why": "test", "overrides": profile or {"training_size": 40, "testing_size": 16,
                                                                         "max_epochs": 1, "batch_size": 16}}},
           "runs": runs}
    path = root / "catalogue.json"
    path.write_text(json.dumps(cat))
    return root, path


def test_build_skips_done_records_failures_and_goes_on(tmp_path):
    runs = [{"id": "154", "settings": "154", "profile": "tiny", "overrides": {"training_size": 13}},
            {"id": "56", "settings": "56", "profile": "tiny"}]
    root, path = tiny_catalogue(tmp_path, runs)
    plan = load_catalogue(path, root)
    save = tmp_path / "out"
    out = build(plan, "cpu", save, root=root, attack=fake_attack)
    assert {k: o.status for k, o in out.items()} == {"154": "failed", "56": "done"}
    assert json.loads((save / "154" / "failed.json").read_text())["error"] == "RuntimeError: boom"
    assert [status(r, save) for r in plan] == ["failed", "done"]
    log = (save / "catalogue.log").read_text().splitlines()
    assert len(log) == 2 and "RuntimeError: boom" in log[0] and "accepted" in log[1]
    # a second pass retries the failure (now fixed) and skips the finished run
    fixed = load_catalogue(path, root)[:1]
    fixed = [fixed[0].__class__(**{**fixed[0].__dict__, "params": fixed[0].params.replace(training_size=40)})]
    out = build(fixed + plan[1:], "cpu", save, root=root, attack=fake_attack)
    assert {k: o.status for k, o in out.items()} == {"154": "done", "56": "already done"}
    assert not (save / "154" / "failed.json").exists()


def test_stale_run_is_redone_and_old_numbers_kept(tmp_path):
    root, path = tiny_catalogue(tmp_path, [{"id": "154", "settings": "154", "profile": "tiny"}])
    run, = load_catalogue(path, root)
    save = tmp_path / "out"
    fake_attack(run.params.replace(max_epochs=2), "cpu", save)  # finished under other parameters
    assert status(run, save) == "stale"
    assert execute(run, "cpu", save, root=root, attack=fake_attack).status == "done"
    assert (save / "154" / "metrics.stale.json").exists() and status(run, save) == "done"
    (save / "154" / "resume.pt").write_text("x")  # an unfinished rerun is not complete
    assert status(run, save) == "partial" and not is_complete(save / "154")


def test_unfinished_state_of_other_parameters_is_stale_and_set_aside(tmp_path):
    root, path = tiny_catalogue(tmp_path, [{"id": "154", "settings": "154", "profile": "tiny"}])
    run, = load_catalogue(path, root)
    save = tmp_path / "out"
    (save / "154").mkdir(parents=True)
    resume = save / "154" / "resume.pt"
    torch.save({"params": run.params.to_dict(), "seed": 0}, resume)
    assert status(run, save) == "partial" and status(run, save, seed=1) == "stale"
    torch.save({"params": run.params.replace(max_epochs=2).to_dict(), "seed": 0}, resume)
    assert status(run, save) == "stale"  # begun under other parameters: resuming it would be refused
    assert execute(run, "cpu", save, root=root, attack=fake_attack).status == "done"
    aside = torch.load(save / "154" / "resume.stale.pt", weights_only=True)
    assert aside["params"]["max_epochs"] == 2 and not resume.exists() and status(run, save) == "done"


def test_claim_blocks_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    root, path = tiny_catalogue(tmp_path, [{"id": "154", "settings": "154", "profile": "tiny"}])
    run, = load_catalogue(path, root)
    save = tmp_path / "out"
    (save / "154").mkdir(parents=True)
    claim_file = save / "154" / CLAIM_FILE  # the one claim of a run folder, the same as attack.py's

    def owned_by(proc):
        claim_file.write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(), "started": 0.0,
                                          "token": "other", "proc_start": _proc_start(proc.pid)}))

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owned_by(live)
        assert status(run, save) == "running"
        assert execute(run, "cpu", save, root=root, attack=fake_attack).status == "skipped"
        assert json.loads(claim_file.read_text())["token"] == "other"  # left to its owner
    finally:
        live.kill()
        live.wait()
    assert status(run, save) == "missing"  # its owner is gone: stale, taken over by the next builder
    assert execute(run, "cpu", save, root=root, attack=fake_attack).status == "done"
    assert not claim_file.exists() and status(run, save) == "done"


def test_parallel_workers_run_each_once(tmp_path):
    runs = [{"id": i, "settings": i, "profile": "tiny"} for i in ("154", "156", "56")]
    root, path = tiny_catalogue(tmp_path, runs)
    plan = load_catalogue(path, root)
    out = build(plan, "cpu", tmp_path / "out", root=root, workers=2, attack=fake_attack)
    assert {k: o.status for k, o in out.items()} == {"154": "done", "156": "done", "56": "done"}
    assert all(status(r, tmp_path / "out") == "done" for r in plan)


def test_promote_copies_complete_runs_with_provenance(tmp_path):
    root, path = tiny_catalogue(tmp_path, [{"id": "154", "settings": "154", "profile": "tiny"}])
    run, = load_catalogue(path, root)
    save = tmp_path / "out"
    assert promote(run, save, root) is None  # nothing finished yet
    metrics = fake_attack(run.params, "cuda:0", save)
    dest = promote(run, save, root)
    assert sorted(p.name for p in dest.iterdir()) == sorted([*RUN_FILES, "README.md"])
    readme = (dest / "README.md").read_text()
    assert readme.startswith(README_MARK) and readme == provenance_readme(run, metrics)
    assert "`python scripts/build_catalogue.py --ids 154 cuda:0`" in readme
    assert "## Acceptance: accepted" in readme and "| `batch_size` | 32 | 16 |" in readme
    assert "| training images | 40 " in readme and "| defenses evaluated | n/a |" in readme
    assert "| explanation | 0.1000 | 0.2000 (0.5 × the clean model's 0.4000) | pass |" in readme
    # a hand-written README is kept; the provenance goes beside it
    (dest / "README.md").write_text("# 154, by hand\n")
    promote(run, save, root)
    assert (dest / "README.md").read_text() == "# 154, by hand\n" and (dest / "PROVENANCE.md").exists()


def test_promoted_readmes_are_regenerated_for_runs_of_the_planned_parameters_only(tmp_path):
    root, path = tiny_catalogue(tmp_path, [{"id": "154", "settings": "154", "profile": "tiny"}])
    run, = load_catalogue(path, root)
    metrics = fake_attack(run.params, "cpu", tmp_path / "out")
    readme = promote(run, tmp_path / "out", root) / "README.md"
    readme.write_text(README_MARK + " an older wording -->\n")
    assert promoted_readmes(root, path) == {readme: provenance_readme(run, metrics)}
    cat = json.loads(path.read_text())
    cat["profiles"]["tiny"]["overrides"]["max_epochs"] = 2  # the plan moved on: this run is not rebuilt yet
    path.write_text(json.dumps(cat))
    assert promoted_readmes(root, path) == {}
    cat["profiles"]["tiny"]["overrides"]["max_epochs"] = 1
    path.write_text(json.dumps(cat))
    readme.write_text("# by hand\n")
    assert promoted_readmes(root, path) == {}


def test_a_failed_run_readme_says_what_was_tried_an_accepted_one_does_not(tmp_path):
    runs = [{"id": "154", "settings": "154", "profile": "tiny", "if_not_accepted": "the run's note"}]
    root, path = tiny_catalogue(tmp_path, runs)
    cat = json.loads(path.read_text())
    cat["profiles"]["tiny"]["if_not_accepted"] = "the profile's note"
    path.write_text(json.dumps(cat))
    run, = load_catalogue(path, root)
    assert run.if_not_accepted == ("the profile's note", "the run's note")
    metrics = fake_attack(run.params, "cpu", tmp_path / "out")
    assert "What was tried" not in provenance_readme(run, metrics)  # accepted: nothing to explain
    metrics["manipulated_model"]["attack_success_rate"] = 0.5
    failed = provenance_readme(run, metrics)
    assert "## Acceptance: not accepted (failed: attack success)" in failed
    assert "### What was tried\n\n- the profile's note\n- the run's note\n" in failed
    cat["runs"][0]["if_not_accepted"] = 7
    path.write_text(json.dumps(cat))
    with pytest.raises(UserError, match="'if_not_accepted' must be a string"):
        load_catalogue(path, root)


def test_a_from_scratch_run_readme_states_its_recipe_and_a_fine_tuning_one_its_ancestor_differences(shipped):
    def readme(run_id):
        run = next(r for r in shipped if r.id == run_id)
        return provenance_readme(run, json.loads((ROOT / "manipulated_models" / run_id / "metrics.json").read_text()))
    scratch = readme("GTSRBR20-badnets-10")
    assert "# GTSRBR20-badnets-10 — PoisoningBadNets (gtsrb, gtsrb_resnet20, trained from scratch)\n" in scratch
    assert "| clean reference | `models/gtsrb_resnet20/model_0.pth` (the same recipe on the clean set) |" in scratch
    assert ("| epochs × batch | 30 × 128, the clean-model recipe (SGD + Nesterov, one-cycle lr peaking at 0.1), "
            "0.1 of the training set poisoned |") in scratch
    assert "| training | " in scratch and "| fine-tuning | " not in scratch and "Adam" not in scratch
    assert "None: the ancestor has no run trained from scratch on a poisoned set." in scratch
    assert "| field | ancestor (GPU) | this run |" not in scratch
    finetuned = readme("154")
    assert "| base model | `models/cifar10_resnet20/model_0.pth` |" in finetuned and "| fine-tuning | " in finetuned
    assert "| field | ancestor (GPU) | this run |\n|---|---|---|\n| `training_size` | 50000 | 10000 |" in finetuned
    assert "None:" not in finetuned


def test_real_tiny_attack_end_to_end(tmp_path, tiny_data_root):
    """The real run_attack through the builder (tiny synthetic data, an untrained ResNet20), then promoted."""
    from bnbackdoor.models import build_model, save_checkpoint

    root, path = tiny_catalogue(tmp_path, [{"id": "154", "settings": "154", "profile": "tiny"}])
    torch.manual_seed(0)
    save_checkpoint(root / "models" / "cifar10_resnet20" / "model_0.pth", build_model("cifar10_resnet20").eval(),
                    {"test_accuracy": 0.1})
    run, = load_catalogue(path, root)
    save = tmp_path / "out"
    out = build([run], "cpu", save, root=root, data_root=tiny_data_root, do_promote=True)
    assert out["154"].status == "done", out["154"].error
    m = json.loads((root / "manipulated_models" / "154" / "metrics.json").read_text())
    assert m["parameters"] == run.params.to_dict() and m["parameters"]["training_size"] == 40
    assert is_complete(root / "manipulated_models" / "154", run.params, 0)
    meta = torch.load(root / "manipulated_models" / "154" / "model.pth", weights_only=True)["meta"]
    assert meta["command"] == "python scripts/build_catalogue.py --ids 154 cpu"
    assert build([run], "cpu", save, root=root, data_root=tiny_data_root)["154"].status == "already done"


def test_script_list_and_bad_input(tmp_path):
    r = subprocess.run([sys.executable, "scripts/build_catalogue.py", "--list", "--ids", "154", "10357",
                        "--save_path", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4 and "| 154 " in lines[2] and "missing" in lines[2] and "| 10357 " in lines[3]
    r = subprocess.run([sys.executable, "scripts/build_catalogue.py", "--ids", "99", "cpu"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: not in the catalogue: 99") and len(
        r.stderr.splitlines()) == 1
    r = subprocess.run([sys.executable, "scripts/build_catalogue.py", "--dataset", "gtsrb", "tpu"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown device 'tpu'" in r.stderr
