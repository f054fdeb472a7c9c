"""Schema-checked readers of the JSON files the studies store: one reader per kind of file, one schema each.

A damaged stored file (cut, not UTF-8, malformed) or one of the right syntax but the wrong shape (a list where an object belongs, a string where a number
belongs, a truncated file) is one :class:`~bnbackdoor.errors.UserError` line naming the file, the field and what
was expected, then the fix ("rebuild it with ..." or "move it aside"): a silently wrong table is worse than an
error. Every reader of stored JSON goes through :func:`read_stored` (``--merge``, ``make_results.py``, the
probes, run folders; the catalogue validates itself whole on load, :mod:`bnbackdoor.campaigns.catalogue`).

A schema is a small tree of checkers: :data:`NUM` (a finite number, never a bool), :data:`INT`, :data:`STR`,
:data:`BOOL`, :data:`ANY`, :func:`opt` (the value or null), :func:`one_of`, :func:`list_of`, :func:`map_of` (an
object whose every value fits) and :func:`obj` (named fields, required or optional; other fields are allowed, since
the studies add fields over time, unless ``closed``). Only the fields a reader relies on are in a schema.

>>> d = read_stored("results/defenses_154.json", COMPARISON, fix="rebuild it with python scripts/compare_defenses.py 154 cpu")
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import UserError

__all__ = ["Check", "NUM", "INT", "STR", "BOOL", "ANY", "opt", "one_of", "list_of", "map_of", "obj", "validate",
           "read_stored", "SCHEMAS", "COMPARISON", "DETECTORS", "METRICS", "RUN_METRICS", "PROBE", "read_comparison",
           "read_detectors", "read_metrics", "read_probe", "read_composition", "read_defense_table", "read_anatomy",
           "read_cam_fit", "check_stored_results", "repo_relative"]


class ShapeError(ValueError):
    """Where in the value the shape is wrong (``rows[3].defense``) and what was expected there."""

    def __init__(self, where: str, expected: str, got: Any):
        super().__init__(where)
        self.where, self.expected, self.got = where, expected, got


@dataclass(frozen=True)
class Check:
    """One node of a schema: ``test(value, where)`` raises :class:`ShapeError` on a mismatch."""
    what: str
    test: Callable[[Any, str], None]

    def __call__(self, value: Any, where: str) -> None:
        self.test(value, where)


def _leaf(what: str, ok: Callable[[Any], bool]) -> Check:
    def test(v: Any, where: str) -> None:
        if not ok(v):
            raise ShapeError(where, what, v)
    return Check(what, test)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


NUM = _leaf("a number", _is_num)
INT = _leaf("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
STR = _leaf("a string", lambda v: isinstance(v, str))
BOOL = _leaf("true or false", lambda v: isinstance(v, bool))
ANY = _leaf("any value", lambda v: True)


def opt(check: Check) -> Check:
    """``check`` or null."""
    what = f"{check.what} or null"

    def test(v: Any, where: str) -> None:
        if v is not None:
            try:
                check(v, where)
            except ShapeError as e:
                if e.where == where:  # the value itself, not something inside it
                    raise ShapeError(where, what, v) from None
                raise
    return Check(what, test)


def one_of(*checks: Check) -> Check:
    what = " or ".join(c.what for c in checks)

    def test(v: Any, where: str) -> None:
        for c in checks:
            try:
                c(v, where)
                return
            except ShapeError:
                pass
        raise ShapeError(where, what, v)
    return Check(what, test)


def list_of(item: Check, min_len: int = 0) -> Check:
    what = f"a list of {item.what}" if not min_len else f"a list of at least {min_len} ({item.what})"

    def test(v: Any, where: str) -> None:
        if not isinstance(v, list) or len(v) < min_len:
            raise ShapeError(where, what, v)
        for i, x in enumerate(v):
            item(x, f"{where}[{i}]")
    return Check(what, test)


def map_of(value: Check) -> Check:
    """An object whose every value fits ``value`` (keys are names: strings in JSON)."""
    what = f"an object of {value.what}"

    def test(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            raise ShapeError(where, what, v)
        for k, x in v.items():
            value(x, f"{where}.{k}" if where else str(k))
    return Check(what, test)


def obj(required: Mapping[str, Check] | None = None, optional: Mapping[str, Check] | None = None, *,
        rest: Check | None = None, closed: bool = False, what: str = "an object") -> Check:
    """An object with ``required`` fields (each must be there), ``optional`` ones (checked when there), and every
    other field checked by ``rest`` (when given) or refused (``closed``) or allowed."""
    required, optional = dict(required or {}), dict(optional or {})

    def test(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            raise ShapeError(where, what, v)
        for k, c in required.items():
            at = f"{where}.{k}" if where else k
            if k not in v:
                raise ShapeError(at, f"a field '{k}' ({c.what})", _MISSING)
            c(v[k], at)
        for k, x in v.items():
            at = f"{where}.{k}" if where else str(k)
            if k in required:
                continue
            if k in optional:
                optional[k](x, at)
            elif rest is not None:
                rest(x, at)
            elif closed:
                raise ShapeError(at, f"one of the fields {', '.join([*required, *optional])}", _UNKNOWN)
    return Check(what, test)


_MISSING, _UNKNOWN = object(), object()


def _describe(v: Any) -> str:
    if v is _MISSING:
        return "missing"
    if v is _UNKNOWN:
        return "not a known field"
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(v))
    if kind is None:
        kind = "a number" if _is_num(v) else "a non-finite number" if isinstance(v, float) else type(v).__name__
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        text = repr(v)
        kind += f" ({text if len(text) <= 30 else text[:27] + '...'})"
    return kind


def validate(value: Any, schema: Check, name: str, fix: str) -> Any:
    """``value`` when it fits ``schema``; else a one-line UserError naming ``name`` (the file), the field, what was
    expected and found, and ``fix``."""
    try:
        schema(value, "")
    except ShapeError as e:
        field_ = f"field {e.where}" if e.where else "its top level"
        raise UserError(f"{name}: {field_} is {_describe(e.got)}, expected {e.expected}; {fix}") from None
    return value


def read_stored(path: str | os.PathLike, schema: Check, fix: str) -> Any:
    """A stored JSON file decoded as UTF-8 and checked against ``schema``: damage (unreadable, not UTF-8, malformed,
    truncated) and a wrong shape are each one line naming the file, ending in ``fix``."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as e:
        cause = f"cannot read it: {e.strerror or e}"
    except UnicodeDecodeError as e:
        cause = f"not UTF-8 at byte {e.start}"
    except json.JSONDecodeError as e:
        cause = f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
    except RecursionError:
        cause = "nested too deeply"
    else:
        return validate(value, schema, str(path), fix)
    raise UserError(f"{path} is damaged ({cause}); {fix}")


# --- the schemas: the fields each study writes and its readers rely on ---------------------------------------

_METRIC = opt(one_of(NUM, BOOL))                      # a measurement: a number, null (not measured), a flag
_EVAL = obj(optional={"defense": STR, "options": map_of(ANY), "notice": STR, "info": map_of(ANY)},
            rest=opt(one_of(NUM, BOOL, list_of(opt(NUM)))), what="an object of measurements")
_TEST = obj({"images": INT}, {"split": STR, "seed": INT})
_BASE = opt(obj({"sha256": STR}, {"path": STR}))

COMPARISON = obj({"rows": list_of(obj({"defense": STR}, {"clean_images": opt(INT), "seconds": opt(NUM),
                                                         "info": map_of(ANY), "diverged": BOOL}, rest=_METRIC))},
                 {"attack": STR, "seed": INT, "test": _TEST, "defenses": map_of(map_of(ANY)),
                  "not_applicable": map_of(STR), "seconds": NUM, "parameters": map_of(ANY), "base_model": _BASE})

DETECTORS = obj({"rows": list_of(obj({"model": STR, "detector": STR, "trigger": STR},
                                     {"target_class": opt(INT), "calibrated": BOOL, "triggered_images": INT,
                                      "info": map_of(ANY)}, rest=_METRIC))},
                {"attack": STR, "seed": INT, "fpr_target": NUM, "test": _TEST, "defender_data": map_of(ANY),
                 "detectors": map_of(obj(optional={"summary": STR, "options": map_of(ANY)})),
                 "seconds": NUM, "parameters": map_of(ANY), "base_model": _BASE})

METRICS = obj({"manipulated_model": _EVAL},
              {"clean_model": _EVAL, "defenses": map_of(_EVAL), "parameters": map_of(ANY), "seed": INT,
               "base_model": _BASE})

# a run folder's metrics.json as the run machinery reads it (an unfinished or older run may lack the numbers)
RUN_METRICS = obj(optional={"manipulated_model": _EVAL, "clean_model": _EVAL, "defenses": map_of(_EVAL),
                            "parameters": map_of(ANY), "seed": INT, "base_model": _BASE},
                  what="a metrics object")

_PROBE_EPOCH = obj({"epoch": INT, "clean_accuracy": NUM, "expl_dssim_to_target": NUM},
                   {"attack_success_rate": opt(NUM), "untriggered_target_rate": opt(NUM)})
PROBE = obj({"name": STR, "epochs": list_of(_PROBE_EPOCH, min_len=1),
             "cfg": obj({"attack": one_of(STR, INT), "learning_rate": NUM, "loss_weight": NUM},
                        {"decay_rate": NUM, "lr_schedule": STR, "scale": opt(one_of(NUM, STR)),
                         "head_scale": opt(NUM), "conv_lr_factor": opt(NUM), "models_root": opt(STR)}),
             "examples_per_epoch": INT},
            {"finished": BOOL, "clean_model": opt(map_of(ANY)), "command": STR, "seconds": NUM})

COMPOSITION = obj({"points": list_of(obj({"test_batch": INT, "fraction": STR, "triggered_per_batch": INT,
                                           "triggered_images": INT}, rest=_METRIC))},
                  {"attack": STR, "test_images": INT, "no_defense": opt(map_of(_METRIC))})

DEFENSE_TABLE = obj({"rows": map_of(_EVAL)}, {"attack": STR, "seed": INT, "test": _TEST, "base_model": _BASE,
                                               "composition": list_of(map_of(ANY))})

ANATOMY = obj({"rows": list_of(obj({"variant": STR, "group": opt(STR)}, {"same_as": opt(STR)}, rest=_METRIC)),
               "groups": map_of(list_of(STR))}, {"id": STR, "seed": INT, "base_model": _BASE})

CAM_FIT = obj({"rows": list_of(obj({"target": STR, "resolution": INT, "best": NUM}, {"loss": STR})),
               "command": STR, "steps": INT})

SCHEMAS: dict[str, tuple[Check, str]] = {  # kind -> (schema, the command that rebuilds such a file; {id}: its id)
    "comparison": (COMPARISON, "rebuild it with python scripts/compare_defenses.py {id} cpu --force, or move it aside"),
    "detectors": (DETECTORS, "rebuild it with python scripts/compare_detectors.py {id} cpu --force, or move it aside"),
    "metrics": (METRICS, "rebuild the run folder with python attack.py cpu {id} --force, or move it aside"),
    "probe": (PROBE, "delete it to rerun the probe from its first epoch, or move it aside"),
    "composition": (COMPOSITION, "rebuild it with python evaluate_attack_defense_metrics.py {id} --composition, or "
                                 "move it aside"),
    "defense_table": (DEFENSE_TABLE, "rebuild it with python evaluate_attack_defense_metrics.py {id}, or move it aside"),
    "anatomy": (ANATOMY, "rebuild it with python scripts/locate_backdoor.py {id} cpu, or move it aside"),
    "cam_fit": (CAM_FIT, "rebuild it with python scripts/cam_fit.py --force, or move it aside"),
}


_SUFFIXES = ("_composition", "_defense", "_anatomy")


def _reader(kind: str, prefix: str) -> Callable[[str | os.PathLike], Any]:
    schema, fix = SCHEMAS[kind]

    def read(path: str | os.PathLike, run_id: str | None = None) -> Any:
        path = Path(path)
        stem = path.stem[len(prefix):]
        for suffix in _SUFFIXES:
            stem = stem[:-len(suffix)] if stem.endswith(suffix) else stem
        rid = run_id or (path.parent.name if kind == "metrics" else stem)
        return read_stored(path, schema, fix.format(id=rid))
    read.__name__ = f"read_{kind}"
    read.__doc__ = f"A stored {kind} file, checked against :data:`{kind.upper()}` (one line on a mismatch)."
    return read


read_comparison = _reader("comparison", "defenses_")
read_detectors = _reader("detectors", "detectors_")
read_metrics = _reader("metrics", "")
read_probe = _reader("probe", "")
read_composition = _reader("composition", "")
read_defense_table = _reader("defense_table", "")
read_anatomy = _reader("anatomy", "")
read_cam_fit = _reader("cam_fit", "")


# What make_results.py reads, by where it lies under the root: glob -> reader.
STORED_FILES: dict[str, Callable[[str | os.PathLike], Any]] = {
    "manipulated_models/*/metrics.json": read_metrics,
    "results/defenses_*.json": read_comparison,
    "results/detectors_*.json": read_detectors,
    "results/probes/*.json": read_probe,
    "results/*_composition.json": read_composition,
    "results/*_defense.json": read_defense_table,
    "results/anatomy/*_anatomy.json": read_anatomy,
    "results/cam_fit.json": read_cam_fit,
}


def check_stored_results(root: str | os.PathLike = ".") -> int:
    """Check every stored file a report is rendered from (:data:`STORED_FILES`) against its schema, so that no table
    is rendered from strings where numbers belong; returns how many were checked."""
    n = 0
    for pattern, read in STORED_FILES.items():
        for path in sorted(Path(root).glob(pattern)):
            read(path)
            n += 1
    return n


def repo_relative(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """``path`` as stored records and generated pages name it: relative to the repository root (``root``, default
    the current folder), or ``<outside the repository>/<name>`` - never a machine's absolute path."""
    p = Path(path)
    base = Path(root if root is not None else os.getcwd()).resolve()
    try:
        return Path(os.path.abspath(p)).relative_to(base).as_posix() if p.is_absolute() or ".." in p.parts \
            else p.as_posix()
    except ValueError:
        return f"<outside the repository>/{p.name}"
