"""Issue 47, hardening third round: data loss (default outputs, --merge/--force, write phases as one unit, truthful
interrupt messages), option and flag validation, the catalogue on load, records that say what was done, bounds,
schema-checked readers of every kind of stored JSON, paths relative to the repository.

House style of tests/test_bad_inputs.py: a bad input is exit 2, one stderr line naming the problem, no traceback,
nothing written or changed. Tiny synthetic data (tests/conftest.py), random untrained models.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

import bnbackdoor.cli as cli
import bnbackdoor.fileio as fileio
from bnbackdoor.attack.params import resolve_attack
from bnbackdoor.models import build_model, save_checkpoint

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPTS = ["attack.py", "evaluate_models.py", "evaluate_attack_defense_metrics.py", "run_generate_explanations.py",
           *(f"scripts/{p.name}" for p in sorted((ROOT / "scripts").glob("*.py")))]


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[rel + "/"] = "dir"
        for f in filenames:
            out[os.path.join(rel, f)] = hashlib.sha1(Path(dirpath, f).read_bytes()).hexdigest()
    return out


def _run(program: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", [program, *map(str, args)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / program), run_name="__main__")
    return e.value.code, capsys.readouterr().err


def _one_error(code: int, err: str, needle: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], err
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch, tiny_data_root):
    """A repository-like working folder: a clean base model and a stored attack ``154`` (random weights, 8 test
    images), a shipped results/ folder; the current folder."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "models" / "cifar10_resnet20" / "model_0.pth", build_model("cifar10_resnet20").eval(),
                    {})
    save_checkpoint(tmp_path / "manipulated_models" / "154" / "model.pth", build_model("cifar10_resnet20").eval(), {})
    resolve_attack("154", root=ROOT).replace(testing_size=8, id="154").save(
        tmp_path / "manipulated_models" / "154" / "parameters.json")
    (tmp_path / "results").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _tiny(tiny_data_root) -> list[str]:
    return ["--data-root", str(tiny_data_root), "--testing-size", "8"]



# --- 0. data lost ---------------------------------------------------------------------------------------------

def test_compare_detectors_writes_under_output_and_never_replaces_a_result_without_merge_or_force(
        work, tiny_data_root, monkeypatch, capsys):
    shipped = work / "results" / "detectors_154.json"
    shipped.write_text(json.dumps({"rows": [], "note": "shipped"}))
    args = ["154", "cpu", "--detectors", "strip", "--clean-images", "40", *_tiny(tiny_data_root)]
    code, err = _run("scripts/compare_detectors.py", args, monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(shipped.read_text())["note"] == "shipped"            # the shipped file is untouched
    first = json.loads((work / "output" / "detectors_154.json").read_text())
    assert [r["detector"] for r in first["rows"]] == ["strip", "strip"]
    before = _snapshot(work)
    # again: refused, nothing changed
    _one_error(*_run("scripts/compare_detectors.py", args, monkeypatch, capsys),
               "output/detectors_154.json already holds a detector comparison; pass --merge")
    assert _snapshot(work) == before
    # into results/ (where the shipped file is): refused as well
    _one_error(*_run("scripts/compare_detectors.py", [*args, "--save_path", "results"], monkeypatch, capsys),
               "results/detectors_154.json already holds")
    assert _snapshot(work) == before
    _one_error(*_run("scripts/compare_detectors.py", [*args, "--merge", "--force"], monkeypatch, capsys),
               "give one of them")
    # --merge keeps the rows this run does not recompute
    stored = json.loads((work / "output" / "detectors_154.json").read_text())
    stored["rows"].append({**stored["rows"][0], "detector": "other", "fpr": 0.5})
    (work / "output" / "detectors_154.json").write_text(json.dumps(stored))
    code, err = _run("scripts/compare_detectors.py", [*args, "--merge"], monkeypatch, capsys)
    assert code == 0, err
    merged = json.loads((work / "output" / "detectors_154.json").read_text())
    assert [r["detector"] for r in merged["rows"]] == ["strip", "strip", "other"]
    code, err = _run("scripts/compare_detectors.py", [*args, "--force"], monkeypatch, capsys)
    assert code == 0, err
    assert [r["detector"] for r in json.loads((work / "output" / "detectors_154.json").read_text())["rows"]] == [
        "strip", "strip"]


def test_no_study_writes_inside_results_or_manipulated_models_by_default(monkeypatch):
    """Every script's output options (--save_path, --save, --output, --json ...) and every study function's
    ``save_path`` default lie outside results/ and manipulated_models/."""
    import bnbackdoor.evaluation as ev
    import bnbackdoor.campaigns.sweep as sweep

    class Built(Exception):
        pass

    parsers = {}

    def grab(self, *a, **kw):
        parsers[self.prog] = self
        raise Built

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    out_types = {cli.output_dir, cli.output_file, cli.image_file}
    checked = 0
    for program in SCRIPTS:
        monkeypatch.setattr(sys, "argv", [program])
        try:
            runpy.run_path(str(ROOT / program), run_name="__main__")
        except (Built, SystemExit):
            pass
    assert len(parsers) >= len(SCRIPTS) - 1, sorted(parsers)
    for prog, p in parsers.items():
        for action in p._actions:
            if action.type in out_types and isinstance(action.default, str):
                parts = Path(action.default).parts
                assert parts[:1] not in (("results",), ("manipulated_models",)), (prog, action.dest, action.default)
                checked += 1
    assert checked >= 8
    for prog in ("evaluate_models.py", "evaluate_attack_defense_metrics.py", "locate_backdoor.py",
                 "run_generate_explanations.py"):  # the evaluations that used to replace their output unasked
        save = next(a for a in parsers[prog]._actions if a.dest == "save_path")
        assert Path(save.default).parts[:1] == ("output",), (prog, save.default)
    funcs = [getattr(m, n) for m in (ev.compare_defenses, ev.detectors, ev.anatomy, ev.stored, ev.defense_table,
                                     ev.explanations, ev.cam_fit, sweep) for n in dir(m)
             if callable(getattr(m, n)) and not n.startswith("_")]
    for f in funcs:
        try:
            sig = inspect.signature(f)
        except (TypeError, ValueError):
            continue
        d = sig.parameters.get("save_path")
        if d is not None and isinstance(d.default, (str, Path)):
            assert Path(d.default).parts[:1] not in (("results",), ("manipulated_models",)), (f, d.default)


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.glob("defenses_154.*"))}


def test_compare_defenses_interrupted_in_its_write_phase_keeps_the_old_comparison_whole(
        work, tiny_data_root, monkeypatch, capsys):
    args = ["154", "cpu", "--defenses", "rebn", "--clean-images", "8", *_tiny(tiny_data_root), "--save_path", "out"]
    code, err = _run("scripts/compare_defenses.py", args, monkeypatch, capsys)
    assert code == 0, err
    old = _sha(work / "out")
    assert sorted(old) == ["defenses_154.csv", "defenses_154.json", "defenses_154.png"]
    for nth in (1, 2, 3):  # Ctrl-C at the first, second, third file's rename
        calls = []
        real = fileio._commit

        def interrupted(tmp, path, nth=nth):
            if Path(path).name.startswith("defenses_154."):  # the renames into place, not the staged writes
                calls.append(path)
                if len(calls) == nth:
                    raise KeyboardInterrupt
            real(tmp, path)
        monkeypatch.setattr(fileio, "_commit", interrupted)
        code, err = _run("scripts/compare_defenses.py", [*args, "--force"], monkeypatch, capsys)
        monkeypatch.setattr(fileio, "_commit", real)
        assert code == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == ("interrupted: nothing was written to out; any earlier defenses_154.* there are "
                               "unchanged; to finish, run it again for 154"), err
        assert _sha(work / "out") == old, nth                      # never a mix of two comparisons
        assert [p.name for p in (work / "out").iterdir() if p.name.startswith(".")] == []
    # a new folder interrupted while writing: nothing there at all
    monkeypatch.setattr(fileio, "_commit", lambda tmp, path: (_ for _ in ()).throw(KeyboardInterrupt))
    code, err = _run("scripts/compare_defenses.py", [*args[:-1], "fresh"], monkeypatch, capsys)
    assert code == 130 and not (work / "fresh").exists(), err


def test_compare_defenses_refuses_to_replace_a_comparison_without_merge_or_force(work, tiny_data_root,
                                                                                monkeypatch, capsys):
    (work / "out").mkdir()
    (work / "out" / "defenses_154.csv").write_text("defense\nx\n")
    before = _snapshot(work)
    args = ["154", "cpu", "--defenses", "rebn", "--clean-images", "8", *_tiny(tiny_data_root), "--save_path", "out"]
    _one_error(*_run("scripts/compare_defenses.py", args, monkeypatch, capsys),
               "out/defenses_154.csv already holds a defense comparison; pass --merge")
    assert _snapshot(work) == before


def test_interrupt_message_of_a_multi_attack_study_names_what_was_kept():
    from bnbackdoor.errors import Interrupted, kept_on_interrupt

    done: list[str] = []
    with kept_on_interrupt(done, "154", ["154", "256"], "out", "defenses"):
        pass
    with pytest.raises(Interrupted, match=r"kept the finished defenses of 154 in out; nothing of 256 was written, "
                                          r"any earlier defenses_256\.\* there are unchanged; to finish, run it "
                                          r"again for 256"):
        with kept_on_interrupt(done, "256", ["154", "256"], "out", "defenses"):
            raise KeyboardInterrupt


# --- 2. defense and detector options, by each registered option's declared kind ------------------------------

def _bad_values(kind) -> list[str]:
    """Values a spec may give that ``kind`` refuses: the wrong kind, and just outside each end of its range."""
    if kind.type is bool:
        return ["maybe", "2"]
    if kind.type is str:
        return []
    out = ["many"] + (["nan"] if kind.type is float else ["1.5"])
    if kind.lo is not None:
        out.append(str(kind.lo if kind.lo_open else kind.lo - 1))
    if kind.hi is not None:
        out.append(str(kind.hi if kind.hi_open else kind.hi + 1))
    return out


def _defense_cases():
    from bnbackdoor.defenses import DEFENSES
    return [(n, k, v) for n, d in sorted(DEFENSES.items()) for k, kind in d.kinds.items() for v in _bad_values(kind)]


def test_every_option_of_every_registered_defense_and_detector_has_a_kind_its_default_fits():
    from bnbackdoor.defenses import DEFENSES
    from bnbackdoor.detectors import DETECTORS
    for reg in (DEFENSES, DETECTORS):
        for name, d in reg.items():
            assert set(d.kinds) == set(d.defaults), name
            assert all(d.kinds[k].problem(v) is None for k, v in d.defaults.items()), name
    assert len(_defense_cases()) >= 100


def test_a_defense_option_of_the_wrong_kind_or_out_of_range_is_one_line_before_any_work(work, monkeypatch, capsys):
    before = _snapshot(work)
    for name, key, value in _defense_cases():
        line = _one_error(*_run("scripts/compare_defenses.py", ["154", "cpu", "--defenses", f"{name}:{key}={value}"],
                                monkeypatch, capsys), f"defense '{name}': option {key}=")
        assert "is not" in line or "out of range" in line, line
    assert _snapshot(work) == before
    # the two cases of the issue: a zero batch size, a negative epoch count
    _one_error(*_run("scripts/compare_defenses.py", ["154", "cpu", "--defenses", "finetune:batch_size=0"],
                     monkeypatch, capsys), "batch_size=0 is out of range; allowed: an integer >= 2")
    _one_error(*_run("scripts/compare_defenses.py", ["154", "cpu", "--defenses", "finetune:epochs=-3"],
                     monkeypatch, capsys), "epochs=-3 is out of range; allowed: an integer >= 1")
    _one_error(*_run("scripts/compare_defenses.py", ["154", "cpu", "--defenses", "finetune:epochs=2:epochs=3"],
                     monkeypatch, capsys), "sets option epochs twice")


@pytest.mark.parametrize("flag,value,needle", [
    ("--defenses", "bnp,,anp", "has an empty name"), ("--defenses", "bnp,", "has an empty name"),
    ("--defenses", "bnp,bnp", "names bnp twice"), ("--defenses", "finetune,finetune:epochs=10", "are the same defense"),
    ("--defenses", ",", "takes comma-separated defense names")])
def test_empty_and_repeated_defense_names_are_one_line_errors(flag, value, needle, work, monkeypatch, capsys):
    before = _snapshot(work)
    _one_error(*_run("scripts/compare_defenses.py", ["154", "cpu", flag, value], monkeypatch, capsys), needle)
    assert _snapshot(work) == before


@pytest.mark.parametrize("value,needle", [("strip,,sentinet", "has an empty name"), ("strip,strip", "names strip twice"),
                                          ("strip,", "has an empty name")])
def test_empty_and_repeated_detector_names_are_one_line_errors(value, needle, work, monkeypatch, capsys):
    before = _snapshot(work)
    _one_error(*_run("scripts/compare_detectors.py", ["154", "cpu", "--detectors", value], monkeypatch, capsys), needle)
    assert _snapshot(work) == before


def test_every_option_of_every_registered_detector_is_checked_before_calibration():
    from bnbackdoor.detectors import DETECTORS, fit_detector
    from bnbackdoor.errors import UserError
    model = build_model("cifar10_resnet20").eval()
    n = 0
    for name, d in DETECTORS.items():
        for key, kind in d.kinds.items():
            for text in _bad_values(kind):
                try:
                    value = kind.parse(text)
                except ValueError:
                    value = text  # the wrong type, as an API caller might pass it
                with pytest.raises(UserError, match=rf"detector '{name}': option {key}="):
                    fit_detector(name, model, torch.zeros(0, 3, 32, 32), **{key: value})
                n += 1
    assert n >= 15


# --- 4. script flags at parse time ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["p1", "--threads", "0"], "--threads: 0 is out of range"),
    (["p1", "--threads", "two"], "--threads: 'two' is not an integer"),
    (["p1", "--models-root", "nope"], "--models-root: nope does not exist"),
    (["p1", "--data-root", "nope"], "--data-root: nope does not exist"),
    (["p1", "--save-dir", "a_file"], "a_file is a file, not a folder"),
])
def test_probe_flags_are_checked_at_parse_time(args, needle, work, monkeypatch, capsys):
    (work / "a_file").write_text("x")
    before = _snapshot(work)
    _one_error(*_run("scripts/probe_attack.py", args, monkeypatch, capsys), needle)
    assert _snapshot(work) == before


# --- 3. the catalogue, validated whole on load (--list refuses what a build would refuse) ----------------------

def _catalogue_cases():
    def first(d):
        return d["runs"][0]

    def prof(d):
        return d["profiles"][first(d)["profile"]]
    return [
        ("run-overrides-list", lambda d: first(d).update(overrides=[1, 2]), "'overrides' must be an object"),
        ("profile-overrides-string", lambda d: prof(d).update(overrides="fast"), "'overrides' must be an object"),
        ("run-overrides-id", lambda d: first(d).update(overrides={"id": "x"}), "overrides 'id', which the run sets"),
        ("profile-overrides-gs-id", lambda d: prof(d).update(overrides={"gs_id": 3}), "overrides 'gs_id'"),
        ("misspelt-field", lambda d: first(d).update(overrides={"learning_rte": 0.1}),
         "overrides unknown field 'learning_rte' (did you mean 'learning_rate'?)"),
        ("invalid-value", lambda d: first(d).update(overrides={"learning_rate": -1.0}),
         "its overrides do not make a valid run"),
        ("extends-number", lambda d: prof(d).update(extends=5), "'extends' must be a profile name"),
        ("extends-list", lambda d: prof(d).update(extends=["cam"]), "'extends' must be a profile name"),
        ("extends-unknown", lambda d: prof(d).update(extends="nosuch"), "extends unknown profile 'nosuch'"),
        ("gs-id-text", lambda d: first(d).update(gs_id="0"), "'gs_id' must be a grid point index"),
        ("runs-object", lambda d: d.update(runs={"a": 1}), "'runs' must be a list"),
        ("profiles-list", lambda d: d.update(profiles=[1]), "expected a JSON object"),
    ]


@pytest.mark.parametrize("case,mutate,needle", _catalogue_cases(), ids=[c[0] for c in _catalogue_cases()])
def test_list_refuses_a_catalogue_a_build_would_refuse(case, mutate, needle, tmp_path, monkeypatch, capsys):
    cat = json.loads((ROOT / "experimentsettings" / "catalogue" / "catalogue.json").read_text())
    cat["runs"] = cat["runs"][:2]
    mutate(cat)
    (tmp_path / "experimentsettings").symlink_to(ROOT / "experimentsettings")
    (tmp_path / "cat.json").write_text(json.dumps(cat))
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    for args in (["--list"], ["cpu"]):
        _one_error(*_run("scripts/build_catalogue.py", [*args, "--catalogue", "cat.json"], monkeypatch, capsys),
                   needle)
    assert _snapshot(tmp_path) == before


# --- 0b. records that say what was done -----------------------------------------------------------------------

def _labelled(n: int = 200, classes: int = 10):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % classes


def test_a_poisoning_share_of_zero_images_is_refused_and_a_capped_sig_share_is_recorded(capsys):
    from bnbackdoor.errors import UserError
    from bnbackdoor.poisoning import poison_training_set
    x, y = _labelled()
    with pytest.raises(UserError, match=r"a poisoning share of 0.001 of 200 training images is 0 images"):
        poison_training_set(x, y, "badnets", 0, 0.001)
    s = poison_training_set(x, y, "sig", 0, 0.5)   # asks for 100, the target class has 20
    assert "notice: sig is clean-label: a share of 0.5 asks for 100 images but the target class 0 has 20" in \
        capsys.readouterr().err
    assert s.record() == {"poisoned_images": 20, "poisoned_images_asked": 100, "poisoned_share": 0.1,
                          "noise_images": 0}
    with pytest.raises(UserError, match=r"wanet's noise mode needs 200 more images .* give percentage_trigger at "
                                        r"most 0.333"):
        poison_training_set(x, y, "wanet", 0, 0.5)


@pytest.mark.parametrize("change,needle", [
    ({"percentage_trigger": 0.01, "training_size": 20}, "field 'percentage_trigger' is 0.01; allowed: 0 or at least"),
    ({"percentage_trigger": 0.4, "triggerStrs": ["wanet"]}, "at most 0.333 for wanet"),
])
def test_scratch_shares_that_cannot_be_served_are_refused_by_the_parameters(change, needle, tmp_path, monkeypatch,
                                                                             capsys):
    d = resolve_attack("CIFAR10R20-badnets-10", root=ROOT).to_dict()
    (tmp_path / "p.json").write_text(json.dumps({**d, **change}))
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    _one_error(*_run("attack.py", ["cpu", "p.json"], monkeypatch, capsys), needle)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("field,value,needle", [
    ("adam_eps", 1.0, "field 'adam_eps' is 1.0; allowed: a number in (0, 0.01] (Adam steps by lr m / (sqrt(v) + eps)"),
])
def test_valid_numbers_that_make_no_sense_are_refused_with_the_reason(field, value, needle, tmp_path, monkeypatch,
                                                                       capsys):
    d = resolve_attack("154", root=ROOT).to_dict()
    (tmp_path / "p.json").write_text(json.dumps({**d, field: value}))
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    _one_error(*_run("attack.py", ["cpu", "p.json"], monkeypatch, capsys), needle)
    assert _snapshot(tmp_path) == before


def test_every_shipped_parameter_file_grid_and_catalogue_run_passes_the_bounds():
    import glob
    from bnbackdoor.attack.params import expand_grid, is_grid, read_json
    n = 0
    for f in sorted(glob.glob(str(ROOT / "manipulated_models" / "*" / "parameters.json"))):
        resolve_attack(f)
        n += 1
    for f in sorted(glob.glob(str(ROOT / "experimentsettings" / "*.json"))):
        d = read_json(f)
        n += len(list(expand_grid(d))) if is_grid(d) else bool(resolve_attack(f))
    assert n > 300


def test_composed_batches_that_repeat_images_are_recorded_and_said():
    from bnbackdoor.defenses.evaluate import composition, repeated_batches
    assert repeated_batches(300, 100, composition(300, 100, 0.01)) == 0
    few = composition(8, 100, 0.01)                    # 8 test images for batches of 100
    assert repeated_batches(8, 100, few) == len(few) + 1


def test_clean_images_above_the_split_are_said_and_recorded(tiny_data_root, capsys):
    from bnbackdoor.data import clean_set
    sets = [clean_set("cifar10", n, data_root=tiny_data_root, option="--clean-images") for n in (8, 1000)]
    assert [len(s) for s in sets] == [8, 96] and sets[1].record()["requested"] == 1000
    assert "notice: --clean-images 1000 is above the cifar10 training split (96 images); the defender gets all 96" \
        in capsys.readouterr().err


# --- 1. stored JSON of the right syntax but the wrong shape: one reader per kind, one line each ------------------

SHAPES = [  # (case, file content, what the line names)
    ("list-not-object", [1, 2], "its top level is a list, expected an object"),
    ("rows-string", {"rows": "none"}, "field rows is a string ('none'), expected a list of"),
    ("row-number", {"rows": [3]}, "field rows[0] is a number (3), expected an object"),
    ("truncated", '{"rows": [', "is damaged (malformed JSON at line 1"),
]


def _write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))


@pytest.mark.parametrize("case,content,needle", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("program,stem", [("scripts/compare_defenses.py", "defenses"),
                                          ("scripts/compare_detectors.py", "detectors")])
def test_merge_refuses_a_stored_comparison_of_the_wrong_shape_before_any_work(program, stem, case, content, needle,
                                                                              work, monkeypatch, capsys):
    _write(work / "out" / f"{stem}_154.json", content)
    before = _snapshot(work)
    line = _one_error(*_run(program, ["154", "cpu", "--merge", "--save_path", "out"], monkeypatch, capsys), needle)
    assert f"out/{stem}_154.json" in line and f"python scripts/compare_{stem}.py 154 cpu --force" in line
    assert _snapshot(work) == before


def test_a_wrong_type_inside_a_row_names_the_field(work, monkeypatch, capsys):
    _write(work / "out" / "defenses_154.json", {"rows": [{"defense": "bnp", "clean_accuracy": "0.9"}]})
    _one_error(*_run("scripts/compare_defenses.py", ["154", "cpu", "--merge", "--save_path", "out"], monkeypatch,
                     capsys), "field rows[0].clean_accuracy is a string ('0.9'), expected a number")


RESULT_FILES = [  # (path under the root, content, what the line names): every kind make_results.py reads
    ("manipulated_models/x/metrics.json", ["a list"], "its top level is a list, expected an object"),
    ("manipulated_models/x/metrics.json", {"manipulated_model": {"clean_accuracy": "high"}},
     "field manipulated_model.clean_accuracy is a string ('high')"),
    ("manipulated_models/x/metrics.json", {"manipulated_model": 3}, "field manipulated_model is a number (3)"),
    ("results/defenses_154.json", {"rows": [{"defense": ["bnp"]}]}, "field rows[0].defense is a list, expected a "
                                                                    "string"),
    ("results/defenses_154.json", {"rows": [{"defense": "bnp", "clean_images": "500"}]},
     "field rows[0].clean_images is a string ('500'), expected an integer or null"),
    ("results/detectors_154.json", {"rows": [{"model": "m", "detector": 1, "trigger": "t"}]},
     "field rows[0].detector is a number (1), expected a string"),
    ("results/probes/p.json", {"name": "p", "epochs": 3}, "field epochs is a number (3), expected a list"),
    ("results/probes/p.json", '{"name": "p", "epochs": [{"epoch": 1', "is damaged"),
    ("results/154_composition.json", {"points": [{"test_batch": "100", "fraction": "1", "triggered_per_batch": 1,
                                                  "triggered_images": 1}]},
     "field points[0].test_batch is a string ('100'), expected an integer"),
    ("results/154_defense.json", {"rows": ["rebn"]}, "field rows is a list, expected an object of"),
    ("results/anatomy/154_anatomy.json", {"rows": [], "groups": {"bn": "bn.weight"}},
     "field groups.bn is a string ('bn.weight'), expected a list of a string"),
    ("results/cam_fit.json", {"rows": [{"target": "square", "resolution": 8, "best": "0.1"}], "command": "c",
                              "steps": 1}, "field rows[0].best is a string ('0.1'), expected a number"),
]


@pytest.mark.parametrize("rel,content,needle", RESULT_FILES, ids=[f"{r[0]}-{i}" for i, r in enumerate(RESULT_FILES)])
def test_make_results_refuses_a_stored_file_of_the_wrong_shape(rel, content, needle, tmp_path, monkeypatch, capsys):
    _write(tmp_path / rel, content)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    line = _one_error(*_run("scripts/make_results.py", ["--root", "."], monkeypatch, capsys), needle)
    assert rel in line and ("rebuild" in line or "delete it" in line) and "move it aside" in line
    assert _snapshot(tmp_path) == before


def test_every_shipped_stored_file_passes_its_schema():
    from bnbackdoor.stored_json import check_stored_results
    assert check_stored_results(ROOT) > 100


@pytest.mark.parametrize("content,needle", [([1], "its top level is a list"),
                                            ({"name": "p1", "epochs": "x"}, "field epochs is a string"),
                                            ("{", "is damaged")])
def test_probe_refuses_a_stored_probe_of_the_wrong_shape(content, needle, work, monkeypatch, capsys):
    _write(work / "output" / "probes" / "p1.json", content)
    before = _snapshot(work)
    line = _one_error(*_run("scripts/probe_attack.py", ["p1"], monkeypatch, capsys), needle)
    assert "output/probes/p1.json" in line
    assert _snapshot(work) == before


@pytest.mark.parametrize("content,needle", [([1], "its top level is a list, expected a metrics object"),
                                            ({"seed": "0"}, "field seed is a string ('0'), expected an integer"),
                                            ({"parameters": [1]}, "field parameters is a list")])
def test_a_run_folder_whose_metrics_json_has_the_wrong_shape_is_one_line(content, needle, work, monkeypatch, capsys):
    _write(work / "manipulated_models" / "154" / "metrics.json", content)
    before = _snapshot(work)
    _one_error(*_run("scripts/record_base_models.py", ["manipulated_models/154"], monkeypatch, capsys), needle)
    assert _snapshot(work) == before


# --- 6. paths relative to the repository ----------------------------------------------------------------------

ABSOLUTE = r"""(?:^|[\s"'(`|])/(?:work|home|tmp|Users|scratch|mnt|root)/"""


def test_no_stored_record_or_generated_page_names_a_machines_absolute_path():
    import re
    pages = [ROOT / "RESULTS.md", ROOT / "experimentsettings" / "README.md",
             *(ROOT / "manipulated_models").glob("*/README.md"), *(ROOT / "results").rglob("*.json")]
    bad = [str(p.relative_to(ROOT)) for p in pages if re.search(ABSOLUTE, p.read_text(encoding="utf-8"), re.M)]
    assert bad == []


def test_paths_are_recorded_relative_to_the_repository(tmp_path):
    from bnbackdoor.stored_json import repo_relative
    (tmp_path / "models").mkdir()
    assert repo_relative(tmp_path / "models" / "m.pth", tmp_path) == "models/m.pth"
    assert repo_relative("models/m.pth", tmp_path) == "models/m.pth"
    assert repo_relative("/elsewhere/anc/models", tmp_path) == "<outside the repository>/models"
    from importlib import util
    spec = util.spec_from_file_location("probe_attack", ROOT / "scripts" / "probe_attack.py")
    probe = util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.relative_argv(["p", "--models-root", "/elsewhere/models", "--threads", "2"]) == [
        "p", "--models-root", "<outside the repository>/models", "--threads", "2"]


# --- 0c. every study's write phase is one unit: an interrupt leaves the old result or the new one, never a mix ----

STUDIES = [  # (program, arguments after the data root, the stem of the files it writes in out/)
    ("scripts/compare_defenses.py", ["154", "cpu", "--defenses", "rebn", "--clean-images", "8", "--testing-size", "8",
                                     "--force"], "defenses_154."),
    ("scripts/locate_backdoor.py", ["154", "cpu", "--testing-size", "8", "--force"], "154_anatomy."),
    ("evaluate_attack_defense_metrics.py", ["154", "--device", "cpu", "--datasize", "8", "--batchsize", "8",
                                            "--force"], "154_defense."),
]


@pytest.mark.parametrize("program,args,stem", STUDIES, ids=[s[0] for s in STUDIES])
def test_an_interrupt_in_any_studys_write_phase_keeps_the_old_result_whole(program, args, stem, work, tiny_data_root,
                                                                          monkeypatch, capsys):
    argv = [*args, "--data-root", str(tiny_data_root), "--save_path", "out"]
    code, err = _run(program, argv, monkeypatch, capsys)
    assert code == 0, err
    old = {p.name: p.read_bytes() for p in (work / "out").iterdir() if p.name.startswith(stem)}
    assert len(old) == 3, sorted(old)
    real = fileio._commit
    for nth in (2, 3):
        calls = []

        def interrupted(tmp, path, nth=nth):
            if Path(path).name.startswith(stem):
                calls.append(path)
                if len(calls) == nth:
                    raise KeyboardInterrupt
            real(tmp, path)
        monkeypatch.setattr(fileio, "_commit", interrupted)
        code, err = _run(program, [*argv, "--seed", "1"], monkeypatch, capsys)  # other test images: other files
        monkeypatch.setattr(fileio, "_commit", real)
        assert code == 130 and "Traceback" not in err, err
        now = {p.name: p.read_bytes() for p in (work / "out").iterdir() if p.name.startswith(stem)}
        assert now == old, (program, nth)
    # uninterrupted, the same command replaces every file: the check above could tell a mix
    code, err = _run(program, [*argv, "--seed", "1"], monkeypatch, capsys)
    assert code == 0, err
    new = {p.name: p.read_bytes() for p in (work / "out").iterdir() if p.name.startswith(stem)}
    assert sorted(new) == sorted(old) and all(new[k] != old[k] for k in old if not k.endswith(".png")), program


def test_a_plain_interrupt_says_what_is_kept_without_claiming_saved_work(capsys):
    from bnbackdoor.errors import run_cli

    def main():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "finished work is saved" not in err
    assert "a study writes its files as one unit when it has finished, so this one wrote nothing" in err


# --- 0d. the evaluation scripts refuse to replace their output without --force -------------------------------

EVALUATIONS = [  # (program, arguments, the file a first run writes under out/, what the refusal names)
    ("evaluate_models.py", ["154", "cpu", "--testing-size", "8"], "154/evaluation.json", "an evaluation"),
    ("evaluate_attack_defense_metrics.py", ["154", "--device", "cpu", "--datasize", "8", "--batchsize", "8",
                                            "--defense", "rebn"], "154_defense.json", "a defense table"),
    ("scripts/locate_backdoor.py", ["154", "cpu", "--testing-size", "8"], "154_anatomy.json", "an anatomy report"),
    ("run_generate_explanations.py", ["154", "--n-images", "8", "--batchsize", "8"], "154_explanations.json",
     "an explanation report"),
]


@pytest.mark.parametrize("program,args,first,what", EVALUATIONS, ids=[e[0] for e in EVALUATIONS])
def test_an_evaluation_refuses_to_replace_its_output_without_force(program, args, first, what, work,
                                                                   tiny_data_root, monkeypatch, capsys):
    (work / "out" / first).parent.mkdir(parents=True)
    (work / "out" / first).write_text("{}")  # an earlier result, however it was made
    before = _snapshot(work)
    argv = [*args, "--data-root", str(tiny_data_root), "--save_path", "out"]
    line = _one_error(*_run(program, argv, monkeypatch, capsys), f"out/{first} already holds {what}")
    assert "pass --force to replace it" in line
    assert _snapshot(work) == before
    code, err = _run(program, [*argv, "--force"], monkeypatch, capsys)
    assert code == 0, err
    assert (work / "out" / first).read_text() != "{}"


# --- 2b. detector options through the same spec syntax as defenses -------------------------------------------

def _detector_cases():
    from bnbackdoor.detectors import DETECTORS
    return [(n, k, v) for n, d in sorted(DETECTORS.items()) for k, kind in d.kinds.items() for v in _bad_values(kind)]


def test_a_detector_option_of_the_wrong_kind_or_out_of_range_is_one_line_before_any_work(work, monkeypatch, capsys):
    before = _snapshot(work)
    cases = _detector_cases()
    assert len(cases) >= 15
    for name, key, value in cases:
        line = _one_error(*_run("scripts/compare_detectors.py", ["154", "cpu", "--detectors", f"{name}:{key}={value}"],
                                monkeypatch, capsys), f"detector '{name}': option {key}=")
        assert "is not" in line or "out of range" in line, line
    for spec, needle in [("strip:n_perturb=0", "n_perturb=0 is out of range; allowed: an integer >= 1"),
                         ("strip:nope=3", "detector 'strip' has no option nope"),
                         ("strip:n_perturb", "options are written name:option=value, e.g. strip:n_perturb=16"),
                         ("strip:n_perturb=2:n_perturb=3", "sets option n_perturb twice")]:
        _one_error(*_run("scripts/compare_detectors.py", ["154", "cpu", "--detectors", spec], monkeypatch, capsys),
                   needle)
    assert _snapshot(work) == before


def test_detector_specs_label_their_rows_and_a_repeat_with_default_options_is_refused(work, tiny_data_root,
                                                                                      monkeypatch, capsys):
    from bnbackdoor.detectors import DETECTORS, parse_detectors
    default = DETECTORS["strip"].defaults["n_perturb"]
    with pytest.raises(Exception, match="are the same detector"):
        parse_detectors(f"strip,strip:n_perturb={default}")
    args = ["154", "cpu", "--detectors", "strip,strip:n_perturb=4", "--clean-images", "40", *_tiny(tiny_data_root)]
    code, err = _run("scripts/compare_detectors.py", args, monkeypatch, capsys)
    assert code == 0, err
    stored = json.loads((work / "output" / "detectors_154.json").read_text())
    assert [r["detector"] for r in stored["rows"]][:2] == ["strip", "strip n_perturb=4"]
    assert stored["detectors"]["strip n_perturb=4"]["options"]["n_perturb"] == 4
    assert stored["detectors"]["strip"]["options"] == dict(DETECTORS["strip"].defaults)


# --- 6b. a run record's base_model.path: relative to the repository, never a machine's absolute path ---------

def test_base_model_paths_are_relative_and_old_absolute_records_still_merge(work, tiny_data_root,
                                                                          tmp_path_factory, monkeypatch, capsys):
    import shutil
    from bnbackdoor.runs import base_record
    inside = work / "models" / "cifar10_resnet20" / "model_0.pth"
    outside = tmp_path_factory.mktemp("elsewhere") / "base.pth"
    shutil.copy(inside, outside)
    assert base_record(build_model("cifar10_resnet20"), inside)["path"] == "models/cifar10_resnet20/model_0.pth"
    args = ["154", "cpu", "--detectors", "strip", "--clean-images", "40", *_tiny(tiny_data_root)]
    code, err = _run("scripts/compare_detectors.py", [*args, "--clean-model", str(outside)], monkeypatch, capsys)
    assert code == 0, err
    out = work / "output" / "detectors_154.json"
    assert json.loads(out.read_text())["base_model"]["path"] == "<outside the repository>/base.pth"
    code, err = _run("scripts/compare_detectors.py", [*args, "--clean-model", str(inside), "--force"], monkeypatch,
                     capsys)
    assert code == 0, err
    stored = json.loads(out.read_text())
    assert stored["base_model"]["path"] == "models/cifar10_resnet20/model_0.pth"
    stored["base_model"]["path"] = str(inside)  # a record written before paths were relative
    out.write_text(json.dumps(stored))
    code, err = _run("scripts/compare_detectors.py", [*args, "--merge"], monkeypatch, capsys)
    assert code == 0, err
