"""The measured tables of the README and the docs pages, generated from stored results (never typed by hand).

Each page of :data:`PAGES` (README.md, the docs/findings/ pages, docs/models.md, experimentsettings/README.md) holds
blocks between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` in its hand-written prose;
``fill(text, root)`` replaces each block's body with what :data:`BLOCKS` renders from the files under ``root``:

- ``findings``       the front page's one table: each claim of the paper with its verdict per regime (the rules of
                     RESULTS.md; the title claim from the ablation) and links to the findings pages;
- ``two-defenses``   the stored models the README names × (no defense, Re-BN, Re-BN augmented, test-batch BN at
                     f = 1 and f = 1/B), from ``manipulated_models/<id>/metrics.json``;
- ``anatomy``        the parameter-group ablation of 154 / 154bntrain / 256, from ``results/anatomy/<id>_anatomy.json``;
- ``update-shares``  the update figure's per-group medians and shares, from ``results/update_shares/*.json``;
- ``composition``    test-batch BN against the triggered share of a batch, from ``results/<id>_composition.json``;
- ``cam-fit``        the best DSSIM any Grad-CAM map of a given resolution reaches per target, from
                     ``results/cam_fit.json``;
- ``probes``         the issue-27 attack probes (experimentsettings/README.md), from ``results/probes/*.json``.
- ``detectors``      STRIP, SentiNet, Februus per stored attack and its clean base, from ``results/detectors_*.json``;
- ``disguise``       each attack with detector results beside its loss_weight 0 control (attack / control);
- ``finetune-bn``    plain fine-tuning with BN statistics following or frozen, at lr 0.01 and 0.001;
- ``disguise-defenses`` every defense at 500 clean images on the attacks a control stands for and on the control;
- ``budget``         the winning defense per stored comparison at 100, 500 and 2,000 clean images;
- ``poisoning``      every catalogue model poisoned from scratch: no defense, Re-BN, test-batch BN, the best
                     baseline of ``results/defenses_<id>.json`` and the ablation's "restore bn_stats / bn_affine"
                     rows of ``results/anatomy/<id>_anatomy.json``.

A source that is missing renders as one line saying which file and which command makes it, so no page ever shows a
number that is not on disk. ``scripts/make_results.py`` calls :func:`fill` on every page and ``--check`` fails when
one is out of date (``tests/test_results.py``); ``tests/test_docs_links.py`` checks that every block is on exactly
one page.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from .acceptance import is_scratch
from .labels import CLEAN_MODEL, MANIPULATED_MODEL, NO_DEFENSE, loss_label
from .results import (BUDGET_HEADERS, CLEAN, DETECTOR_HEADERS, DISGUISE_HEADERS, FINETUNE_BN_HEADERS, HOLD_SHARE,
                      LARGE_CUT, MANIPULATED, REGIMES, Model, Row, asr_acc, budget_table, claim_conditions, claim_holds,
                      claim_rows, comparison_winner, defense_control_tables, detector_table, disguise_table,
                      finetune_bn_table, fmt, load_models, read_stored_json, table)

STORED_IDS = ("154", "154bntrain", "256", "272")  # the stored models the README names (protocols issue)
ANATOMY_IDS = ("154", "154bntrain", "256")
STATES = ((CLEAN, CLEAN_MODEL), (MANIPULATED, NO_DEFENSE), ("rebn", "Re-BN"),
          ("rebn+augment", "Re-BN, augmented"), ("batchstats B=100 f=1", "test-batch BN, B=100, f=1"),
          ("batchstats B=100 f=1/B", "test-batch BN, B=100, f=1/B"))
STATE_COLUMNS = (("clean_accuracy", "clean acc"), ("attack_success_rate", "attack success"),
                 ("expl_dssim_to_target", "DSSIM→target"), ("expl_dssim_to_clean", "DSSIM→clean expl."))

_BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S)


def _read(path: Path) -> Any:
    return read_stored_json(path, _REBUILD.format(path=path)) if path.exists() else None


_REBUILD = ("rebuild it with the command on the README or docs/ page that writes it, or restore it "
            "(git checkout -- {path})")


def two_defenses(root: Path) -> list[str]:
    models = {m.id: m for m in load_models(root)}
    rows = []
    for mid in STORED_IDS:
        m: Model | None = models.get(mid)
        if m is None:
            rows.append([mid, "not shipped yet", *["n/a"] * len(STATE_COLUMNS)])
            continue
        for label, name in STATES:
            state = m.state(label)
            rows.append([mid, name, *[("n/a" if state is None else fmt(state.get(k))) for k, _ in STATE_COLUMNS]])
    return [table(rows, ["model", "state", *[h for _, h in STATE_COLUMNS]])]


def anatomy(root: Path) -> list[str]:
    out = []
    for mid in ANATOMY_IDS:
        path = root / "results" / "anatomy" / f"{mid}_anatomy.json"
        d = _read(path)
        if d is None:
            out += [f"*{mid}*: no `{path.relative_to(root)}` yet (`python scripts/locate_backdoor.py {mid} cpu "
                    f"--save_path results/anatomy`).", ""]
            continue
        ref = {r["variant"]: r for r in d["rows"] if r["group"] is None}
        by = {(r["variant"], r["group"]): r for r in d["rows"] if r["group"] is not None}
        rows = [[name, "", fmt(ref[v].get("clean_accuracy")), fmt(ref[v].get("attack_success_rate")),
                 fmt(ref[v].get("expl_dssim_to_target")), "", "", ""]
                for v, name in (("clean", CLEAN_MODEL), (MANIPULATED, MANIPULATED_MODEL)) if v in ref]
        for g in d["groups"]:
            r, o = by.get(("restore", g), {}), by.get(("only", g), {})
            rows.append([g, fmt(r.get("rel_change", o.get("rel_change")), 4),
                         fmt(r.get("clean_accuracy")), fmt(r.get("attack_success_rate")),
                         fmt(r.get("expl_dssim_to_target")),
                         fmt(o.get("clean_accuracy")), fmt(o.get("attack_success_rate")),
                         fmt(o.get("expl_dssim_to_target"))])
        out += [f"*{mid}* ({d.get('modeltype')}, attack `bn_mode` {d.get('bn_mode')}, {d.get('testing_size')} test "
                f"images; `{path.relative_to(root)}`):", "",
                table(rows, ["group G", "‖Δ‖/‖θ‖", "restore G: acc", "ASR", "DSSIM→target",
                             "only G: acc", "ASR", "DSSIM→target"]), ""]
    return out


def update_shares(root: Path) -> list[str]:
    folder = root / "results" / "update_shares"
    files = sorted(folder.glob("update_shares_*.json"))
    if not files:
        return [f"No `{folder.relative_to(root)}/update_shares_<bn_mode>.json` yet (commands above)."]
    out = []
    for path in files:
        panels = read_stored_json(path, _REBUILD.format(path=path))["panels"]
        rows = []
        for g in dict.fromkeys(g for p in panels.values() for g in p["groups"]):  # the figure's groups, in order
            cells = []
            for p in panels.values():
                s = p["groups"].get(g)
                cells.append("–" if s is None else "0 throughout" if s.get("zero_throughout") else
                             f"{fmt(s.get('median'), 5)} / {fmt(s.get('share'), 3)}")
            if any(c != "–" for c in cells):
                rows.append([g, *cells])
        out += [f"`{path.relative_to(root)}` (median per-step update ‖Δ‖ / share of the total squared update):", "",
                table(rows, ["group", *[f"{p['title']} ({p['steps']} steps)" for p in panels.values()]]), ""]
    scratch = folder / "update_shares_scratch.json"
    if not scratch.is_file():
        out.append(f"Not captured yet: `{scratch.relative_to(root)}` (training from scratch; commands above).")
    return out


def composition(root: Path) -> list[str]:
    files = sorted((root / "results").glob("*_composition.json"))
    if not files:
        return ["No `results/<id>_composition.json` yet (`python evaluate_attack_defense_metrics.py 154 --device "
                "cpu --datasize 5000 --batchsize 100 --composition --save_path results`)."]
    out = []
    for path in files:
        d = read_stored_json(path, _REBUILD.format(path=path))
        rows = [[p["test_batch"], p["fraction"], p["triggered_per_batch"], p["triggered_images"],
                 fmt(p.get("attack_success_rate")), fmt(p.get("clean_accuracy"))] for p in d["points"]]
        base = d.get("no_defense") or {}
        out += [f"attack {d['id']}, `{path.relative_to(root)}` (no defense: attack success "
                f"{fmt(base.get('attack_success_rate'))}, clean accuracy {fmt(base.get('clean_accuracy'))}):", "",
                table(rows, ["B", "f", "triggered per batch", "triggered images", "attack success",
                             "clean acc (all-clean batches)"]), ""]
    return out


def cam_fit(root: Path) -> list[str]:
    d = _read(root / "results" / "cam_fit.json")
    if d is None:
        return ["No `results/cam_fit.json` yet (`python scripts/cam_fit.py`)."]
    resolutions = sorted({r["resolution"] for r in d["rows"]})
    best = {(r["target"], r["resolution"]): r["best"] for r in d["rows"]}
    targets = list(dict.fromkeys(r["target"] for r in d["rows"]))
    rows = [[t, *[fmt(best.get((t, res))) for res in resolutions]] for t in targets]
    loss = loss_label(d["rows"][0]["loss"]) if d["rows"] else "loss"
    return [f"`{d['command']}` ({d['steps']} Adam steps per fit; `results/cam_fit.json`), best {loss} to the "
            "target:", "",
            table(rows, ["target", *[f"{r}×{r} map" for r in resolutions]])]


def _probe_lr(c: dict) -> str:
    """A probe's learning rate and schedule: '0.00075 const', '0.0015 × 0.9 / epoch', '0.0015 / epoch'."""
    lr, d = f"{c['learning_rate']:g}", c.get("decay_rate", 1.0)
    if c.get("lr_schedule", "inverse") == "inverse":  # lr / (1 + d (e - 1))
        return f"{lr} / epoch" if d == 1 else f"{lr} / (1 + {d:g}(e − 1))"
    return f"{lr} const" if d == 1 else f"{lr} × {d:g} / epoch"


def probes(root: Path) -> list[str]:
    files = sorted((root / "results" / "probes").glob("*.json"))
    if not files:
        return ["No `results/probes/*.json` yet (`python scripts/probe_attack.py NAME ...`)."]
    rows = []
    for f in files:
        d = _read(f)
        c, last = d["cfg"], d["epochs"][-1]
        scale = "–" if c.get("scale") is None else str(c["scale"])
        if c.get("head_scale") is not None:
            scale += f", head ×{c['head_scale']:g}"
        acc = (d.get("clean_model") or {}).get("test_accuracy")
        best = min(d["epochs"], key=lambda r: r["expl_dssim_to_target"])
        name = d["name"] if d.get("finished", True) else f"{d['name']} (stopped)"
        rows.append([name, c["attack"], (c.get("models_root") or "models/") + ("" if acc is None else
                                                                                    f" ({acc:.3f})"),
                     scale, _probe_lr(c), f"{c.get('conv_lr_factor') or 1:g}", f"{c['loss_weight']:g}",
                     f"{last['epoch']} × {d['examples_per_epoch']:,}", fmt(last["clean_accuracy"]),
                     fmt(last.get("attack_success_rate")), fmt(last.get("untriggered_target_rate")),
                     fmt(last["expl_dssim_to_target"]),
                     f"{fmt(best['expl_dssim_to_target'])} (epoch {best['epoch']}, acc {fmt(best['clean_accuracy'])})"])
    return ["Every probe starts from the ancestor's settings (`scripts/probe_attack.py`, `ANCESTOR_SETTINGS`: batch "
            "32, \"pairs\", z-scored maps, the prediction explained, Adam ε 1e-5, lr / epoch) and changes what its "
            "row says; scale = every conv→BN pair rescaled by that factor first (same function, larger weights; "
            "\"he\": each conv to √(2 / fan-in); head ×H: the classifier's logits H times larger, the same "
            "predictions); conv lr × = `conv_lr_factor`. Scored with `evaluate_attack` on 1,000 test images after "
            "every epoch; the row gives the last epoch and the epoch with the lowest DSSIM; \"stopped\": ended before "
            "its last epoch, once its course was clear "
            "(`results/probes/<name>.json` holds every epoch, the probe's command and its clean model's, whose "
            "test accuracy is in brackets):", "",
            table(rows, ["probe", "attack", "clean model", "scale", "lr", "conv lr ×", "λ", "epochs × examples",
                         "clean acc", "attack success", "untriggered → target", "DSSIM → target",
                         "lowest DSSIM"])]


def _scratch_ids(root: Path) -> list[str]:
    """The catalogue's poisoning-from-scratch ids (``regime`` "scratch" in experimentsettings/<id>.json); a grid that
    poisons nothing (the clean panel of the update figure, ``CIFAR10R20-badnets-0``) is no such model."""
    ids = []
    for path in sorted((root / "experimentsettings").glob("*.json")):
        d = _read(path)
        if (isinstance(d, dict) and is_scratch(d)
                and any(r > 0 for r in d.get("percentage_trigger_options", [d.get("percentage_trigger", 1)]))):
            ids.append(str(d.get("attack_id", path.stem)))
    return ids


def poisoning(root: Path) -> list[str]:
    models = {m.id: m for m in load_models(root)}
    rows, missing = [], []
    for mid in _scratch_ids(root):
        m = models.get(mid)
        if m is None:
            missing.append(mid)
            continue
        cmp = _read(root / "results" / f"defenses_{mid}.json")
        # the file's rows only: Re-BN and test-batch BN from metrics.json have their own columns, and test-batch BN
        # at f = 1 (every test image triggered) is no baseline a deployed model can run
        win = comparison_winner(cmp["rows"]) if cmp else None
        ana = _read(root / "results" / "anatomy" / f"{mid}_anatomy.json")
        restored = {r["group"]: r for r in (ana or {}).get("rows", []) if r.get("variant") == "restore"}
        best = ("not run" if cmp is None else "none keeps accuracy" if win is None else
                f"{win['defense']} ({win.get('clean_images')}): {asr_acc(win)}")
        rows.append([mid, m.arch, fmt(m.value(CLEAN, "clean_accuracy")), asr_acc(m.state(MANIPULATED)),
                     "yes" if m.verdict.accepted else "no", asr_acc(m.state("rebn")),
                     asr_acc(m.state("rebn+augment")), asr_acc(m.state("batchstats B=100 f=1")),
                     asr_acc(m.state("batchstats B=100 f=1/B")), best,
                     *[_restore_cell(ana, restored, g) for g in ("bn_stats", "bn_affine")]])
    out = ["Attack success (clean accuracy) per model trained from scratch on a poisoned set; `accepted`: clean "
           "accuracy within 2 points of the clean model's and attack success >= 0.9. Best baseline: the winner (rule "
           "in RESULTS.md) among the rows of `results/defenses_<id>.json`, the defenses run on 100 / 500 / 2,000 "
           "clean training images. Restore G: the ablation of `results/anatomy/` (the poisoned model with group G "
           "copied from the clean model - for a model trained from scratch an independently trained network, so "
           "these rows mix two networks). A model without BatchNorm has no such group (`no BN`), and there Re-BN and "
           "test-batch BN have no statistics to re-estimate: their cells repeat `no defense`.", "",
           table(rows, ["id", "model", "clean model acc", "no defense", "accepted", "Re-BN", "Re-BN augmented",
                        "test-batch BN f=1", "f=1/B", "best baseline", "restore bn_stats", "restore bn_affine"])]
    if missing:
        out += ["", "Not shipped yet: " + ", ".join(missing) + " (`BNBACKDOOR_ALLOW_LONG=1 python "
                "scripts/build_catalogue.py --ids <id> --promote cuda`)."]
    return out


def _restore_cell(ana: dict | None, restored: dict[str, dict], group: str) -> str:
    """One "restore <group>" cell of the poisoning table: the ablation row, or why there is none."""
    if ana is None:
        return "not run"
    if group not in ana.get("groups", {}):
        return "no BN"   # a BN-free model's ablation has convolution and classifier groups only
    return asr_acc(restored.get(group))


def _table_or(rows: list[list[str]], headers: list[str], missing: str) -> list[str]:
    """The table, or the one line saying which files are missing and what makes them."""
    return [table(rows, headers)] if rows else [missing]


def disguise(root: Path) -> list[str]:
    return _table_or(disguise_table(root), DISGUISE_HEADERS,
                     "No attack and its loss_weight 0 control both have `results/detectors_<id>.json` yet (command "
                     "above, for the attack and for its control, e.g. 154 and 154LW0).")


def disguise_defenses(root: Path) -> list[str]:
    tables = defense_control_tables(root)
    if not tables:
        return ["No loss_weight 0 control and an attack it controls both have `results/defenses_<id>.json` yet "
                "(`python scripts/compare_defenses.py 154LW0 cpu --clean-images 500 --save_path results`)."]
    out = []
    for headers, rows in tables:
        out += [table(rows, headers), ""]
    return out


def finetune_bn(root: Path) -> list[str]:
    return _table_or(finetune_bn_table(root), FINETUNE_BN_HEADERS,
                     "No `results/defenses_<id>.json` holds all four fine-tuning rows yet (`--defenses finetune,"
                     "finetune:freeze_bn_stats=true,finetune:lr=0.001,finetune:freeze_bn_stats=true:lr=0.001`).")


def budget(root: Path) -> list[str]:
    return _table_or(budget_table(root), BUDGET_HEADERS,
                     "No `results/defenses_<id>.json` has every one of its defenses at one of 100, 500 or 2,000 clean "
                     "images yet (`python scripts/compare_defenses.py <id> cpu --clean-images 100,500,2000 "
                     "--save_path results`).")


def detectors(root: Path) -> list[str]:
    return _table_or(detector_table(root)[0], DETECTOR_HEADERS, "No `results/detectors_<id>.json` yet (command above).")


# --------------------------------------------------------------------------------------- the front page's findings
FINDINGS = "docs/findings"  # the findings pages, relative to the repository root (the README links into them)
BN_CLAIM = "The backdoor lives in BatchNorm (the title)"
# Where each claim is read in full, per regime (relative to the README): fine-tuning, then poisoning from scratch.
CLAIM_PAGES = {BN_CLAIM: ("anatomy.md", "poisoning.md")}
DEFAULT_CLAIM_PAGES = ("protocols.md", "poisoning.md")
# The two regimes the paper's claims are contrasted in on the front page (the controls' verdicts: RESULTS.md).
FINDINGS_REGIMES = ("finetune", "scratch")


def _short_verdict(rows: list[Row]) -> str:
    """A front-page verdict: the verdict of RESULTS.md (the same rule) with, for "holds only when", the conditions of
    its first dimension only (RESULTS.md lists them all), and how many rows pass."""
    if not rows:
        return "n/a"
    passed = sum(r.passed for r in rows)
    if claim_holds(rows):
        return f"**holds** ({passed}/{len(rows)} rows pass)"
    conditions = claim_conditions(rows)
    if not conditions:
        return f"**does not hold** ({passed}/{len(rows)} rows pass)"
    first = [c for c in conditions if c.dim == conditions[0].dim]
    more = " or …" if len(first) < len(conditions) else ""
    return f"**holds only when** {' or '.join(map(str, first))}{more}; {passed}/{len(rows)} rows pass in all"


def _bn_ablation_cell(root: Path) -> str:
    """The title claim under fine-tuning, from the ablation (results/anatomy/): does restoring the BatchNorm
    statistics or affine parameters to the clean model's remove the backdoor? Judged with the threshold of "Re-BN
    cuts attack success by a large margin" (a relative cut of at least LARGE_CUT)."""
    cuts, after, ids = [], [], []
    for mid in ANATOMY_IDS:
        d = _read(root / "results" / "anatomy" / f"{mid}_anatomy.json")
        if d is None:
            continue
        manip = next((r for r in d["rows"] if r["group"] is None and r["variant"] == MANIPULATED), {})
        before = manip.get("attack_success_rate")
        for r in d["rows"]:
            if before and r["variant"] == "restore" and r["group"] in ("bn_stats", "bn_affine"):
                after.append(r["attack_success_rate"])
                cuts.append(1 - r["attack_success_rate"] / before)
        ids.append(mid)
    if not cuts:
        return "n/a (no ablation yet: `python scripts/locate_backdoor.py 154 cpu --save_path results/anatomy`)"
    passed = sum(c >= LARGE_CUT for c in cuts)
    verdict = ("**holds**" if passed >= HOLD_SHARE * len(cuts) else "**does not hold**" if passed == 0 else
               "**holds in part**")
    return (f"{verdict}: with BN statistics or γ/β restored to the clean model's, attack success stays "
            f">= {fmt(min(after))} ({', '.join(ids)}; ablation)")


def findings(root: Path) -> list[str]:
    """The front page's one table: each claim of the paper, its verdict per regime and where it is read."""
    models = load_models(root)
    by_claim: dict[str, dict[str, list[Row]]] = {}
    for c, regime, rows in claim_rows(models):
        by_claim.setdefault(c.name, {})[regime] = rows

    def links(name: str) -> str:
        ft, sc = CLAIM_PAGES.get(name, DEFAULT_CLAIM_PAGES)
        return f"[fine-tuning]({FINDINGS}/{ft}), [from scratch]({FINDINGS}/{sc})"

    rows = [[BN_CLAIM, _bn_ablation_cell(root),
             "not carried by the statistics: Re-BN leaves the backdoor (below); the ablation cannot tell (it mixes "
             "two independently trained networks)", links(BN_CLAIM)]]
    not_judged = "not judged in this regime (RESULTS.md, Claims)"  # e.g. no target explanation from scratch
    for name, per_regime in by_claim.items():
        verdicts = [_short_verdict(per_regime[r]) if r in per_regime else not_judged for r in FINDINGS_REGIMES]
        rows.append([name, *verdicts, links(name)])
    return [f"Judged on the accepted shipped models by the rules of [RESULTS.md](RESULTS.md#claims): a claim holds "
            f"when at least {HOLD_SHARE:.0%} of its (model, defense) rows pass (the full verdicts and every number are "
            "there).", "",
            table(rows, ["claim (paper)", *[REGIMES[r] for r in FINDINGS_REGIMES], "read"])]


BLOCKS: dict[str, Callable[[Path], list[str]]] = {"two-defenses": two_defenses, "anatomy": anatomy,
                                                   "update-shares": update_shares, "composition": composition,
                                                   "cam-fit": cam_fit, "probes": probes, "poisoning": poisoning,
                                                   "detectors": detectors, "disguise": disguise,
                                                   "disguise-defenses": disguise_defenses,
                                                   "finetune-bn": finetune_bn, "budget": budget,
                                                   "findings": findings}

# Every page with generated blocks, relative to the repository root: the front page, the pages the long generated
# sections moved to, and the catalogue page (the probes of issue 27). make_results.py fills and checks each.
PAGES = ("README.md", f"{FINDINGS}/protocols.md", f"{FINDINGS}/anatomy.md", f"{FINDINGS}/poisoning.md",
         f"{FINDINGS}/defenses.md", f"{FINDINGS}/detectors.md", "docs/models.md", "experimentsettings/README.md")


def fill(text: str, root: str | Path = ".") -> str:
    """``text`` (README.md) with every generated block re-rendered from the files under ``root``."""
    root = Path(root)

    def body(m: re.Match) -> str:
        render = BLOCKS.get(m.group("name"))
        if render is None:
            return m.group(0)
        lines = render(root)
        return m.group(1) + "\n".join(lines).rstrip("\n") + "\n" + m.group(4)

    return _BLOCK.sub(body, text)
