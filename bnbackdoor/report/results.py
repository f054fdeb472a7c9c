"""RESULTS.md from the shipped metrics only: per-model and per-group tables, acceptance, and the paper's claims.

Inputs (nothing else is read, no number is typed by hand):

* ``manipulated_models/<id>/metrics.json`` — ``clean_model`` and ``manipulated_model`` (``evaluate_attack`` keys),
  ``parameters``, and when present ``defenses``: ``{label: {"defense", "options", "seconds", "clean_images",
  <evaluate_attack keys>}}``;
* optionally ``results/defenses_<id>.json`` — the defense-comparison script's output: a list of rows (or
  ``{"rows": [...]}``) of ``defense, clean_images, clean_accuracy, attack_success_rate, expl_dssim_to_target,
  expl_dssim_to_clean, seconds``.

The output is deterministic: models sorted by id (numbers first), floats with fixed decimals, no dates.

**Claims.** Each claim of the paper is one :class:`Claim`: the models it is judged on (accepted runs only — a
backdoor that was never planted cannot be removed), a per-(model, defense) number and a pass rule. The verdict:
``holds`` when at least :data:`HOLD_SHARE` of the rows pass; otherwise ``holds only when <condition>`` for every
single condition (defense, dataset, model, attack kind, explanation method) under which at least
:data:`HOLD_SHARE` of the rows pass; otherwise ``does not hold``; ``n/a`` without rows.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from tabulate import tabulate

from .acceptance import RULES as ACCEPTANCE_RULES
from .labels import CLEAN_MODEL, MANIPULATED, NO_DEFENSE
from .schema import with_defaults
from .acceptance import (MAX_ACCURACY_DROP, Verdict, acceptance, is_control, is_full_disguise, is_label_changing,
                         is_scratch)

CLEAN = CLEAN_MODEL
# The regimes a claim is judged in separately: BatchNorm statistics can only carry a backdoor where they were
# learned from poisoned data (from scratch); explanation-aware fine-tuning mostly runs with them frozen; its
# loss_weight 0 controls are the same fine-tuning without the explanation term.
REGIMES = {"finetune": "explanation-aware fine-tuning", "scratch": "poisoning from scratch",
           "control": "fine-tuning without the explanation term (loss_weight 0 controls)"}
# The default defenses of metrics.json, in report order; other labels found follow, sorted.
DEFENSE_LABELS = ("rebn", "rebn+augment", "batchstats B=100 f=1", "batchstats B=100 f=1/B")
REBN = ("rebn", "rebn+augment")
BATCHSTATS_ALL, BATCHSTATS_ONE = "batchstats B=100 f=1", "batchstats B=100 f=1/B"
DEFENSE_FILES = "results/defenses_*.json"
DEFENSE_COLUMNS = ("defense", "clean_images", "clean_accuracy", "attack_success_rate", "expl_dssim_to_target",
                   "expl_dssim_to_clean", "seconds")

# Architectures without BatchNorm (the model registry's has_bn=False; tests/test_results.py keeps the two in step -
# this layer imports nothing of ours below it). Every claim is about a BatchNorm defense, which changes nothing there.
BN_FREE_ARCHS = frozenset({"resnet20_nbn", "vgg13", "vit_b_16"})

HOLD_SHARE = 0.8  # share of (model, defense) rows that must pass for a claim (or a condition) to hold
LARGE_CUT = 0.5  # "cuts attack success by a large margin": at least half of the manipulated model's success gone
RESTORED = 0.5  # "restores explanations": at least half of the way back to the clean model's distance to target
ABSORBED = 0.5  # "BN absorbs the trigger": all-triggered test batches remove >= 0.5 more success than 1 per batch


def _id_key(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name.lower())


def _num(d: Mapping[str, Any] | None, key: str) -> float | None:
    v = (d or {}).get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


# -------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class Model:
    id: str
    metrics: dict

    @property
    def params(self) -> dict:
        return self.metrics.get("parameters") or {}

    @property
    def dataset(self) -> str:
        return str(self.params.get("dataset", "?"))

    @property
    def arch(self) -> str:
        mt = str(self.params.get("modeltype", "?"))
        return mt.split("_", 1)[1] if mt.startswith(self.dataset + "_") else mt

    @property
    def has_bn(self) -> bool:
        return self.arch not in BN_FREE_ARCHS

    @property
    def kind(self) -> str:
        return str(self.params.get("attack_name", "?"))

    @property
    def method(self) -> str:
        return str(self.params.get("explanation_methodStr", "?"))

    @property
    def loss(self) -> str:
        return str(self.params.get("lossStr", "?"))

    @property
    def regime(self) -> str:
        return "scratch" if is_scratch(self.params) else "control" if is_control(self.params) else "finetune"

    @property
    def label_changing(self) -> bool:
        return is_label_changing(self.params)

    @property
    def full_disguise(self) -> bool:
        return is_full_disguise(self.params)

    @property
    def verdict(self) -> Verdict:
        return acceptance(self.metrics)

    def state(self, label: str) -> dict | None:
        """The evaluate_attack numbers of the clean model, the manipulated model or the model after a defense."""
        if label == CLEAN:
            return self.metrics.get("clean_model")
        if label == MANIPULATED:
            return self.metrics.get("manipulated_model")
        return (self.metrics.get("defenses") or {}).get(label)

    def value(self, label: str, key: str) -> float | None:
        return _num(self.state(label), key)


class StoredResultError(ValueError):
    """A stored result file that cannot be read (this layer imports nothing of ours below it: the scripts turn it
    into their one-line error). The message names the file, the cause and the folder to rebuild."""


def read_stored_json(path: Path, rebuild: str) -> Any:
    """A stored JSON result, decoded as UTF-8; damage is a :class:`StoredResultError` saying to ``rebuild``."""
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as e:
        cause = f"cannot read it: {e.strerror or e}"
    except UnicodeDecodeError as e:
        cause = f"not UTF-8 at byte {e.start}"
    except json.JSONDecodeError as e:
        cause = f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
    except RecursionError:
        cause = "nested too deeply"
    raise StoredResultError(f"{path} is damaged ({cause}); {rebuild}")


def load_models(root: str | Path = ".") -> list[Model]:
    """Every ``manipulated_models/*/metrics.json`` under ``root``, sorted by id (a damaged one:
    :class:`StoredResultError` naming the run folder to rebuild)."""
    out = []
    for path in (Path(root) / "manipulated_models").glob("*/metrics.json"):
        folder = path.parent
        rebuild = (f"rebuild the run folder {folder} (python scripts/build_catalogue.py --ids {folder.name} cpu, "
                   "or restore it with git checkout)")
        d = read_stored_json(path, rebuild)
        if not isinstance(d, dict):
            raise StoredResultError(f"{path} holds {type(d).__name__}, not a metrics object; {rebuild}")
        out.append(Model(folder.name, d))
    return sorted(out, key=lambda m: _id_key(m.id))


def defense_labels(models: Iterable[Model]) -> list[str]:
    found = {k for m in models for k in (m.metrics.get("defenses") or {})}
    return list(DEFENSE_LABELS) + sorted(found - set(DEFENSE_LABELS))


# -------------------------------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class Row:
    model: Model
    defense: str
    value: float
    passed: bool


@dataclass(frozen=True)
class Claim:
    name: str  # the paper's claim
    quantity: str  # what our number is
    rule: str  # when one (model, defense) row passes
    defenses: tuple[str, ...]
    applies: Callable[[Model], bool]
    value: Callable[[Model, str], float | None]
    passes: Callable[[float], bool]
    regimes: tuple[str, ...] = tuple(REGIMES)  # where the claim can be judged at all

    def rows(self, models: Iterable[Model]) -> list[Row]:
        out = []
        for m in models:
            if not self.applies(m):
                continue
            for d in self.defenses:
                v = self.value(m, d)
                if v is not None:
                    out.append(Row(m, d, v, self.passes(v)))
        return out


def _relative_cut(m: Model, d: str) -> float | None:
    before, after = m.value(MANIPULATED, "attack_success_rate"), m.value(d, "attack_success_rate")
    return None if before is None or after is None or before <= 0 else 1 - after / before


def _accuracy_change(m: Model, d: str) -> float | None:
    clean, after = m.value(CLEAN, "clean_accuracy"), m.value(d, "clean_accuracy")
    return None if clean is None or after is None else after - clean


def _restored_share(m: Model, d: str) -> float | None:
    clean, manip = m.value(CLEAN, "expl_dssim_to_target"), m.value(MANIPULATED, "expl_dssim_to_target")
    after = m.value(d, "expl_dssim_to_target")
    if clean is None or manip is None or after is None or clean - manip <= 0:
        return None
    return (after - manip) / (clean - manip)


def _absorbed(m: Model, d: str) -> float | None:
    one, full = m.value(BATCHSTATS_ONE, "attack_success_rate"), m.value(BATCHSTATS_ALL, "attack_success_rate")
    return None if one is None or full is None else one - full


CLAIMS: tuple[Claim, ...] = (
    Claim("BN absorbs the trigger",
          "attack success with one triggered image per test batch minus with every image triggered "
          "(test-batch BN, B = 100)",
          f"the difference is >= {ABSORBED:g}: batch statistics of triggered batches absorb the trigger's shift",
          (f"{BATCHSTATS_ONE} minus f=1",), lambda m: m.label_changing, _absorbed, lambda v: v >= ABSORBED),
    Claim("Re-BN restores accuracy",
          "clean accuracy after the defense minus the clean model's",
          f"the change is >= -{MAX_ACCURACY_DROP:g} (within {MAX_ACCURACY_DROP * 100:g} points of the clean model)",
          REBN, lambda m: True, _accuracy_change, lambda v: v >= -MAX_ACCURACY_DROP - 1e-9),
    Claim("Re-BN restores explanations",
          "share of the way back from the manipulated to the clean model's DSSIM to the target explanation "
          "(triggered inputs; full disguise excluded: its target is the clean explanation)",
          f"the share is >= {RESTORED:g}",
          REBN, lambda m: not m.full_disguise, _restored_share, lambda v: v >= RESTORED,
          regimes=("finetune",)),  # a model poisoned from scratch has no target explanation
    Claim("Re-BN cuts attack success by a large margin",
          "relative cut of attack success, 1 - after / manipulated",
          f"the cut is >= {LARGE_CUT:g}",
          REBN, lambda m: m.label_changing, _relative_cut, lambda v: v >= LARGE_CUT),
    Claim("Test-batch BN cuts attack success",
          "relative cut of attack success, 1 - after / manipulated (B = 100; f = share of each test batch triggered)",
          f"the cut is >= {LARGE_CUT:g}",
          (BATCHSTATS_ALL, BATCHSTATS_ONE), lambda m: m.label_changing, _relative_cut, lambda v: v >= LARGE_CUT),
)

# Dimensions a "holds only when" condition may name, with how to read them off a row.
CONDITIONS: tuple[tuple[str, Callable[[Row], str]], ...] = (
    ("defense", lambda r: r.defense), ("dataset", lambda r: r.model.dataset), ("model", lambda r: r.model.arch),
    ("attack", lambda r: r.model.kind), ("explanation", lambda r: r.model.method),
)


def _share(rows: list[Row]) -> float:
    return sum(r.passed for r in rows) / len(rows)


@dataclass(frozen=True)
class Condition:
    """One single condition under which a claim holds: ``dim = value``, with its passing rows of all its rows."""
    dim: str
    value: str
    passed: int
    total: int

    def __str__(self) -> str:
        return f"{self.dim} = {self.value} ({self.passed}/{self.total})"


def claim_conditions(rows: list[Row]) -> list[Condition]:
    """Every single condition (in :data:`CONDITIONS` order) under which at least :data:`HOLD_SHARE` of the rows pass;
    a dimension with one value everywhere is no condition."""
    out = []
    for dim, get in CONDITIONS:
        values = sorted({get(r) for r in rows})
        if len(values) < 2:
            continue
        for v in values:
            sub = [r for r in rows if get(r) == v]
            if _share(sub) >= HOLD_SHARE:
                out.append(Condition(dim, v, sum(r.passed for r in sub), len(sub)))
    return out


def claim_holds(rows: list[Row]) -> bool:
    """Whether a claim holds outright: at least :data:`HOLD_SHARE` of its rows pass."""
    return bool(rows) and _share(rows) >= HOLD_SHARE


def claim_verdict(rows: list[Row]) -> str:
    """holds / holds only when (conditions) / does not hold / n/a — the rule of the module docstring."""
    if not rows:
        return "n/a (no accepted model has these numbers)"
    if claim_holds(rows):
        return "holds"
    conditions = claim_conditions(rows)
    return "holds only when " + " or ".join(map(str, conditions)) if conditions else "does not hold"


def claim_number(rows: list[Row], defenses: tuple[str, ...]) -> str:
    parts = []
    for d in defenses:
        sub = [r for r in rows if r.defense == d]
        if sub:
            parts.append(f"{d}: mean {statistics.fmean(r.value for r in sub):.3f}, "
                         f"{sum(r.passed for r in sub)}/{len(sub)} pass")
        else:
            parts.append(f"{d}: n/a")
    return "; ".join(parts)


def claim_rows(models: list[Model]) -> list[tuple[Claim, str, list[Row]]]:
    """(claim, regime, its rows) per claim and regime (fine-tuning first) that has shipped models: a claim may hold in
    one regime and not in the other. Models without BatchNorm are left out: Re-BN and test-batch BN are no-ops
    there, and their rows would pass or fail the claims by construction."""
    accepted = [m for m in models if m.verdict.accepted and m.has_bn]
    present = {m.regime for m in models}
    return [(c, regime, c.rows(m for m in accepted if m.regime == regime))
            for c in CLAIMS for regime in c.regimes if regime in present]


def claims_table(models: list[Model]) -> list[list[str]]:
    """RESULTS.md's claims table: one row per :func:`claim_rows` entry."""
    return [[c.name, REGIMES[regime], claim_number(rows, c.defenses), claim_verdict(rows)]
            for c, regime, rows in claim_rows(models)]


def regime_counts(models: list[Model]) -> str:
    """``46 of 76 explanation-aware fine-tuning, 2 of 8 poisoning from scratch``: accepted of shipped, per regime."""
    parts = []
    for regime, name in REGIMES.items():
        ms = [m for m in models if m.regime == regime]
        if ms:
            parts.append(f"{sum(m.verdict.accepted for m in ms)} of {len(ms)} {name}")
    return ", ".join(parts) or "none"


# ------------------------------------------------------------------------------------------------ rendering
def table(rows: list[list[Any]], headers: list[str]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def _asr_cell(m_or_vals: Any, label: str | None = None) -> str:
    asr, utr = m_or_vals if label is None else (m_or_vals.value(label, "attack_success_rate"),
                                                m_or_vals.value(label, "untriggered_target_rate"))
    return "n/a" if asr is None else f"{asr:.3f} ({fmt(utr)})"


METRIC_TABLES: tuple[tuple[str, str, str], ...] = (
    ("Clean accuracy", "clean_accuracy", "Test images without trigger, vs their labels"),
    ("Attack success (untriggered target rate)", "attack_success_rate",
     "Triggered test images whose label is not the target, classified as the target; in brackets the same share "
     "on the same images without the trigger (a defense that sends everything to the target has collapsed)"),
    ("DSSIM to the target explanation", "expl_dssim_to_target", "Triggered inputs; lower = closer to the target"),
    ("DSSIM to the clean model's explanation", "expl_dssim_to_clean", "Clean inputs; 0 = the clean model's map"),
)
MODEL_HEADERS = ["id", "dataset", "model", "attack", "method", "loss"]


def _cell(m: Model, label: str, key: str) -> str:
    return _asr_cell(m, label) if key == "attack_success_rate" else fmt(m.value(label, key))


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _groups(models: list[Model]) -> list[tuple[tuple[str, str, str], list[Model]]]:
    groups: dict[tuple[str, str, str], list[Model]] = {}
    for m in models:
        groups.setdefault((m.dataset, m.arch, m.kind), []).append(m)
    return sorted(groups.items())


def acceptance_section(models: list[Model]) -> list[str]:
    rows = []
    for m in models:
        v = m.verdict
        rows.append([m.id, m.dataset, m.arch, m.kind, m.method, m.loss,
                     f"{fmt(m.value(CLEAN, 'clean_accuracy'))} → {fmt(m.value(MANIPULATED, 'clean_accuracy'))}",
                     fmt(m.value(MANIPULATED, "attack_success_rate")),
                     f"{fmt(m.value(CLEAN, 'expl_dssim_to_target'))} → "
                     f"{fmt(m.value(MANIPULATED, 'expl_dssim_to_target'))}",
                     v.summary()])
    n_ok = sum(m.verdict.accepted for m in models)
    return ["## Acceptance", "",
            f"{n_ok} of {len(models)} models accepted ({regime_counts(models)}). Rules: "
            + "; ".join(ACCEPTANCE_RULES) + ".", "",
            table(rows, MODEL_HEADERS + ["clean acc (clean → manipulated)", "attack success",
                                         "DSSIM to target (clean → manipulated)", "verdict"]), ""]


def per_model_section(models: list[Model], labels: list[str]) -> list[str]:
    out = ["## Per model, before and after each defense", ""]
    for title, key, what in METRIC_TABLES:
        rows = [[m.id, m.dataset, m.arch, m.kind, m.method, m.loss] + [_cell(m, s, key) for s in labels]
                for m in models]
        out += [f"### {title}", "", f"{what}.", "", table(rows, MODEL_HEADERS + labels), ""]
    return out


def means_section(models: list[Model], labels: list[str]) -> list[str]:
    """Means per group, with the accepted and the non-accepted runs of a group in separate rows: a run that missed
    acceptance (e.g. an attack whose explanation never moved) would otherwise pull a group's numbers towards the
    clean model's and make a defense look better or worse than it is on a working backdoor."""
    out = ["## Means per dataset, model and attack kind", "",
           "Mean over the models of the group that have the number; the accepted runs and the runs that missed "
           "acceptance (see Acceptance) are averaged in separate rows, never together (runs = how many).", ""]
    for title, key, _ in METRIC_TABLES:
        rows = []
        for (dataset, arch, kind), group in _groups(models):
            for accepted in (True, False):
                ms = [m for m in group if m.verdict.accepted == accepted]
                if not ms:
                    continue
                cells = []
                for s in labels:
                    if key == "attack_success_rate":
                        cells.append(_asr_cell((_mean(m.value(s, key) for m in ms),
                                                _mean(m.value(s, "untriggered_target_rate") for m in ms))))
                    else:
                        cells.append(fmt(_mean(m.value(s, key) for m in ms)))
                rows.append([dataset, arch, kind, f"{len(ms)} {'accepted' if accepted else 'not accepted'}"]
                            + cells)
        out += [f"### {title}", "", table(rows, ["dataset", "model", "attack", "runs"] + labels), ""]
    return out


def _bn_free_note(models: list[Model]) -> str:
    free = [m.id for m in models if not m.has_bn]
    if not free:
        return ""
    return (f"Models without BatchNorm ({', '.join(free)}) are left out: Re-BN and test-batch BN have no statistics "
            "to re-estimate there, so their rows would repeat no defense.")


def claims_section(models: list[Model]) -> list[str]:
    out = ["## Claims", "",
           f"Judged on the accepted models ({regime_counts(models)}), separately per regime: a model "
           "trained from scratch on a poisoned set learned its BatchNorm statistics from the poison, an "
           "explanation-aware fine-tuning attack mostly ran with them frozen (`bn_mode` eval). A claim **holds** when "
           f"at least {HOLD_SHARE:.0%} of its "
           "(model, defense) rows pass; otherwise it **holds only when** a single condition (defense, dataset, "
           f"model, attack kind or explanation method) has at least {HOLD_SHARE:.0%} passing rows; otherwise it "
           "**does not hold**; n/a when no accepted model has the numbers. " + _bn_free_note(models), "",
           table(claims_table(models), ["claim (paper)", "regime", "our number", "verdict"]), "",
           "Rules per claim:", ""]
    for c in CLAIMS:
        out.append(f"- **{c.name}** — number: {c.quantity}; judged on: {', '.join(c.defenses)}; "
                   f"a row passes when {c.rule}.")
    return out + [""]


def load_defense_files(root: str | Path = ".") -> list[tuple[str, list[dict]]]:
    out = []
    for path in (Path(root)).glob(DEFENSE_FILES):
        d = read_stored_json(path, f"rebuild it with python scripts/compare_defenses.py {path.stem[len('defenses_'):]} "
                                   "cpu --save_path results (or restore it with git checkout)")
        rows = d.get("rows", []) if isinstance(d, dict) else d
        out.append((path.stem[len("defenses_"):], [r for r in rows if isinstance(r, dict)]))
    return sorted(out, key=lambda t: _id_key(t[0]))


WIN_ACCURACY_DROP = MAX_ACCURACY_DROP  # a defense "wins" only among rows that keep clean accuracy within 3 points


def comparison_rows(rows: list[dict], model: Model | None) -> list[dict]:
    """The comparison file's rows, then the defenses of the model's own metrics.json (Re-BN on 5,000 images, Re-BN
    augmented, test-batch BN) that the file does not hold, so that one table has every row the paper discusses."""
    out = [dict(r) for r in rows]
    have = {(r.get("defense"), r.get("clean_images")) for r in out}
    for label in DEFENSE_LABELS:
        state = model.state(label) if model else None
        if state is None:
            continue
        if (label, state.get("clean_images")) in have:
            continue
        out.append({**state, "defense": label})
    return out


def comparison_winner(rows: list[dict]) -> dict | None:
    """The rule (fixed before any number was seen): among the defense rows (not the clean model / no defense) whose
    clean accuracy is within 3 points of the clean model's, the lowest attack success; ties go to the lower DSSIM to
    the clean model's explanation, then the fewer seconds. None if no row qualifies."""
    ref = next((r for r in rows if r.get("defense") == CLEAN), None)
    base = _num(ref, "clean_accuracy")
    cands = [r for r in rows if r.get("defense") not in (CLEAN, NO_DEFENSE)
             and _num(r, "attack_success_rate") is not None and _num(r, "clean_accuracy") is not None
             and (base is None or _num(r, "clean_accuracy") >= base - WIN_ACCURACY_DROP)]
    if not cands:
        return None
    return min(cands, key=lambda r: (_num(r, "attack_success_rate"), _num(r, "expl_dssim_to_clean") or 0.0,
                                     _num(r, "seconds") or 0.0))


def defense_comparison_section(root: str | Path = ".", models: list[Model] | None = None) -> list[str]:
    files = load_defense_files(root)
    out = ["## Defense comparison", ""]
    if not files:
        return out + [f"No `{DEFENSE_FILES}` yet (written by the defense-comparison script).", ""]
    by_id = {m.id: m for m in (models if models is not None else load_models(root))}
    out += ["`python scripts/compare_defenses.py <id>… cpu --clean-images 500 --save_path results`: every baseline "
            "on the same clean **training** images (the defender's data), measured on the attack's own test images; "
            "rows from the model's `metrics.json` (Re-BN on 5,000 images, Re-BN augmented, test-batch BN; "
            "`clean_images` 0 = no clean data) complete each table. **Winner** (rule fixed in advance): among the "
            "defenses that keep clean accuracy within 3 points of the clean model's, the lowest attack success; ties "
            "to the lower DSSIM to the clean explanation, then the fewer seconds. Test-batch BN with f = 1 needs "
            "test batches that are entirely triggered, which a deployed model does not get; f = 1/B is one "
            "triggered image per batch.", ""]
    summary = []
    for attack_id, rows in files:
        m = by_id.get(attack_id)
        rows = comparison_rows(rows, m)
        rows_out = []
        for r in rows:
            cells = []
            for k in DEFENSE_COLUMNS:
                v = r.get(k)
                if k in ("defense", "clean_images"):
                    cells.append("n/a" if v is None else str(v))
                else:
                    cells.append(fmt(_num(r, k), 1 if k == "seconds" else 3))
            rows_out.append(cells)
        win = comparison_winner(rows)
        none = next((r for r in rows if r.get("defense") == NO_DEFENSE), None)
        summary.append([attack_id, m.kind if m else "?", m.method if m else "?",
                        fmt(_num(none, "attack_success_rate")),
                        "none qualifies" if win is None else f"{win['defense']} ({win.get('clean_images')})",
                        fmt(_num(win, "attack_success_rate")), fmt(_num(win, "clean_accuracy"))])
        out += [f"### {attack_id} (`results/defenses_{attack_id}.json`)", "",
                table(rows_out, list(DEFENSE_COLUMNS)), ""]
    out[4:4] = ["### Winners", "", table(summary, ["id", "attack", "method", "attack success, no defense",
                                                   "winner (clean images)", "its attack success",
                                                   "its clean accuracy"]), ""]
    return out


DETECTOR_FILES = "results/detectors_*.json"
DETECTOR_HEADERS = ["id", "attack", "model", "detector", "attack success", "detection rate (triggered)",
                    "FPR (clean test)", "IoU with trigger", "after Februus: attack success", "clean acc (before → after)"]


def asr_acc(state: Mapping[str, Any] | None) -> str:
    """"attack success (clean accuracy)" of one stored state or defense row; "diverged" for a row that diverged."""
    if not state:
        return "n/a"
    if state.get("diverged"):
        return "diverged"
    return f"{fmt(_num(state, 'attack_success_rate'))} ({fmt(_num(state, 'clean_accuracy'))})"


def _read_detector_file(path: Path, attack_id: str) -> Any:
    return read_stored_json(path, f"rebuild it with python scripts/compare_detectors.py {attack_id} cpu "
                                  "--save_path results (or restore it with git checkout)")


def detector_table(root: str | Path = ".", models: list[Model] | None = None) -> tuple[list[list[str]], dict]:
    """One row per (stored attack, model, detector) of ``results/detectors_<id>.json`` (written by
    ``scripts/compare_detectors.py``), and the first file's settings (test images, defender data, FPR target)."""
    by_id = {m.id: m for m in (models if models is not None else load_models(root))}
    rows, settings = [], {}
    for path in sorted(Path(root).glob(DETECTOR_FILES), key=lambda p: _id_key(p.stem[len("detectors_"):])):
        attack_id = path.stem[len("detectors_"):]
        d = _read_detector_file(path, attack_id)
        settings = settings or {k: d.get(k) for k in ("test", "defender_data", "fpr_target")}
        m = by_id.get(attack_id)
        for r in d.get("rows", []):
            after = "n/a" if _num(r, "attack_success_after") is None else fmt(_num(r, "attack_success_after"))
            acc = (fmt(_num(r, "clean_accuracy")) if _num(r, "clean_accuracy_after") is None else
                   f"{fmt(_num(r, 'clean_accuracy'))} → {fmt(_num(r, 'clean_accuracy_after'))}")
            calibrated = r.get("calibrated", True)
            rows.append([attack_id, m.kind if m else "?", str(r.get("model")), str(r.get("detector")),
                         fmt(_num(r, "attack_success")),
                         fmt(_num(r, "detection_rate")) if calibrated else "n/a (no threshold)",
                         fmt(_num(r, "fpr")) if calibrated else "n/a", fmt(_num(r, "iou")), after, acc])
    return rows, settings


# Parameters that reach training only through the explanation term, and names: with loss_weight 0 none of them can
# change the model (tests/test_finetune.py), so one control stands for every attack that matches it elsewhere.
EXPLANATION_TERM_FIELDS = ("explanation_methodStr", "lossStr", "targetStrs", "loss_agg", "map_norm", "explain_class")
_NAME_FIELDS = ("id", "attack_id", "gs_id", "attack_name", "loss_weight")


def _training_key(params: Mapping[str, Any]) -> dict:
    return {k: v for k, v in with_defaults(params).items() if k not in EXPLANATION_TERM_FIELDS + _NAME_FIELDS}


def control_of(m: Model, models: Iterable[Model]) -> Model | None:
    """The shipped loss_weight 0 control that trains exactly like the explanation-aware attack ``m`` with its
    explanation term switched off (same trigger, target class, data, budget, base model), or None."""
    if m.regime != "finetune":
        return None
    key = _training_key(m.params)
    return next((c for c in models if c.regime == "control" and _training_key(c.params) == key), None)


def _detector_rows(root: Path, attack_id: str) -> dict[str, dict] | None:
    """``detector -> row`` of the manipulated model in ``results/detectors_<id>.json``, or None without the file."""
    path = root / DETECTOR_FILES.replace("*", attack_id)
    if not path.is_file():
        return None
    d = _read_detector_file(path, attack_id)
    return {r.get("detector"): r for r in d.get("rows", []) if r.get("model") == "manipulated"}


DISGUISE_HEADERS = ["attack", "kind", "method", "control", "clean acc", "attack success", "STRIP detects",
                    "SentiNet detects", "SentiNet IoU", "after Februus: attack success"]


def disguise_table(root: str | Path = ".", models: list[Model] | None = None) -> list[list[str]]:
    """Each explanation-aware attack with detector results beside its loss_weight 0 control: every cell is
    "attack / control", so a row reads what the explanation term buys against the detectors and what it costs."""
    root = Path(root)
    models = models if models is not None else load_models(root)
    dets = {m.id: d for m in models if (d := _detector_rows(root, m.id)) is not None}  # each file read once

    def values(x: Model) -> list[float | None]:
        d = dets[x.id]
        return [x.value(MANIPULATED, "clean_accuracy"), x.value(MANIPULATED, "attack_success_rate"),
                _num(d.get("strip"), "detection_rate"), _num(d.get("sentinet"), "detection_rate"),
                _num(d.get("sentinet"), "iou"), _num(d.get("februus"), "attack_success_after")]
    rows = []
    for m in models:
        c = control_of(m, models)
        if m.id in dets and c is not None and c.id in dets:
            rows.append([m.id, m.kind, m.method, c.id]
                        + [f"{fmt(a)} / {fmt(b)}" for a, b in zip(values(m), values(c))])
    return rows


def defense_control_tables(root: str | Path = ".", models: list[Model] | None = None, clean_images: int = 500
                           ) -> list[tuple[list[str], list[list[str]]]]:
    """Per control with a defense comparison: (headers, rows) of every defense at ``clean_images`` clean images on
    the attacks it controls (those with a comparison too) and on the control itself; cells "attack success (clean
    accuracy)", so a row reads whether the explanation term also changes what a defense removes."""
    root = Path(root)
    models = models if models is not None else load_models(root)
    files = dict(load_defense_files(root))
    out = []
    for c in (m for m in models if m.regime == "control" and m.id in files):
        attacks = [m for m in models if m.id in files and control_of(m, models) is c]
        if not attacks:
            continue
        cols = attacks + [c]
        cells: dict[str, dict[str, str]] = {}
        for m in cols:
            for r in files[m.id]:
                if r.get("defense") == CLEAN or r.get("clean_images") not in (None, clean_images):
                    continue
                cells.setdefault(str(r.get("defense")), {})[m.id] = asr_acc(r)
        rows = [[d] + [cells[d].get(m.id, "n/a") for m in cols] for d in cells]
        out.append((["defense"] + [f"{m.id} ({m.kind})" for m in cols], rows))
    return out


BUDGET_SIZES = (100, 500, 2000)  # the clean-image budgets issue 25 asks every defense at


def budget_table(root: str | Path = ".", models: list[Model] | None = None, sizes: tuple[int, ...] = BUDGET_SIZES
                 ) -> list[list[str]]:
    """Per stored comparison: the winner (:func:`comparison_winner`) at each clean-image budget among the plain
    defenses (registry names, no options), "defense: attack success (clean accuracy)". Like with like: a budget
    counts only when every plain defense the file holds at any budget ran at it; otherwise its cell says how many
    did ("not run" for none). A comparison with no complete budget is left out."""
    by_id = {m.id: m for m in (models if models is not None else load_models(root))}
    out = []
    for attack_id, rows in load_defense_files(root):
        ref = [r for r in rows if r.get("defense") == CLEAN]
        plain = {n: [r for r in rows if r.get("clean_images") == n and " " not in str(r.get("defense"))]
                 for n in sizes}
        every = set().union(*({r.get("defense") for r in plain[n]} for n in sizes))
        cells, complete = [], 0
        for n in sizes:
            ran = {r.get("defense") for r in plain[n]}
            if ran != every:
                cells.append(f"{len(ran)} of {len(every)} defenses run" if ran else "not run")
                continue
            complete += 1
            win = comparison_winner(ref + plain[n])
            cells.append("none keeps accuracy" if win is None else f"{win['defense']}: {asr_acc(win)}")
        if not every or not complete:
            continue
        m = by_id.get(attack_id)
        out.append([attack_id, m.kind if m else "?", fmt(_num(ref[0] if ref else None, "clean_accuracy")),
                    str(len(every))] + cells)
    return out


BUDGET_HEADERS = ["id", "attack", "clean model acc", "defenses"] + [f"winner at {n} clean images" for n in BUDGET_SIZES]


# Weights vs statistics: plain fine-tuning with BatchNorm statistics following the clean batches or frozen, at the
# baselines' learning rate and a tenth of it (the row labels compare_defenses.py stores for these specs).
FINETUNE_BN_GRID = (("0.01", "finetune", "finetune freeze_bn_stats=True"),
                    ("0.001", "finetune lr=0.001", "finetune lr=0.001 freeze_bn_stats=True"))
FINETUNE_BN_HEADERS = ["id", "attack", "lr", "statistics follow the clean batches", "statistics frozen"]


def finetune_bn_table(root: str | Path = ".", models: list[Model] | None = None, clean_images: int = 500
                      ) -> list[list[str]]:
    """Per stored comparison with all four fine-tuning rows at ``clean_images``: attack success (clean accuracy) with
    the statistics following and frozen, per learning rate."""
    by_id = {m.id: m for m in (models if models is not None else load_models(root))}
    out = []
    for attack_id, rows in load_defense_files(root):
        got = {r.get("defense"): r for r in rows if r.get("clean_images") == clean_images}
        if not all(label in got for _, *labels in FINETUNE_BN_GRID for label in labels):
            continue
        kind = by_id[attack_id].kind if attack_id in by_id else "?"
        out += [[attack_id, kind, lr, asr_acc(got[follow]), asr_acc(got[frozen])]
                for lr, follow, frozen in FINETUNE_BN_GRID]
    return out


def detectors_section(root: str | Path = ".", models: list[Model] | None = None) -> list[str]:
    rows, settings = detector_table(root, models)
    out = ["## Detectors", ""]
    if not rows:
        return out + [f"No `{DETECTOR_FILES}` yet (`python scripts/compare_detectors.py <id> cpu --save_path "
                      "results`).", ""]
    test = settings.get("test") or {}
    return out + [f"`python scripts/compare_detectors.py <id> cpu --testing-size {test.get('images')} --save_path "
                  f"results` on {test.get('images')} test images; thresholds at a {settings.get('fpr_target')} "
                  "false-positive rate on clean **training** images the defender holds out "
                  f"({(settings.get('defender_data') or {}).get('images')} in all). Detection rate: triggered test "
                  "images flagged; FPR: clean test images flagged; IoU: the located region against the trigger's "
                  "pixels (evaluation only, never given to a detector); the clean base model is the control.", "",
                  table(rows, DETECTOR_HEADERS), ""] + disguise_section(root, models)


def disguise_section(root: str | Path = ".", models: list[Model] | None = None) -> list[str]:
    rows = disguise_table(root, models)
    if not rows:
        return []
    return ["### Does the disguise fool the detectors? Each attack / its loss_weight 0 control", "",
            "The control is the same fine-tuning (trigger, target class, data, budget, base model) without the "
            "explanation term; one control serves every attack that differs from it only in the explanation "
            "method, loss or target (`control_of`). Cells: attack / control; detection at the thresholds above "
            "(the cost of the explanation term in compute is a step ratio, `benchmarks/README.md`).", "",
            table(rows, DISGUISE_HEADERS), ""]


def render(root: str | Path = ".") -> str:
    """The full RESULTS.md text for the repository at ``root``."""
    models = load_models(root)
    labels = [CLEAN, MANIPULATED] + defense_labels(models)
    lines = ["# Results", "",
             "Generated by `python scripts/make_results.py` from `manipulated_models/*/metrics.json` (and "
             f"`{DEFENSE_FILES}` when present); do not edit by hand — `tests/test_results.py` fails when this file "
             "is out of date.", "",
             f"{len(models)} manipulated model(s): " + ", ".join(m.id for m in models) + ". "
             "States: the clean base model, the manipulated model, and the manipulated model after each defense "
             "(n/a where its `metrics.json` has no such section). Numbers are on each run's own test images.", ""]
    lines += claims_section(models)
    lines += acceptance_section(models)
    lines += means_section(models, labels)
    lines += per_model_section(models, labels)
    lines += defense_comparison_section(root, models)
    lines += detectors_section(root, models)
    return "\n".join(lines).rstrip("\n") + "\n"
