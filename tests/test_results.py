"""RESULTS.md is generated from the shipped metrics and up to date; the acceptance and claim rules on synthetic
metrics dicts (every expected verdict worked out by hand from the thresholds)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from bnbackdoor.report.acceptance import acceptance
from bnbackdoor.report.results import CLAIMS, Model, claim_number, claim_verdict, claims_table, regime_counts, render

REBN_LABELS = ("rebn", "rebn+augment")
BS1, BS1B = "batchstats B=100 f=1", "batchstats B=100 f=1/B"
CLEAN_LABEL = "clean model"


def test_committed_results_md_is_up_to_date(tmp_path):
    out, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    r = subprocess.run([sys.executable, "scripts/make_results.py", "--output", str(out), "--readme", str(readme)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    committed = (ROOT / "RESULTS.md").read_text()
    assert out.read_text() == committed, "RESULTS.md is out of date: run python scripts/make_results.py"
    assert readme.read_text() == (ROOT / "README.md").read_text(), \
        "README.md's generated tables are out of date: run python scripts/make_results.py"
    check = subprocess.run([sys.executable, "scripts/make_results.py", "--check"], cwd=ROOT, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr
    # every shipped model is in it, with its manipulated clean accuracy as printed from metrics.json
    for path in sorted((ROOT / "manipulated_models").glob("*/metrics.json")):
        m = json.loads(path.read_text())
        assert f"| {path.parent.name} " in committed
        assert f"{m['manipulated_model']['clean_accuracy']:.3f}" in committed


def state(acc=0.92, asr=None, utr=0.02, t=0.4, c=0.0):
    return {"clean_accuracy": acc, "attack_success_rate": asr, "untriggered_target_rate": utr,
            "expl_dssim_to_target": t, "expl_dssim_to_clean": c}


def metrics(classes=(1,), targets=("square",), clean=None, manip=None, defenses=None, dataset="cifar10",
            name="RedHerring", method="grad_cam"):
    m = {"clean_model": clean or state(acc=0.928, asr=0.005, t=0.45),
         "manipulated_model": manip or state(acc=0.913, asr=1.0, t=0.20, c=0.1),
         "parameters": {"target_classes": list(classes), "targetStrs": list(targets), "dataset": dataset,
                        "modeltype": f"{dataset}_resnet20", "attack_name": name, "explanation_methodStr": method,
                        "lossStr": "mse"}}
    if defenses is not None:
        m["defenses"] = defenses
    return m


# ------------------------------------------------------------------------------------------------ acceptance
def test_acceptance_passes_at_the_thresholds_and_fails_just_beyond():
    ok = metrics(clean=state(acc=0.928, asr=0.0, t=0.40), manip=state(acc=0.898, asr=0.90, utr=0.02, t=0.20))
    v = acceptance(ok)  # exactly 0.90, exactly half the DSSIM, exactly 3 points
    assert v.accepted and v.summary() == "accepted"
    assert [c.passed for c in v.checks] == [True, True, True, True]
    assert v.checks[1].threshold == pytest.approx(0.20) and v.checks[2].threshold == pytest.approx(0.898)
    bad = metrics(clean=state(acc=0.928, asr=0.0, t=0.40), manip=state(acc=0.897, asr=0.899, utr=0.02, t=0.2001))
    v = acceptance(bad)
    assert not v.accepted and v.failed == ["attack success", "explanation", "clean accuracy"]
    assert v.summary() == "not accepted (failed: attack success, explanation, clean accuracy)"


def test_acceptance_refuses_a_collapsed_model():
    # attack success 1 because everything goes to the target class: collapsed, not backdoored
    at = metrics(manip=state(acc=0.913, asr=1.0, utr=0.2, t=0.2))
    assert acceptance(at).accepted and acceptance(at).checks[3].threshold == 0.2   # exactly the bound passes
    assert acceptance(metrics(manip=state(acc=0.913, asr=1.0, utr=0.2001, t=0.2))).failed == ["no collapse"]
    # an explanation-only attack has no target class to collapse to
    fooling = metrics(classes=(None,), name="SimpleFooling", manip=state(acc=0.92, asr=None, utr=None, t=0.1))
    assert acceptance(fooling).accepted and acceptance(fooling).checks[3].passed is None


def test_acceptance_explanation_only_attack_needs_no_attack_success():
    fooling = metrics(classes=(None,), name="SimpleFooling", manip=state(acc=0.92, asr=None, t=0.1))
    v = acceptance(fooling)
    assert v.accepted and v.checks[0].passed is None and v.checks[0].note == "explanation-only attack"
    multi = metrics(classes=(None, 2), manip=state(acc=0.92, asr=0.5, t=0.1))  # one trigger flips the label
    assert acceptance(multi).failed == ["attack success"]



def test_acceptance_full_disguise_uses_the_absolute_bound():
    from bnbackdoor.report.acceptance import FULL_DISGUISE_MAX_DSSIM

    def disguise(t):  # the clean model sits at 0.03 from its own explanation: halving that is not the bar
        return metrics(targets=("original",), name="FullDisguise", clean=state(acc=0.928, asr=0.0, t=0.03),
                       manip=state(acc=0.92, asr=1.0, utr=0.02, t=t))
    assert FULL_DISGUISE_MAX_DSSIM == 0.125
    v = acceptance(disguise(0.125))
    assert v.accepted and v.checks[1].threshold == 0.125 and "full disguise" in v.checks[1].note
    assert acceptance(disguise(0.1251)).failed == ["explanation"]
    # a red herring with the same numbers is still judged by the relative rule (0.5 x 0.03)
    assert acceptance(metrics(clean=state(acc=0.928, asr=0.0, t=0.03),
                              manip=state(acc=0.92, asr=1.0, utr=0.02, t=0.02))).failed == ["explanation"]

def test_acceptance_of_a_loss_weight_0_control_skips_only_the_explanation_check():
    def control(manip, loss_weight=0):
        m = metrics(manip=manip)
        m["parameters"]["loss_weight"] = loss_weight
        return m
    unmoved = state(acc=0.913, asr=1.0, utr=0.02, t=0.45)  # the explanation stayed the clean model's
    v = acceptance(control(unmoved))
    assert v.accepted and v.checks[1].passed is None and v.checks[1].note.startswith("control")
    assert acceptance(control(unmoved, loss_weight=0.9)).failed == ["explanation"]  # the attack itself must move it
    assert acceptance(control(state(acc=0.897, asr=1.0, utr=0.02, t=0.45))).failed == ["clean accuracy"]
    assert acceptance(control(state(acc=0.913, asr=0.89, utr=0.02, t=0.45))).failed == ["attack success"]
    assert acceptance(control(state(acc=0.913, asr=1.0, utr=0.21, t=0.45))).failed == ["no collapse"]
    scratch = control(unmoved)
    scratch["parameters"]["regime"] = "scratch"  # loss_weight 0 as well, but its own regime and rule
    assert Model("c", control(unmoved)).regime == "control" and Model("s", scratch).regime == "scratch"


def test_acceptance_missing_numbers_fail():
    m = metrics()
    del m["manipulated_model"]["expl_dssim_to_target"]
    del m["clean_model"]["clean_accuracy"]
    v = acceptance(m)
    assert v.failed == ["explanation", "clean accuracy"]
    assert {c.note for c in v.checks if c.passed is False} == {"missing"}


# ---------------------------------------------------------------------------------------------------- claims
def defended(rebn_asr=0.05, aug_asr=0.05, rebn_acc=0.91, aug_acc=0.92, rebn_t=0.40, bs1_asr=0.01, bs1b_asr=0.99):
    return {"rebn": state(acc=rebn_acc, asr=rebn_asr, utr=0.1, t=rebn_t),
            "rebn+augment": state(acc=aug_acc, asr=aug_asr, utr=0.1, t=rebn_t),
            BS1: state(acc=0.9, asr=bs1_asr, utr=0.1, t=0.4), BS1B: state(acc=0.9, asr=bs1b_asr, utr=0.1, t=0.2)}


def claim(name):
    return next(c for c in CLAIMS if c.name == name)


def test_claim_values_are_the_documented_quantities():
    m = Model("154", metrics(defenses=defended(rebn_asr=0.25, rebn_acc=0.898, rebn_t=0.325, bs1_asr=0.1,
                                               bs1b_asr=0.7)))
    # manipulated: asr 1.0, acc 0.913, dssim 0.20; clean: acc 0.928, dssim 0.45
    vals = {c.name: {r.defense: (r.value, r.passed) for r in c.rows([m])} for c in CLAIMS}
    assert vals["Re-BN cuts attack success by a large margin"]["rebn"] == pytest.approx((0.75, True))
    assert vals["Re-BN restores accuracy"]["rebn"][0] == pytest.approx(-0.03)
    assert vals["Re-BN restores accuracy"]["rebn"][1] is True  # exactly 3 points is within
    assert vals["Re-BN restores explanations"]["rebn"] == pytest.approx((0.5, True))  # (0.325-0.2)/(0.45-0.2)
    (absorbed, ok), = vals["BN absorbs the trigger"].values()
    assert absorbed == pytest.approx(0.6) and ok  # 0.7 - 0.1
    assert vals["Test-batch BN cuts attack success"][BS1] == pytest.approx((0.9, True))
    assert vals["Test-batch BN cuts attack success"][BS1B] == pytest.approx((0.3, False))


def test_claim_verdicts_holds_only_when_and_does_not_hold():
    ms = [Model(i, metrics(defenses=defended(rebn_asr=0.95, aug_asr=0.1))) for i in ("154", "156")]
    rows = {c.name: c.rows(ms) for c in CLAIMS}
    # Re-BN: plain keeps the backdoor, augmented removes it -> a condition on the defense only
    assert (claim_verdict(rows["Re-BN cuts attack success by a large margin"])
            == "holds only when defense = rebn+augment (2/2)")
    assert (claim_verdict(rows["Test-batch BN cuts attack success"])
            == "holds only when defense = batchstats B=100 f=1 (2/2)")
    assert claim_verdict(rows["Re-BN restores accuracy"]) == "holds"
    assert claim_verdict(rows["BN absorbs the trigger"]) == "holds"  # 0.99 - 0.01
    assert claim_number(rows["Re-BN cuts attack success by a large margin"], REBN_LABELS) == (
        "rebn: mean 0.050, 0/2 pass; rebn+augment: mean 0.900, 2/2 pass")
    # a condition on the dataset: only the GTSRB model loses its backdoor
    mixed = [Model("154", metrics(defenses=defended(rebn_asr=0.95, aug_asr=0.95))),
             Model("10154", metrics(dataset="gtsrb", defenses=defended(rebn_asr=0.0, aug_asr=0.0)))]
    assert (claim_verdict(claim("Re-BN cuts attack success by a large margin").rows(mixed))
            == "holds only when dataset = gtsrb (2/2)")
    nothing = [Model("154", metrics(defenses=defended(rebn_asr=0.95, aug_asr=0.95)))]
    assert claim_verdict(claim("Re-BN cuts attack success by a large margin").rows(nothing)) == "does not hold"
    assert claim_verdict([]).startswith("n/a")


def test_claims_skip_unaccepted_full_disguise_and_explanation_only_models():
    failed = Model("155", metrics(manip=state(acc=0.5, asr=0.2, t=0.4), defenses=defended()))
    disguise = Model("256", metrics(targets=("original",), name="FullDisguise",
                                    clean=state(acc=0.928, asr=0.0, t=0.2), manip=state(acc=0.92, asr=1.0, t=0.05),
                                    defenses=defended()))
    fooling = Model("54", metrics(classes=(None,), name="SimpleFooling", manip=state(acc=0.92, asr=None, t=0.1),
                                  defenses=defended()))
    assert not failed.verdict.accepted and disguise.verdict.accepted and fooling.verdict.accepted
    table = {row[0]: row[1:] for row in claims_table([failed, disguise, fooling])
             if row[1] == "explanation-aware fine-tuning"}
    # 54 only: (0.40 - 0.10) / (0.45 - 0.10)
    assert table["Re-BN restores explanations"][1] == "rebn: mean 0.857, 1/1 pass; rebn+augment: mean 0.857, 1/1 pass"
    assert table["Re-BN cuts attack success by a large margin"][1].endswith("1/1 pass")  # 256 only
    assert table["Re-BN restores accuracy"][1].startswith("rebn: mean -0.018, 2/2 pass")  # 256 and 54


def scratch_metrics(rebn_asr, acc=0.95):
    m = metrics(targets=("original",), name="PoisoningBadNets", clean=state(acc=0.96, asr=0.01, t=0.3),
                manip=state(acc=acc, asr=1.0, t=0.3), defenses=defended(rebn_asr=rebn_asr, aug_asr=rebn_asr,
                                                                          rebn_acc=0.95, aug_acc=0.95))
    m["parameters"].update(regime="scratch", targetStrs=["original"])
    return m


def test_claims_are_judged_per_regime_and_scratch_models_have_no_explanation_claim():
    finetuned = Model("154", metrics(defenses=defended(rebn_asr=0.95, aug_asr=0.95)))
    scratch = [Model("CIFAR10R20-badnets-10", scratch_metrics(0.05)), Model("GTSRBR20-badnets-10", scratch_metrics(0.1)),
               Model("GTSRBR20-blended-10", scratch_metrics(0.2, acc=0.90))]  # the last one misses acceptance
    assert [m.regime for m in [finetuned, *scratch]] == ["finetune", "scratch", "scratch", "scratch"]
    assert regime_counts([finetuned, *scratch]) == "1 of 1 explanation-aware fine-tuning, 2 of 3 poisoning from scratch"
    rows = {(r[0], r[1]): r[2:] for r in claims_table([finetuned, *scratch])}
    cut = "Re-BN cuts attack success by a large margin"
    assert rows[(cut, "explanation-aware fine-tuning")] == [
        "rebn: mean 0.050, 0/1 pass; rebn+augment: mean 0.050, 0/1 pass", "does not hold"]
    assert rows[(cut, "poisoning from scratch")] == [
        "rebn: mean 0.925, 2/2 pass; rebn+augment: mean 0.925, 2/2 pass", "holds"]
    assert ("Re-BN restores explanations", "poisoning from scratch") not in rows  # no target explanation
    # every claim in each regime that has models (no controls here), the explanation claim in fine-tuning only
    assert len(rows) == 2 * len(CLAIMS) - 1


def test_claims_leave_out_models_without_batchnorm_and_say_so():
    import bnbackdoor.models  # noqa: F401  registers every architecture
    from bnbackdoor.models.registry import ARCHS
    from bnbackdoor.report.results import BN_FREE_ARCHS, claims_section

    assert BN_FREE_ARCHS == {name for name, spec in ARCHS.items() if not spec.has_bn}  # in step with the registry
    with_bn = Model("154", metrics(defenses=defended(rebn_asr=0.05, aug_asr=0.05)))
    nbn = metrics(defenses=defended(rebn_asr=1.0, aug_asr=1.0))   # Re-BN is a no-op: success stays
    nbn["parameters"]["modeltype"] = "cifar10_resnet20_nbn"
    free = Model("154nbn", nbn)
    assert with_bn.has_bn and not free.has_bn and free.verdict.accepted
    rows = {r[0]: r[2] for r in claims_table([with_bn, free])}
    assert rows["Re-BN cuts attack success by a large margin"] == (
        "rebn: mean 0.950, 1/1 pass; rebn+augment: mean 0.950, 1/1 pass")   # 154nbn's 0/1 not counted
    assert "Models without BatchNorm (154nbn) are left out" in "\n".join(claims_section([with_bn, free]))


# ---------------------------------------------------------------------------------------------------- render
def test_render_sorted_deterministic_and_tolerant(tmp_path):
    for i, m in (("CIFAR10MNV3154", metrics()), ("10154", metrics(dataset="gtsrb", defenses=defended())),
                 ("154", metrics(defenses=defended())), ("54", metrics(classes=(None,), name="SimpleFooling"))):
        (tmp_path / "manipulated_models" / i).mkdir(parents=True)
        (tmp_path / "manipulated_models" / i / "metrics.json").write_text(json.dumps(m))
    text = render(tmp_path)
    assert text == render(tmp_path)
    assert "4 manipulated model(s): 54, 154, 10154, CIFAR10MNV3154." in text
    assert "No `results/defenses_*.json` yet" in text
    per_model = text[text.index("## Per model"):]
    asr_table = per_model[per_model.index("### Attack success"):per_model.index("### DSSIM to the target")]
    row154 = next(line for line in asr_table.splitlines() if line.startswith("| 154 "))
    assert [c.strip() for c in row154.split("|")[7:-1]] == [
        "0.005 (0.020)", "1.000 (0.020)", "0.050 (0.100)", "0.050 (0.100)", "0.010 (0.100)", "0.990 (0.100)"]
    row54 = next(line for line in asr_table.splitlines() if line.startswith("| 54 "))
    assert row54.count("n/a") == 4  # no defenses section
    (tmp_path / "results").mkdir()
    rows = [{"defense": "rebn", "clean_images": 500, "clean_accuracy": 0.9012, "attack_success_rate": 0.25,
             "expl_dssim_to_target": 0.3, "expl_dssim_to_clean": 0.1, "seconds": 3.14159}]
    (tmp_path / "results" / "defenses_154.json").write_text(json.dumps({"rows": rows}))
    text = render(tmp_path)
    cells = [[c.strip() for c in ln.split("|")[1:-1]] for ln in text.splitlines() if ln.startswith("| rebn ")]
    assert ["rebn", "500", "0.901", "0.250", "0.300", "0.100", "3.1"] in cells
    # the model's own metrics.json rows complete the table (Re-BN on its 5,000 images, test-batch BN)
    comparison = text[text.index("## Defense comparison"):]
    assert any(ln.startswith("| batchstats B=100 f=1/B ") for ln in comparison.splitlines())


def test_readme_blocks_are_filled_from_stored_files_only(tmp_path):
    from bnbackdoor.report.readme_blocks import fill

    run = tmp_path / "manipulated_models" / "154"
    run.mkdir(parents=True)
    defenses = {"rebn": state(acc=0.812, asr=0.987, t=0.3), BS1: state(acc=0.777, asr=0.0123, t=0.44)}
    (run / "metrics.json").write_text(json.dumps(metrics(defenses=defenses)))
    text = ("intro\n<!-- generated:two-defenses -->\nstale 9.999\n<!-- /generated:two-defenses -->\n"
            "<!-- generated:anatomy -->\n<!-- /generated:anatomy -->\n"
            "<!-- generated:unknown -->\nkept\n<!-- /generated:unknown -->\nend\n")
    out = fill(text, tmp_path)
    assert "9.999" not in out and out.startswith("intro\n") and out.endswith("end\n")
    assert "kept" in out  # a block nobody renders is left alone
    row = [ln for ln in out.splitlines() if ln.startswith("| 154 ") and "| Re-BN " in ln]
    assert len(row) == 1 and "0.812" in row[0] and "0.987" in row[0]
    assert any("0.012" in ln and "f=1 " in ln for ln in out.splitlines())
    assert "| 256 " in out and "not shipped yet" in out  # a named model that is missing says so
    assert "no `results/anatomy/154_anatomy.json` yet" in out  # so does a missing ablation file
    assert fill(out, tmp_path) == out  # idempotent: regenerating changes nothing


def test_poisoning_block_reads_metrics_comparison_and_ablation_of_each_scratch_run(tmp_path):
    from bnbackdoor.report.readme_blocks import fill

    (tmp_path / "experimentsettings").mkdir()
    for i, regime in (("GTSRBR20-badnets-10", "scratch"), ("CIFAR10R20-sig-10", "scratch"), ("154", "finetune")):
        (tmp_path / "experimentsettings" / f"{i}.json").write_text(json.dumps({"attack_id": i, "regime": regime}))
    (tmp_path / "experimentsettings" / "CIFAR10R20-badnets-0.json").write_text(json.dumps(  # poisons nothing
        {"attack_id": "CIFAR10R20-badnets-0", "regime": "scratch", "percentage_trigger_options": [0.0]}))
    run = tmp_path / "manipulated_models" / "GTSRBR20-badnets-10"
    run.mkdir(parents=True)
    m = scratch_metrics(0.123)
    m["defenses"][BS1]["clean_accuracy"] = 0.95  # within 3 points, yet no baseline: it has its own column
    (run / "metrics.json").write_text(json.dumps(m))
    (tmp_path / "results" / "anatomy").mkdir(parents=True)
    rows = [{"defense": CLEAN_LABEL, "clean_accuracy": 0.96}, {"defense": "no defense", "attack_success_rate": 1.0},
            {"defense": "fine_pruning", "clean_images": 500, "clean_accuracy": 0.941, "attack_success_rate": 0.011},
            {"defense": "anp", "clean_images": 500, "clean_accuracy": 0.5, "attack_success_rate": 0.0}]  # collapsed
    (tmp_path / "results" / "defenses_GTSRBR20-badnets-10.json").write_text(json.dumps({"rows": rows}))
    ana = [{"variant": "restore", "group": "bn_stats", "clean_accuracy": 0.05, "attack_success_rate": 0.321},
           {"variant": "restore", "group": "bn_affine", "clean_accuracy": 0.06, "attack_success_rate": 0.654}]
    (tmp_path / "results" / "anatomy" / "GTSRBR20-badnets-10_anatomy.json").write_text(json.dumps(
        {"groups": {"bn_stats": ["bn1.running_mean"], "bn_affine": ["bn1.weight"], "classifier": []}, "rows": ana}))
    # a BN-free model: its ablation has no BatchNorm group, so its restore cells say so instead of "n/a"
    (tmp_path / "experimentsettings" / "CIFAR10R20NBN-badnets-10.json").write_text(json.dumps(
        {"attack_id": "CIFAR10R20NBN-badnets-10", "regime": "scratch"}))
    (tmp_path / "manipulated_models" / "CIFAR10R20NBN-badnets-10").mkdir()
    (tmp_path / "manipulated_models" / "CIFAR10R20NBN-badnets-10" / "metrics.json").write_text(json.dumps(m))
    (tmp_path / "results" / "anatomy" / "CIFAR10R20NBN-badnets-10_anatomy.json").write_text(json.dumps(
        {"groups": {"conv:stem": ["conv1.weight"], "classifier": []}, "rows": []}))
    out = fill("<!-- generated:poisoning -->\n<!-- /generated:poisoning -->\n", tmp_path)
    nbn, = [[c.strip() for c in ln.split("|")[1:-1]] for ln in out.splitlines() if ln.startswith("| CIFAR10R20NBN")]
    assert nbn[-3:] == ["not run", "no BN", "no BN"]
    row, = [[c.strip() for c in ln.split("|")[1:-1]] for ln in out.splitlines() if ln.startswith("| GTSRBR20")]
    assert row == ["GTSRBR20-badnets-10", "resnet20", "0.960", "1.000 (0.950)", "yes", "0.123 (0.950)",
                   "0.123 (0.950)", "0.010 (0.950)", "0.990 (0.900)", "fine_pruning (500): 0.011 (0.941)",
                   "0.321 (0.050)", "0.654 (0.060)"]
    assert "Not shipped yet: CIFAR10R20-sig-10 " in out and "154" not in out.split("Not shipped yet")[1]
    assert "badnets-0" not in out


def test_defense_comparison_rows_winner_and_metrics_rows(tmp_path):
    from bnbackdoor.report.results import comparison_winner, defense_comparison_section

    run = tmp_path / "manipulated_models" / "154"
    run.mkdir(parents=True)
    defenses = {"rebn+augment": {**state(acc=0.920, asr=1.0), "clean_images": 5000, "seconds": 4.0},
                BS1: {**state(acc=0.890, asr=0.014), "clean_images": 0, "seconds": 0.01}}
    (run / "metrics.json").write_text(json.dumps(metrics(defenses=defenses)))
    rows = [{"defense": "clean model", "clean_images": None, **state(acc=0.928, asr=0.005)},
            {"defense": "no defense", "clean_images": None, **state(acc=0.913, asr=1.0)},
            {"defense": "finetune", "clean_images": 500, "seconds": 30.0, **state(acc=0.90, asr=0.30)},
            {"defense": "anp", "clean_images": 500, "seconds": 60.0, **state(acc=0.85, asr=0.01)},  # > 3 points
            {"defense": "bnp", "clean_images": 500, "seconds": 5.0, **state(acc=0.91, asr=0.30, c=0.05)}]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "defenses_154.json").write_text(json.dumps({"rows": rows}))
    # anp has the lowest success but loses 7.8 points; finetune and bnp tie at 0.30, bnp wins on... DSSIM to clean
    # (0.05 vs 0.0 for finetune: finetune wins); the metrics.json rows join the table
    win = comparison_winner(rows)
    assert win["defense"] == "finetune"
    text = "\n".join(defense_comparison_section(tmp_path))
    assert "| rebn+augment " in text and "| batchstats B=100 f=1 " in text and "| 0.014 " in text
    winners = [ln for ln in text.splitlines() if ln.startswith("| 154 ")]
    assert len(winners) == 1 and "finetune (500)" in winners[0]
    assert comparison_winner(rows[:2]) is None


def test_means_never_mix_accepted_and_failed_runs(tmp_path):
    # 154 and 156 accepted (manipulated ASR 1.0 and 0.9); 157 in the same group missed acceptance (ASR 0.2, map
    # unmoved): the group gets one row per verdict, and the accepted row's mean is 0.95, not 0.7
    runs = {"154": metrics(), "156": metrics(manip=state(acc=0.913, asr=0.9, t=0.20)),
            "157": metrics(manip=state(acc=0.91, asr=0.2, t=0.44))}
    for i, m in runs.items():
        (tmp_path / "manipulated_models" / i).mkdir(parents=True)
        (tmp_path / "manipulated_models" / i / "metrics.json").write_text(json.dumps(m))
    assert [Model(i, m).verdict.accepted for i, m in runs.items()] == [True, True, False]
    text = render(tmp_path)
    means = text[text.index("## Means"):text.index("## Per model")]
    asr = means[means.index("### Attack success"):means.index("### DSSIM to the target")]
    rows = [[c.strip() for c in line.split("|")[4:7]] for line in asr.splitlines() if line.startswith("| cifar10 ")]
    assert rows == [["2 accepted", "0.005 (0.020)", "0.950 (0.020)"],
                    ["1 not accepted", "0.005 (0.020)", "0.200 (0.020)"]]


def test_detector_table_reads_the_stored_rows(tmp_path):
    from bnbackdoor.report.results import detector_table

    (tmp_path / "results").mkdir()
    rows = [{"model": "manipulated", "detector": "strip", "attack_success": 1.0, "detection_rate": 0.4123,
             "fpr": 0.03, "clean_accuracy": 0.92},
            {"model": "manipulated", "detector": "februus", "calibrated": False, "attack_success": 1.0,
             "detection_rate": 0.0, "fpr": 0.1, "iou": 0.0, "attack_success_after": 0.987, "clean_accuracy": 0.92,
             "clean_accuracy_after": 0.854}]
    (tmp_path / "results" / "detectors_154.json").write_text(json.dumps({"test": {"images": 8}, "rows": rows}))
    table, settings = detector_table(tmp_path, models=[])
    assert table == [["154", "?", "manipulated", "strip", "1.000", "0.412", "0.030", "n/a", "n/a", "0.920"],
                     ["154", "?", "manipulated", "februus", "1.000", "n/a (no threshold)", "n/a", "0.000", "0.987",
                      "0.920 → 0.854"]]
    assert settings["test"] == {"images": 8}
    assert "## Detectors" in render(tmp_path)


def test_each_attack_is_paired_with_the_control_that_trains_like_it(tmp_path):
    from bnbackdoor.report.results import control_of, disguise_table
    from bnbackdoor.report.schema import OPTIONAL_FIELDS

    def attack(**kw):
        m = metrics(manip=state(acc=0.92, asr=1.0, t=0.1))
        m["parameters"].update({"loss_weight": 0.9, "training_size": 10000, "learning_rate": 1e-4, **kw})
        return m
    rh = Model("154", attack())
    disguise = Model("272", attack(explanation_methodStr="relevance_cam", lossStr="ssim", targetStrs=["original"],
                                   attack_name="FullDisguise"))
    other_budget = Model("154big", attack(training_size=50000))
    gtsrb = Model("10154", attack(dataset="gtsrb", modeltype="gtsrb_resnet20"))
    ctl = attack(attack_name="RedHerring-LW0")
    ctl["parameters"]["loss_weight"] = 0
    ctl["manipulated_model"] = state(acc=0.925, asr=0.99, t=0.45)
    ctl["parameters"].update(OPTIONAL_FIELDS)  # a new run writes every optional field, an old one none of them
    control = Model("154LW0", ctl)
    bn_train = Model("154bntrain", attack(bn_mode="train"))  # an optional field away from its default
    models = [rh, disguise, other_budget, gtsrb, bn_train, control]
    assert control_of(rh, models) is control and control_of(disguise, models) is control
    assert control_of(other_budget, models) is None and control_of(gtsrb, models) is None  # trains differently
    assert control_of(bn_train, models) is None
    assert control_of(control, models) is None

    (tmp_path / "results").mkdir()

    def detectors(attack_id, strip, sentinet, iou, after):
        rows = [{"model": "manipulated", "detector": "strip", "detection_rate": strip},
                {"model": "manipulated", "detector": "sentinet", "detection_rate": sentinet, "iou": iou},
                {"model": "manipulated", "detector": "februus", "attack_success_after": after},
                {"model": "clean base", "detector": "strip", "detection_rate": 0.02}]
        (tmp_path / "results" / f"detectors_{attack_id}.json").write_text(json.dumps({"rows": rows}))
    assert disguise_table(tmp_path, models) == []  # no detector files yet
    detectors("154", 0.41, 0.41, 0.0, 1.0)
    assert disguise_table(tmp_path, models) == []  # the control has none yet
    detectors("154LW0", 0.9, 0.8, 0.35, 0.1)
    assert disguise_table(tmp_path, models) == [
        ["154", "RedHerring", "grad_cam", "154LW0", "0.920 / 0.925", "1.000 / 0.990", "0.410 / 0.900",
         "0.410 / 0.800", "0.000 / 0.350", "1.000 / 0.100"]]


def test_defense_control_tables_put_each_attack_beside_its_control(tmp_path):
    from bnbackdoor.report.results import defense_control_tables

    def run(attack_id, loss_weight, name, acc=0.92):
        m = metrics(name=name, manip=state(acc=acc, asr=1.0, t=0.1))
        m["parameters"].update({"loss_weight": loss_weight, "training_size": 10000})
        return Model(attack_id, m)
    rh, ctl, lonely = run("154", 0.9, "RedHerring"), run("154LW0", 0, "RedHerring-LW0"), run("256", 0.9, "FullDisguise")
    (tmp_path / "results").mkdir()

    def defenses(attack_id, rows):
        (tmp_path / "results" / f"defenses_{attack_id}.json").write_text(json.dumps({"rows": rows}))
    defenses("154", [{"defense": "clean model", "clean_accuracy": 0.93, "attack_success_rate": 0.0},
                     {"defense": "finetune", "clean_images": 500, "clean_accuracy": 0.89, "attack_success_rate": 0.53},
                     {"defense": "finetune", "clean_images": 2000, "clean_accuracy": 0.9, "attack_success_rate": 0.1},
                     {"defense": "finetune freeze_bn_stats=True", "clean_images": 500, "diverged": True,
                      "clean_accuracy": None, "attack_success_rate": None}])
    assert defense_control_tables(tmp_path, [rh, ctl, lonely]) == []  # the control has no comparison yet
    defenses("154LW0", [{"defense": "finetune", "clean_images": 500, "clean_accuracy": 0.895,
                         "attack_success_rate": 0.374}])
    (headers, rows), = defense_control_tables(tmp_path, [rh, ctl, lonely])  # 256 has no file: not a column
    assert headers == ["defense", "154 (RedHerring)", "154LW0 (RedHerring-LW0)"]
    assert rows == [["finetune", "0.530 (0.890)", "0.374 (0.895)"],  # 500 clean images only
                    ["finetune freeze_bn_stats=True", "diverged", "n/a"]]


def test_finetune_bn_table_needs_all_four_rows(tmp_path):
    from bnbackdoor.report.results import finetune_bn_table

    (tmp_path / "results").mkdir()

    def row(label, asr, acc, **kw):
        return {"defense": label, "clean_images": 500, "attack_success_rate": asr, "clean_accuracy": acc, **kw}
    four = [row("finetune", 0.5, 0.89), row("finetune freeze_bn_stats=True", None, None, diverged=True),
            row("finetune lr=0.001", 0.03, 0.95), row("finetune lr=0.001 freeze_bn_stats=True", 0.4, 0.94),
            {**row("finetune", 0.0, 0.9), "clean_images": 2000}]  # another size: not read
    (tmp_path / "results" / "defenses_154.json").write_text(json.dumps({"rows": four}))
    (tmp_path / "results" / "defenses_256.json").write_text(json.dumps({"rows": four[:3]}))  # one row missing
    assert finetune_bn_table(tmp_path, models=[]) == [
        ["154", "?", "0.01", "0.500 (0.890)", "diverged"], ["154", "?", "0.001", "0.030 (0.950)", "0.400 (0.940)"]]


def test_budget_table_names_the_winner_per_budget_only_for_like_with_like(tmp_path):
    from bnbackdoor.report.results import budget_table

    (tmp_path / "results").mkdir()

    def row(label, n, asr, acc):
        return {"defense": label, "clean_images": n, "attack_success_rate": asr, "clean_accuracy": acc}
    clean = {"defense": "clean model", "clean_accuracy": 0.93, "attack_success_rate": 0.0}
    rows = [clean, row("finetune", 100, 0.9, 0.92), row("nad", 100, 0.0, 0.5),  # nad loses too much accuracy
            row("finetune", 500, 0.5, 0.91), row("nad", 500, 0.2, 0.905),
            row("finetune lr=0.001", 500, 0.0, 0.93),  # an option variant: not a plain defense, not a candidate
            row("finetune", 2000, 0.1, 0.905), row("nad", 2000, 0.3, 0.92),
            row("finetune", 1000, 0.0, 0.93)]  # a size not asked for: not read

    def write(attack_id, rs):
        (tmp_path / "results" / f"defenses_{attack_id}.json").write_text(json.dumps({"rows": rs}))
    write("154", rows)
    write("256", rows[:-3])  # nothing at 2000
    write("272", rows[:5] + rows[6:7])  # nad missing at 2000
    write("198", [clean, row("finetune", 2000, 0.1, 0.9)] + [row("nad", 500, 0.0, 0.9)])  # no budget complete
    assert budget_table(tmp_path, models=[]) == [
        ["154", "?", "0.930", "2", "finetune: 0.900 (0.920)", "nad: 0.200 (0.905)", "finetune: 0.100 (0.905)"],
        ["256", "?", "0.930", "2", "finetune: 0.900 (0.920)", "nad: 0.200 (0.905)", "not run"],
        ["272", "?", "0.930", "2", "finetune: 0.900 (0.920)", "nad: 0.200 (0.905)", "1 of 2 defenses run"]]
    write("154", [clean] + [row("nad", n, 0.0, 0.5) for n in (100, 500, 2000)])
    assert budget_table(tmp_path, models=[])[0][4:] == ["none keeps accuracy"] * 3


def test_probes_block_gives_each_probes_last_and_lowest_dssim_epoch_and_its_schedule(tmp_path):
    from bnbackdoor.report.readme_blocks import _probe_lr, probes

    (tmp_path / "results" / "probes").mkdir(parents=True)
    cfg = {"attack": "10155", "learning_rate": 7.5e-4, "loss_weight": 0.9125, "scale": None,
           "models_root": "results/probes/models", "lr_schedule": "exponential", "decay_rate": 0.9,
           "conv_lr_factor": 0.43}
    epochs = [{"epoch": e, "clean_accuracy": a, "attack_success_rate": 1.0, "untriggered_target_rate": u,
               "expl_dssim_to_target": t} for e, a, u, t in ((1, 0.5, 0.4, 0.3), (2, 0.8, 0.05, 0.1),
                                                               (3, 0.9, 0.01, 0.2))]
    (tmp_path / "results" / "probes" / "p.json").write_text(json.dumps(
        {"name": "p", "cfg": cfg, "examples_per_epoch": 5000, "epochs": epochs, "finished": False,
         "clean_model": {"test_accuracy": 0.9602}}))
    old = {k: v for k, v in cfg.items() if k not in ("lr_schedule", "decay_rate", "conv_lr_factor")}
    (tmp_path / "results" / "probes" / "q.json").write_text(json.dumps(  # before provenance and schedules
        {"name": "q", "cfg": {**old, "models_root": None, "scale": 2.3}, "examples_per_epoch": 5000,
         "epochs": epochs[:1]}))
    lines = [ln for ln in "\n".join(probes(tmp_path)).splitlines() if ln.startswith(("| p ", "| q "))]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert cells == [["p (stopped)", "10155", "results/probes/models (0.960)", "–", "0.00075 × 0.9 / epoch", "0.43", "0.9125",
                      "3 × 5,000", "0.900", "1.000", "0.010", "0.200", "0.100 (epoch 2, acc 0.800)"],
                     ["q", "10155", "models/", "2.3", "0.00075 / epoch", "1", "0.9125", "1 × 5,000", "0.500",
                      "1.000", "0.400", "0.300", "0.300 (epoch 1, acc 0.500)"]]
    assert [_probe_lr({"learning_rate": 1e-3, "lr_schedule": k, "decay_rate": d})
            for k, d in (("exponential", 1.0), ("inverse", 0.5))] == ["0.001 const", "0.001 / (1 + 0.5(e − 1))"]


def test_findings_block_gives_each_claim_its_verdict_per_regime_and_links(tmp_path):
    from bnbackdoor.report.readme_blocks import BN_CLAIM, _short_verdict, fill

    for i, m in (("154", metrics(defenses=defended(rebn_asr=0.95, aug_asr=0.1))),
                 ("156", metrics(defenses=defended(rebn_asr=0.95, aug_asr=0.1))),
                 ("GTSRBR20-badnets-10", scratch_metrics(0.05))):
        (tmp_path / "manipulated_models" / i).mkdir(parents=True)
        (tmp_path / "manipulated_models" / i / "metrics.json").write_text(json.dumps(m))
    out = fill("<!-- generated:findings -->\n<!-- /generated:findings -->\n", tmp_path)
    assert "no ablation yet" in out  # the title claim needs results/anatomy/; missing, it says which command
    (tmp_path / "results" / "anatomy").mkdir(parents=True)
    rows = [{"variant": "manipulated", "group": None, "attack_success_rate": 1.0}] + [
        {"variant": "restore", "group": g, "attack_success_rate": asr} for g, asr in (("bn_stats", 0.98),
                                                                                    ("bn_affine", 0.99))]
    (tmp_path / "results" / "anatomy" / "154_anatomy.json").write_text(json.dumps({"groups": {}, "rows": rows}))
    out = fill(out, tmp_path)
    assert "at least 80% of its (model, defense) rows pass" in out
    cells = {r[0]: r[1:] for r in ([c.strip() for c in ln.split("|")[1:-1]] for ln in out.splitlines()
                                   if ln.startswith("| "))}
    assert cells["claim (paper)"][:2] == ["explanation-aware fine-tuning", "poisoning from scratch"]
    assert cells[BN_CLAIM][0] == ("**does not hold**: with BN statistics or γ/β restored to the clean model's, attack "
                                  "success stays >= 0.980 (154; ablation)")
    cut = cells["Re-BN cuts attack success by a large margin"]
    assert cut[:2] == ["**holds only when** defense = rebn+augment (2/2); 2/4 rows pass in all",
                       "**holds** (2/2 rows pass)"]
    assert cut[2] == "[fine-tuning](docs/findings/protocols.md), [from scratch](docs/findings/poisoning.md)"
    assert cells["Re-BN restores explanations"][1].startswith("not judged in this regime")  # no target explanation
    assert fill(out, tmp_path) == out
    # a second dimension's conditions are left to RESULTS.md; the front page says there are more
    mixed = [Model("154", metrics(defenses=defended(rebn_asr=0.95, aug_asr=0.1))),
             Model("10154", metrics(dataset="gtsrb", defenses=defended(rebn_asr=0.1, aug_asr=0.1)))]
    rows = claim("Re-BN cuts attack success by a large margin").rows(mixed)
    assert claim_verdict(rows) == "holds only when defense = rebn+augment (2/2) or dataset = gtsrb (2/2)"
    assert _short_verdict(rows) == "**holds only when** defense = rebn+augment (2/2) or …; 3/4 rows pass in all"
    kept = [Model("154", metrics(defenses=defended(rebn_asr=0.95, aug_asr=0.95)))]
    assert _short_verdict(claim("Re-BN cuts attack success by a large margin").rows(kept)) == (
        "**does not hold** (0/2 rows pass)")
    assert _short_verdict([]) == "n/a"


def test_check_covers_the_docs_pages(tmp_path):
    """A stale table on a docs page fails --check like one in the README; writing fixes it."""
    page = tmp_path / "docs" / "findings" / "anatomy.md"
    page.parent.mkdir(parents=True)
    page.write_text("# Where\n\nprose kept\n<!-- generated:anatomy -->\nstale 9.999\n<!-- /generated:anatomy -->\n")
    cmd = [sys.executable, "scripts/make_results.py", "--root", str(tmp_path)]
    check = subprocess.run(cmd + ["--check"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 1 and "anatomy.md" in check.stderr
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).returncode == 0
    text = page.read_text()
    assert "9.999" not in text and "prose kept" in text and "no `results/anatomy/154_anatomy.json` yet" in text
    check = subprocess.run(cmd + ["--check"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0 and "docs/findings/anatomy.md" in check.stdout
