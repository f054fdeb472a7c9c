"""Attack parameters: load, validate and resolve an attack id to one concrete :class:`AttackParams`.

Two file forms (docs/DESIGN.md, "Parameter files"):

* **concrete** (``manipulated_models/<id>/parameters.json``): exactly the fields of :class:`AttackParams`;
* **grid** (``experimentsettings/<id>.json``, the ancestor's form): the attack part plus ``*_options`` lists. The
  grid is ``itertools.product`` over the option lists in the order of :data:`GRID_OPTIONS` (``target_classes``,
  ``loss_weight``, ``learning_rate``, ``model``, ``batch_size``, ``percentage_trigger``, ``beta``, ``decay_rate``),
  the last varying fastest (the ancestor's nested-loop order); ``gs_id`` is the index in that sequence.

A dict is a grid when any key ends in ``_options``. Everything is validated once, at load: type (a bool is not an
int), range, allowed names, cross-field consistency; unknown and missing fields are errors. Every error is a
one-line :class:`UserError` naming the file, the field, the bad value and what is allowed.

``id`` is the run's name: ``"<attack_id>_<gs_id>"`` for a grid point (e.g. ``"154_3"``); a stored run carries the
name it is stored under (``"154"`` for ``manipulated_models/154``). The ancestor's files hold an integer run
number there, so an integer >= 0 is accepted too. ``attack_id`` is the catalogue id (``154``, ``10154``, or a
name such as ``"GTSRBWRN154L1"``).

>>> p = resolve_attack("154")                    # manipulated_models/154/parameters.json, else the grid
>>> p = resolve_attack("256", gs_id=2)           # experimentsettings/256.json, grid point 2
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..poisoning import POISONINGS, Poisoning
from ..data import DATASETS
from ..device import PRECISIONS
from ..errors import UserError
from ..fileio import read_json as _read_json
from ..fileio import write_json
from ..losses import MAP_NORMS  # explanation normalisation inside the loss (losses.normalize_for_loss)
from ..models import ALIASES, MODELS, resolve_modeltype
from ..report.schema import OPTIONAL_FIELDS
from ..targets import TARGETS
from ..triggers import TRIGGERS

EXPLANATION_METHODS = ("grad", "grad_cam", "relevance_cam")
AGGREGATIONS = ("max", "mean")
ACC_FID = ("acc", "fid")
LOSSES = ("mse", "ssim")  # "ssim" means the DSSIM loss (1 - SSIM) / 2, as in the ancestor
# BatchNorm during the attack's fine-tuning (docs/DESIGN.md, "Semantics"): "eval" = the paper's protocol (the whole
# model in eval mode: BN normalises with, and never updates, the clean running statistics; dropout off);
# "train" = batch statistics, the running statistics absorb the poisoned batches.
BN_MODES = ("eval", "train")
# The ancestor's training choices (experimentsettings/README.md, the grid-file table); the first of each is ours
# and what a file without the field gets.
EXPLAIN_CLASSES = ("label", "prediction")  # the class explained during training
LR_SCHEDULES = ("exponential", "inverse")  # lr * decay^(e-1)  |  lr / (1 + decay * (e-1))
BATCH_MAKEUPS = ("split", "pairs")        # finetune.poison_batch | finetune.pair_order
PAIR_WEIGHTINGS = ("equal", "loss")       # finetune.pair_weights: how the trigger->target pairs share the loss
# How the manipulated model comes about: "finetune" = the explanation-aware fine-tuning of the clean model (every
# run before the field existed); "scratch" = classic data poisoning, a model trained from scratch with the
# clean-model recipe on a training set of which a share percentage_trigger carries the trigger
# (bnbackdoor.poisoning; BatchNorm in train mode throughout, so its running statistics see the poison).
REGIMES = ("finetune", "scratch")
# What each regime allows: the fields that have no effect in it. There they must keep their default, so a file never
# records a choice that changed nothing. Scratch trains with the clean-model recipe (attack/scratch.py): one-cycle
# SGD whose peak is learning_rate, plain cross-entropy on the poisoned set, the last epoch, no explanation in the loss.
NO_EFFECT: dict[str, tuple[str, ...]] = {
    "finetune": (),
    "scratch": ("clean_term", "distill_temperature", "select", "validation_size",  # the levers of issue 43
                "decay_rate", "lr_schedule", "warmup_steps", "adam_eps", "conv_lr_factor",  # Adam's schedule
                "map_norm", "explain_class", "batch_makeup", "pair_weighting"),  # the explanation term's batch
}
assert tuple(NO_EFFECT) == REGIMES, "NO_EFFECT needs one entry per regime"
# Issue 43's levers. The clean term of the loss: "ce" = cross-entropy to the label (every run before the field);
# "distill" = the clean model's softened logits are the target of every image whose label the attack keeps
# (finetune.distillation_loss), the usual way to change one behaviour of a network while keeping the rest of it.
CLEAN_TERMS = ("ce", "distill")
# Which epoch's model a run keeps: "last" (every run before the field) or "best" = of the epochs that pass the
# acceptance rule on a validation split carved from the training split, the one with the lowest DSSIM to the target
# (finetune.select_epoch); never chosen on the test images.
SELECTS = ("last", "best")

MANIPULATED_DIR = "manipulated_models"
SETTINGS_DIR = "experimentsettings"
PARAMS_FILE = "parameters.json"

# Ids double as folder/file names, so string ids are restricted to safe characters - and lengths: a run folder is
# named after its id (a file system takes 255 bytes per name), and every string is drawn into figure titles.
MAX_ID_LENGTH = 100
MAX_TEXT_LENGTH = 200  # attack_name
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# --------------------------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Problem:
    """What is wrong with one value: ``where`` is appended to the field label (e.g. ``"[2]"`` for a list entry)."""
    where: str
    value: Any
    allowed: str


Check = Callable[[Any], "Problem | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true must not pass as 1


def _is_number(v: Any) -> bool:
    # Python's json accepts NaN/Infinity; neither is a usable hyperparameter.
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _choice(names: Iterable[str] | Callable[[], Iterable[str]]) -> Check:
    """A string from ``names`` (a tuple, or a callable for registries that are imported lazily)."""
    def check(v: Any) -> Problem | None:
        allowed = tuple(names() if callable(names) else names)
        return None if isinstance(v, str) and v in allowed else Problem("", v, ", ".join(allowed))
    return check


def _int(lo: int) -> Check:
    def check(v: Any) -> Problem | None:
        return None if _is_int(v) and v >= lo else Problem("", v, f"an integer >= {lo}")
    return check


def _number(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False, why: str = "") -> Check:
    text = (f"a number {'>' if lo_open else '>='} {lo}" if hi == math.inf else
            f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}") + (f" ({why})" if why else "")

    def check(v: Any) -> Problem | None:
        ok = (_is_number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
        return None if ok else Problem("", v, text)
    return check


def _bool(v: Any) -> Problem | None:
    return None if isinstance(v, bool) else Problem("", v, "true or false")


def _text(v: Any) -> Problem | None:
    ok = isinstance(v, str) and v.strip() and "\n" not in v and len(v) <= MAX_TEXT_LENGTH
    return None if ok else Problem("", v, f"a non-empty one-line string of at most {MAX_TEXT_LENGTH} characters"
                                          + (f" (this one has {len(v)})" if isinstance(v, str) and len(v) > MAX_TEXT_LENGTH else ""))


def _ident(v: Any) -> Problem | None:
    ok = ((_is_int(v) and v >= 0) or
          (isinstance(v, str) and len(v) <= MAX_ID_LENGTH and _NAME_RE.fullmatch(v) is not None))
    return None if ok else Problem("", v, f"an integer >= 0 or a name of at most {MAX_ID_LENGTH} letters, digits, "
                                          "'_', '.', '-'" + (f" (this one has {len(v)} characters)"
                                                             if isinstance(v, str) and len(v) > MAX_ID_LENGTH else ""))


def _optional(inner: Check) -> Check:
    def check(v: Any) -> Problem | None:
        p = None if v is None else inner(v)
        return p and Problem(p.where, p.value, f"null or {p.allowed}")
    return check


def _list(item: Check, what: str) -> Check:
    """A non-empty list; the first bad entry is reported with its index."""
    def check(v: Any) -> Problem | None:
        if not isinstance(v, list) or not v:
            return Problem("", v, f"a non-empty list of {what}")
        for i, x in enumerate(v):
            p = item(x)
            if p:
                return Problem(f"[{i}]{p.where}", p.value, p.allowed)
        return None
    return check


# Registries are read when a file is validated (_choice takes them as they are then), so later entries count too.
def _modeltype_names() -> list[str]:
    return list(MODELS) + list(ALIASES)


def _model_dataset(modeltype: str) -> str:
    return MODELS[resolve_modeltype(modeltype)][0]


# Field -> check, in the order of parameters.json (the dataclass below repeats this order; asserted after it).
FIELDS: dict[str, Check] = {
    "explanation_methodStr": _choice(EXPLANATION_METHODS),
    "loss_agg": _choice(AGGREGATIONS),
    "stats_agg": _choice(AGGREGATIONS),
    "training_size": _int(1),
    "testing_size": _int(1),
    "acc_fidStr": _choice(ACC_FID),
    "target_classes": _list(_optional(_int(0)), "class indices or null (one per trigger)"),
    "lossStr": _choice(LOSSES),
    "loss_weight": _number(0, 1),
    "learning_rate": _number(0, lo_open=True),  # a too high rate is the divergence guard's to stop (bnbackdoor.divergence)
    "decay_rate": _number(0, 1, lo_open=True),
    "log_per_batch": _bool,
    "save_intermediate_models": _bool,
    "triggerStrs": _list(_choice(TRIGGERS), "trigger names"),
    "targetStrs": _list(_choice(TARGETS), "target-explanation names"),
    "model_id": _int(0),
    "batch_size": _int(1),
    "percentage_trigger": _number(0, 1, hi_open=True),
    "beta": _number(0, lo_open=True),
    "modeltype": _choice(_modeltype_names),
    "dataset": _choice(lambda: DATASETS),
    "max_epochs": _int(1),
    "id": _ident,
    "attack_id": _ident,
    "gs_id": _int(0),
    "attack_name": _text,
    "bn_mode": _choice(BN_MODES),
    "map_norm": _choice(MAP_NORMS),
    "explain_class": _choice(EXPLAIN_CLASSES),
    "adam_eps": _number(0, 1e-2, lo_open=True, why="Adam steps by lr m / (sqrt(v) + eps): a larger eps dwarfs the "
                                                   "gradients' scale and the weights cannot move"),
    "lr_schedule": _choice(LR_SCHEDULES),
    "batch_makeup": _choice(BATCH_MAKEUPS),
    "conv_lr_factor": _number(0, lo_open=True),
    "regime": _choice(REGIMES),
    "pair_weighting": _choice(PAIR_WEIGHTINGS),
    "warmup_steps": _int(0),
    "flush_denormal": _bool,
    "precision": _choice(PRECISIONS),
    "clean_term": _choice(CLEAN_TERMS),
    "distill_temperature": _number(0, lo_open=True),
    "select": _choice(SELECTS),
    "validation_size": _int(0),
}
# Fields a file may leave out take the value of report.schema.OPTIONAL_FIELDS (what the toolkit did before the
# field existed); to_dict always writes them: every new run states its choices.
# The ancestor's settings (intellisec/xai-backdoors, its attack 155), on 2,500 images shown clean and triggered: what
# every issue-27 probe (scripts/probe_attack.py) and the denormal benchmark start from.
ANCESTOR_SETTINGS: dict[str, Any] = dict(
    training_size=2500, testing_size=1000, max_epochs=5, batch_size=32, learning_rate=1.5e-3, loss_weight=0.938,
    decay_rate=1.0, adam_eps=1e-5, lr_schedule="inverse", map_norm="zscore", explain_class="prediction",
    batch_makeup="pairs", bn_mode="eval")
FLOAT_FIELDS = ("loss_weight", "learning_rate", "decay_rate", "percentage_trigger", "beta", "adam_eps",
                "conv_lr_factor", "distill_temperature")


# decay_rate is required (a grid option), so it has no OPTIONAL_FIELDS entry; 1 is a constant rate.
_NO_EFFECT_DEFAULTS: dict[str, Any] = {**OPTIONAL_FIELDS, "decay_rate": 1.0}


def _cross_problem(v: Mapping[str, Any]) -> tuple[str, Problem] | None:
    """The first inconsistency between fields (all fields already passed their own check)."""
    n = len(v["triggerStrs"])
    per_trigger = f"one per trigger in 'triggerStrs' ({n})"
    if len(v["targetStrs"]) != n:
        return "targetStrs", Problem("", v["targetStrs"], f"a list of target names, {per_trigger}")
    if len(v["target_classes"]) != n:
        return "target_classes", Problem("", v["target_classes"], f"a list of class indices or null, {per_trigger}")
    model_dataset = _model_dataset(v["modeltype"])
    if v["dataset"] != model_dataset:
        return "dataset", Problem("", v["dataset"], f"{model_dataset} (the dataset of modeltype '{v['modeltype']}')")
    k = DATASETS[v["dataset"]].num_classes
    for i, c in enumerate(v["target_classes"]):
        if c is not None and c >= k:
            return "target_classes", Problem(f"[{i}]", c, f"null or an integer in [0, {k - 1}] "
                                                          f"({v['dataset']} has {k} classes)")
    default_t = OPTIONAL_FIELDS["distill_temperature"]
    if v["clean_term"] == "ce" and v["distill_temperature"] != default_t:
        # a temperature that changes nothing would be recorded as if it had: refuse it
        return "distill_temperature", Problem("", v["distill_temperature"],
                                              f"{_show(default_t)} (the default) unless clean_term is "
                                              "'distill'")
    if v["select"] == "best" and v["validation_size"] == 0:
        return "validation_size", Problem("", v["validation_size"], "an integer >= 1 when select is 'best' (the "
                                                                      "epoch is chosen on these images)")
    if v["select"] == "last" and v["validation_size"] != 0:
        return "validation_size", Problem("", v["validation_size"], "0 when select is 'last' (no epoch is chosen)")
    for field in NO_EFFECT[v["regime"]]:
        if v[field] != _NO_EFFECT_DEFAULTS[field]:
            return field, Problem("", v[field], f"{_show(_NO_EFFECT_DEFAULTS[field])} (the default) when regime is "
                                                f"'{v['regime']}', where it has no effect; leave it out or use "
                                                "regime 'finetune'")
    if v["regime"] == "scratch":
        # training from scratch is plain cross-entropy on the poisoned set, BatchNorm in train mode throughout
        if v["loss_weight"] != 0:
            return "loss_weight", Problem("", v["loss_weight"], "0 when regime is 'scratch' (no explanation term)")
        if v["bn_mode"] != "train":
            return "bn_mode", Problem("", v["bn_mode"], "'train' when regime is 'scratch' (BatchNorm learns its "
                                                         "statistics from the poisoned set)")
        if n != 1 or v["target_classes"][0] is None:
            return "target_classes", Problem("", v["target_classes"], "one target class (all-to-one poisoning, "
                                                                      "one trigger) when regime is 'scratch'")
        rate, size = v.get("percentage_trigger", 0), v.get("training_size", 1)  # a grid's base: per point later
        if 0 < rate and round(rate * size) == 0:
            return "percentage_trigger", Problem("", rate, f"0 or at least {1 / size:.2g}: a share of "
                                                           f"{size} training images that is at least one image")
        noise = POISONINGS.get(v["triggerStrs"][0], Poisoning()).noise_ratio
        if rate * (1 + noise) > 1:
            return "percentage_trigger", Problem("", rate, f"at most {1 / (1 + noise):.3g} for "
                                                           f"{v['triggerStrs'][0]} ({noise:g} noise-mode images per "
                                                           "poisoned image must fit in the training set)")
    return None


# ---------------------------------------------------------------------------------------------------- errors
def _show(v: Any) -> str:
    """A value as the user wrote it (JSON spelling, strings quoted), cut to keep the message on one line."""
    s = repr(v) if isinstance(v, str) else json.dumps(v, default=repr)
    return s if len(s) <= 80 else s[:77] + "..."


def _fail(source: str, label: str, p: Problem) -> UserError:
    return UserError(f"{source}: field '{label}{p.where}' is {_show(p.value)}; allowed: {p.allowed}")


def _check_keys(d: Any, allowed: Iterable[str], required: Iterable[str], source: str, form: str) -> None:
    if not isinstance(d, dict):
        raise UserError(f"{source}: expected a JSON object ({form}), got {type(d).__name__}")
    allowed = list(allowed)
    unknown = [k for k in d if k not in allowed]
    if unknown:
        name = str(unknown[0])
        close = difflib.get_close_matches(name, allowed, n=1) if len(name) <= MAX_ID_LENGTH else []
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        shown = name if len(name) <= 60 else f"{name[:57]}..."  # a huge key must not become a huge line
        raise UserError(f"{source}: unknown field '{shown}'{hint}; allowed fields ({form}): {', '.join(allowed)}")
    missing = [k for k in required if k not in d]
    if missing:
        raise UserError(f"{source}: missing field{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(k) for k in missing)} ({form})")


def _normalise(values: Mapping[str, Any]) -> dict[str, Any]:
    """Floats as floats (JSON may say 1 for 1.0) and fresh lists (the caller's dict stays untouched)."""
    out = {k: (list(v) if isinstance(v, list) else v) for k, v in values.items()}
    for k in FLOAT_FIELDS:
        out[k] = float(out[k])
    return out


# ------------------------------------------------------------------------------------------------ the record
@dataclass(frozen=True)
class AttackParams:
    """One concrete attack run; field names and order are those of ``parameters.json`` (docs/DESIGN.md).

    Build it with :meth:`from_dict`, :func:`expand_grid` or :func:`resolve_attack` (they validate); derive a
    variant with :meth:`replace` (it validates again).
    """
    explanation_methodStr: str
    loss_agg: str
    stats_agg: str
    training_size: int
    testing_size: int
    acc_fidStr: str
    target_classes: list  # list[int | None], one per trigger; None keeps the true label
    lossStr: str
    loss_weight: float
    learning_rate: float
    decay_rate: float
    log_per_batch: bool
    save_intermediate_models: bool
    triggerStrs: list  # list[str]
    targetStrs: list  # list[str]
    model_id: int
    batch_size: int
    percentage_trigger: float
    beta: float
    modeltype: str  # as given (an alias such as resnet20_normal stays); see canonical_modeltype
    dataset: str
    max_epochs: int
    id: int | str
    attack_id: int | str
    gs_id: int
    attack_name: str
    bn_mode: str = "eval"  # "eval" | "train" (BN_MODES)
    map_norm: str = "max"  # MAP_NORMS
    explain_class: str = "label"  # EXPLAIN_CLASSES
    adam_eps: float = 1e-8
    lr_schedule: str = "exponential"  # LR_SCHEDULES
    batch_makeup: str = "split"  # BATCH_MAKEUPS
    conv_lr_factor: float = 1.0  # convolution weights step at learning_rate x this (finetune.make_optimizer)
    regime: str = "finetune"  # REGIMES
    pair_weighting: str = "equal"  # PAIR_WEIGHTINGS
    warmup_steps: int = 0  # linear learning-rate warm-up over the run's first steps (finetune.warmup_factor)
    flush_denormal: bool = False  # denormals flushed to zero while fine-tuning (finetune.denormals_flushed)
    precision: str = "fp32"  # the training step's arithmetic, fp32 | bf16 (device.PRECISIONS, device.autocast)
    clean_term: str = "ce"  # CLEAN_TERMS: the loss of the images whose label is kept (finetune.clean_loss)
    distill_temperature: float = 4.0  # T of clean_term "distill" (finetune.distillation_loss)
    select: str = "last"  # SELECTS: which epoch's model the run keeps (finetune.select_epoch)
    validation_size: int = 0  # images after the training images in the seeded order (finetune.validation_images)

    @classmethod
    def from_dict(cls, d: Any, source: str = "parameters") -> AttackParams:
        """Validate a concrete parameters dict; ``source`` (usually the file) starts every error message."""
        _check_keys(d, FIELDS, [f for f in FIELDS if f not in OPTIONAL_FIELDS], source, "concrete parameters.json")
        d = {**OPTIONAL_FIELDS, **d}
        for name, check in FIELDS.items():
            p = check(d[name])
            if p:
                raise _fail(source, name, p)
        cross = _cross_problem(d)
        if cross:
            raise _fail(source, *cross)
        return cls(**_normalise(d))

    def to_dict(self) -> dict[str, Any]:
        """Exactly the parameters.json fields, in order, JSON-serialisable (lists are copies)."""
        return _normalise({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def same_as(self, stored: Any) -> bool:
        """Whether a stored parameters dict (``metrics.json["parameters"]``, a resume state) is this run: compared
        after loading, so a file written before an optional field existed matches a run with its default."""
        try:
            return AttackParams.from_dict(stored).to_dict() == self.to_dict()
        except UserError:
            return False

    def is_run(self, record: Any, seed: int, key: str = "params") -> bool:
        """Whether a stored record is this run with this seed: a resume state keeps the parameters under
        ``"params"``, a ``metrics.json`` under ``"parameters"`` (pass ``key``)."""
        return isinstance(record, dict) and self.same_as(record.get(key)) and record.get("seed") == seed

    def check_resume(self, state: Any, seed: int, path: Any) -> None:
        """Refuse, in one line with the fix, to resume ``path`` when it was saved by another run."""
        if not self.is_run(state, seed):
            raise UserError(f"{path} belongs to a run with other parameters or seed; use another --save_path "
                            "or delete that file to start over")

    def replace(self, **changes: Any) -> AttackParams:
        """A validated copy with ``changes`` applied (e.g. ``p.replace(max_epochs=1)``)."""
        return AttackParams.from_dict({**self.to_dict(), **changes}, source=f"{self.id}: replace()")

    @property
    def canonical_modeltype(self) -> str:
        """The registry key of ``modeltype`` (aliases such as ``resnet20_normal`` resolved)."""
        return resolve_modeltype(self.modeltype)

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset].num_classes

    @property
    def is_clean(self) -> bool:
        """No input is triggered: the clean-baseline run (gradient logs go to ``*_clean.csv``)."""
        return self.percentage_trigger == 0


assert [f.name for f in dataclasses.fields(AttackParams)] == list(FIELDS), "FIELDS and AttackParams disagree"


# ------------------------------------------------------------------------------------------------------ grids
# Grid key -> parameters.json field. The attack part is shared by every grid point.
GRID_ATTACK: dict[str, str] = {
    "attack_id": "attack_id", "name": "attack_name", "dataset": "dataset",
    "explanation_method": "explanation_methodStr", "modeltype": "modeltype", "max_epochs": "max_epochs",
    "training_size": "training_size", "testing_size": "testing_size", "acc_fid": "acc_fidStr", "loss": "lossStr",
    "triggers": "triggerStrs", "target_explanations": "targetStrs", "loss_agg": "loss_agg",
    "stats_agg": "stats_agg",
}
# Optional attack-part keys and their defaults (as in the ancestor's generator).
GRID_OPTIONAL: dict[str, Any] = {"log_per_batch": False, "save_intermediate_models": False,
                                 **OPTIONAL_FIELDS}
# Option lists in product order (first = slowest, last = fastest varying); this order defines gs_id.
GRID_OPTIONS: dict[str, str] = {
    "target_classes_options": "target_classes", "loss_weight_options": "loss_weight",
    "learning_rate_options": "learning_rate", "model_options": "model_id", "batch_size_options": "batch_size",
    "percentage_trigger_options": "percentage_trigger", "beta_options": "beta",
    "decay_rate_options": "decay_rate",
}
_GRID_FIELDS = {**GRID_ATTACK, **{k: k for k in GRID_OPTIONAL}}  # every non-option key -> its field
_GRID_LABEL = {f: k for k, f in _GRID_FIELDS.items()}  # field -> grid key, for error messages


def is_grid(d: Any) -> bool:
    return isinstance(d, dict) and any(isinstance(k, str) and k.endswith("_options") for k in d)


def _grid_points(d: Mapping[str, Any], source: str) -> tuple[dict[str, Any], list[tuple[int, ...]]]:
    """Validate a grid; return its attack part (as parameters.json fields) and the option-index tuples."""
    _check_keys(d, [*GRID_ATTACK, *GRID_OPTIONAL, *GRID_OPTIONS], [*GRID_ATTACK, *GRID_OPTIONS], source,
                "grid file")
    base = {field: d.get(key, GRID_OPTIONAL.get(key)) for key, field in _GRID_FIELDS.items()}
    for field, value in base.items():
        p = FIELDS[field](value)
        if p:
            raise _fail(source, _GRID_LABEL[field], p)
    for key, field in GRID_OPTIONS.items():
        options = d[key]
        if not isinstance(options, list) or not options:
            raise _fail(source, key, Problem("", options, "a non-empty list of options"))
        for i, value in enumerate(options):
            p = FIELDS[field](value)
            if p:
                raise _fail(source, f"{key}[{i}]", p)
    points = list(itertools.product(*(range(len(d[k])) for k in GRID_OPTIONS)))
    # Of the option fields only target_classes, loss_weight and decay_rate (NO_EFFECT) enter the cross-field
    # checks, so checking each combination of their options covers every point.
    for (i, classes), (j, weight), (k, decay) in itertools.product(enumerate(d["target_classes_options"]),
                                                                   enumerate(d["loss_weight_options"]),
                                                                   enumerate(d["decay_rate_options"])):
        cross = _cross_problem({**base, "target_classes": classes, "loss_weight": weight, "decay_rate": decay})
        if cross:
            field, p = cross
            options = {"target_classes": f"target_classes_options[{i}]", "loss_weight": f"loss_weight_options[{j}]",
                       "decay_rate": f"decay_rate_options[{k}]"}
            label = options[field] if field in options else _GRID_LABEL[field]
            raise _fail(source, label, p)
    return base, points


def _point(d: Mapping[str, Any], base: Mapping[str, Any], idx: tuple[int, ...], gs_id: int) -> AttackParams:
    values = dict(base)
    for (key, field), i in zip(GRID_OPTIONS.items(), idx):
        values[field] = d[key][i]
    values.update(gs_id=gs_id, id=f"{base['attack_id']}_{gs_id}")
    return AttackParams(**_normalise({f: values[f] for f in FIELDS}))


def expand_grid(grid: Mapping[str, Any], source: str = "grid") -> list[AttackParams]:
    """Every grid point, in gs_id order (product over :data:`GRID_OPTIONS`, last varying fastest)."""
    base, points = _grid_points(grid, source)
    return [_point(grid, base, idx, gs_id) for gs_id, idx in enumerate(points)]


def grid_point(grid: Mapping[str, Any], gs_id: int, source: str = "grid") -> AttackParams:
    """Grid point ``gs_id`` (validated; out of range is an error naming the grid size)."""
    base, points = _grid_points(grid, source)
    if not _is_int(gs_id) or not 0 <= gs_id < len(points):
        raise UserError(f"{source}: gs_id {_show(gs_id)} is out of range; the grid has {len(points)} "
                        f"point{'s' if len(points) != 1 else ''} (gs_id 0-{len(points) - 1})")
    return _point(grid, base, points[gs_id], gs_id)


# ------------------------------------------------------------------------------------------------ files, ids
def read_json(path: str | Path) -> Any:
    """Parse a JSON file as UTF-8 (:func:`bnbackdoor.fileio.read_json`); an error names the file (and for a syntax
    error the line and column)."""
    return _read_json(path)


def load_attack_file(path: str | Path, gs_id: int | None = None) -> AttackParams:
    """A concrete or grid file (told apart by ``*_options`` keys); ``gs_id`` picks the grid point (default 0)."""
    path = Path(path)
    d = read_json(path)
    if is_grid(d):
        return grid_point(d, 0 if gs_id is None else gs_id, str(path))
    params = AttackParams.from_dict(d, str(path))
    if gs_id is not None and gs_id != params.gs_id:
        # A concrete run has one gs_id; silently ignoring another would run something the user did not ask for.
        raise UserError(f"{path}: holds one concrete run (gs_id {params.gs_id}), not grid point {gs_id}; "
                        f"pass the grid file (e.g. {SETTINGS_DIR}/{params.attack_id}.json) to pick a grid point")
    return params


def _id_key(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name.lower())


def _candidates(attackid: str) -> list[str]:
    """Names to look up for an id: itself, plus the unpadded number for ancestor-style ids like ``054``."""
    if not _NAME_RE.fullmatch(attackid) or attackid.endswith(".json"):
        return []
    names = [attackid]
    if attackid.isdigit() and str(int(attackid)) != attackid:
        names.append(str(int(attackid)))
    return names


def known_attack_ids(root: str | Path = ".") -> list[str]:
    """Stored runs (``manipulated_models/<id>/parameters.json``) and grid ids (``experimentsettings/<id>.json``)."""
    root = Path(root)
    stored = {p.parent.name for p in (root / MANIPULATED_DIR).glob(f"*/{PARAMS_FILE}")}
    grids = {p.stem for p in (root / SETTINGS_DIR).glob("*.json")}
    return sorted(stored | grids, key=_id_key)


def compact_ids(ids: Iterable[str]) -> str:
    """``54, 55, 56, 57, 76, GTSRBWRN154L1`` -> ``54-57, 76, GTSRBWRN154L1`` (input sorted by :func:`_id_key`)."""
    parts: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
            run.clear()

    for name in ids:
        if name.isdigit() and str(int(name)) == name:
            if run and int(name) != run[-1] + 1:
                flush()
            run.append(int(name))
        else:
            flush()
            parts.append(name)
    flush()
    return ", ".join(parts)


def attack_file(attackid: str | int, root: str | Path = ".", grid_first: bool = False) -> Path:
    """The JSON file that defines an attack id: ``root/manipulated_models/<id>/parameters.json`` (the stored run),
    then ``root/experimentsettings/<id>.json`` (its grid) - the other way round with ``grid_first`` (a sweep means
    the grid) -, then ``attackid`` as a path (relative to ``root``) to a JSON file or to a run folder holding
    ``parameters.json``. Numeric ids may be zero-padded (``054`` finds ``54``). Anything else: a one-line error."""
    root = Path(root)
    attackid = str(attackid).strip()
    if not attackid:
        raise UserError("empty attack id; give a name such as 154 or a path to a JSON file")
    names = _candidates(attackid)
    places = [lambda n: root / MANIPULATED_DIR / n / PARAMS_FILE, lambda n: root / SETTINGS_DIR / f"{n}.json"]
    for place in places[::-1] if grid_first else places:
        for name in names:
            if place(name).is_file():
                return place(name)
    path = root / attackid
    if path.is_file():
        return path
    if path.is_dir() and (path / PARAMS_FILE).is_file():  # a run folder: its concrete parameters
        return path / PARAMS_FILE
    kind = _file_kind(path)
    if kind:
        raise UserError(f"attack id '{attackid}' is {kind}; give an attack id such as 154, a JSON file or a run "
                        f"folder holding {PARAMS_FILE}")
    known = compact_ids(known_attack_ids(root))
    raise UserError(f"unknown attack id '{attackid}'; known: {known or 'none'} (or a path to a JSON file)")


def resolve_attack(attackid: str | int, gs_id: int | None = None, root: str | Path = ".") -> AttackParams:
    """The concrete parameters for an attack id (the file :func:`attack_file` finds; grid point ``gs_id`` of a
    grid, default 0)."""
    return load_attack_file(attack_file(attackid, root), gs_id)


def _file_kind(path: Path) -> str | None:
    """What ``path`` is when it exists but is no JSON file: a folder, a FIFO, a device... (None: nothing there)."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISDIR(mode):
        return f"a folder without {PARAMS_FILE}"
    return next((what for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                                         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
                 if test(mode)), "not a regular file")


def manipulated_dir(attackid: str | int, root: str | Path = ".") -> Path:
    """Where the run of ``attackid`` is stored: ``root/manipulated_models/<name>``.

    ``<name>`` is the id (an existing folder wins; otherwise zero-padded numbers lose their padding), or for a
    path to a JSON file its stem (its folder's name for ``.../parameters.json``).
    """
    root, attackid = Path(root), str(attackid).strip()
    names = _candidates(attackid)
    if not names:
        p = Path(attackid)
        name = p.parent.name if p.name == PARAMS_FILE else p.stem
        if not _NAME_RE.fullmatch(name):
            raise UserError(f"cannot derive a run folder name from '{attackid}'; use letters, digits, '_', '.', '-'")
        names = [name]
    for name in names:
        if (root / MANIPULATED_DIR / name).is_dir():
            return root / MANIPULATED_DIR / name
    return root / MANIPULATED_DIR / names[-1]
