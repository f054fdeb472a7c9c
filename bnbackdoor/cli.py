"""Argument helpers shared by the thin scripts (one place for the common options of docs/DESIGN.md).

Every script builds its parser from :class:`ArgumentParser`: a usage error is one stderr line and exit code 2,
like every other user error (:mod:`bnbackdoor.errors`). Numeric options take their range from the ``type=``
helpers below, and output paths are checked while the arguments are parsed, so bad input fails before any work.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import UserError
from .estimate import allow_long_jobs
from .fileio import IMAGE_SUFFIXES, check_output_dir, check_output_file


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``error: <prog>: <message>``) and exit code 2."""

    def error(self, message: str):  # argparse's default prints the whole usage block first
        one_line = " ".join(str(message).split())
        self.exit(2, f"error: {self.prog}: {one_line} (see {self.prog} --help)\n")


# --- type= helpers: a bad value becomes the parser's one-line error naming the option -----------------------

def _number(kind: type, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> Callable[[str], float]:
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
        below = lo is not None and (v <= lo if lo_open else v < lo)
        above = hi is not None and (v >= hi if hi_open else v > hi)
        if below or above:
            raise argparse.ArgumentTypeError(f"{text} is out of range; allowed: {_range(lo, hi, lo_open, hi_open)}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _range(lo, hi, lo_open, hi_open) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi}"
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def int_at_least(lo: int) -> Callable[[str], int]:
    """An integer >= ``lo`` (e.g. ``int_at_least(1)`` for epochs, batch sizes, image counts)."""
    return _number(int, lo, None, False, False)


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, axis limits)."""
    return _number(float, 0, None, True, False)(text)


def float_at_least(lo: float) -> Callable[[str], float]:
    return _number(float, lo, None, False, False)


def float_range(lo: float, hi: float, hi_open: bool = False) -> Callable[[str], float]:
    """A number in [lo, hi] (or [lo, hi) with ``hi_open``), e.g. label smoothing in [0, 1)."""
    return _number(float, lo, hi, False, hi_open)


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
MAX_SEED = 2**63 - 1  # torch and numpy take seeds of 64 bits; derived seeds (seed x k + epoch) wrap modulo 2^64
seed_int = _number(int, 0, MAX_SEED, False, False)


def output_dir(text: str) -> str:
    """An output folder that exists and is writable, or can be created (nothing is created here)."""
    return _as_type_error(check_output_dir, text)


def image_file(text: str) -> str:
    """An output figure path: a writable file (not a folder) whose suffix matplotlib writes."""
    return _as_type_error(lambda t: check_output_file(t, suffixes=IMAGE_SUFFIXES), text)


def output_file(text: str) -> str:
    """Any output file path: not a folder, in a folder that is writable or can be created."""
    return _as_type_error(check_output_file, text)


def existing_dir(text: str) -> str:
    """A folder that must already exist (e.g. ``--data-root``: a missing one is neither created nor downloaded to)."""
    p = Path(text)
    if not p.is_dir():
        what = "is a file" if p.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {what}; give an existing folder (for the data: unpack it there "
                                         "with ../shared/data/unpack.sh <folder>)")
    return text


def existing_file(text: str) -> str:
    """An input file that must exist (and be a file, not a folder)."""
    p = Path(text)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {what}; give an existing file")
    return text


def clean_model_option(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--clean-model PATH``: the base (clean) model a stored run is compared with, instead of the
    ``models/<modeltype>/model_<model_id>.pth`` its parameters name; checked against the base the run records."""
    p.add_argument("--clean-model", type=existing_file, default=None, metavar="PATH",
                   help="clean base model to compare with (default: models/<modeltype>/model_<model_id>.pth); "
                        "checked against the base checksum the run records")
    return p


def _as_type_error(check: Callable[[str], object], text: str) -> str:
    try:
        check(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class _AllowLong(argparse.Action):
    """``--allow-autotrain``: allow jobs estimated over 15 minutes for this process (see bnbackdoor.estimate)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=False, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        allow_long_jobs(True)
        setattr(namespace, self.dest, True)


def common_options(p: argparse.ArgumentParser, save_path: bool = True) -> argparse.ArgumentParser:
    p.add_argument("--data-root", type=existing_dir, default=None,
                   help="dataset cache folder (default: $BNBACKDOOR_DATA, else ./datasets)")
    if save_path:
        p.add_argument("--save_path", "--save-path", dest="save_path", type=output_dir, default="output",
                       help="output folder (default: output/)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help=f"seed for data subsets and shuffling, 0 to {MAX_SEED} (default: 0)")
    p.add_argument("--allow-autotrain", "--allow-long", dest="allow_autotrain", action=_AllowLong,
                   help="start a job estimated over 15 minutes (training a missing clean model, a large attack); "
                        "without it such a job prints its estimate and stops (env BNBACKDOOR_ALLOW_LONG=1 too)")
    return p


def force_option(p: argparse.ArgumentParser, what: str) -> argparse.ArgumentParser:
    """``--force``: a study refuses to replace its existing output (:func:`bnbackdoor.fileio.refuse_overwrite`)
    unless told to."""
    p.add_argument("--force", action="store_true", help=f"replace an existing {what} instead of refusing")
    return p


def command_line() -> str:
    """The command that is running, for provenance records."""
    return "python " + shlex.join(sys.argv)


# --- options of registered defenses and detectors (name:option=value specs and API calls alike) ---------------

@dataclass(frozen=True)
class OptionKind:
    """What one option of a registered defense or detector takes: its type, its range (``lo``/``hi``, open or
    closed) or null (``none_ok``), and why the range is what it is (said in the error)."""
    type: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    none_ok: bool = False
    reason: str = ""

    def allowed(self) -> str:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a name"}[self.type]
        rng = "" if self.lo is None and self.hi is None else " " + _range(self.lo, self.hi, self.lo_open, self.hi_open)
        return f"{kind}{rng}{' or none' if self.none_ok else ''}"

    def parse(self, text: str) -> Any:
        """``text`` (a spec's value) as this kind's type; ValueError when it is not one."""
        t = text.strip()
        if self.none_ok and t.lower() in ("none", "null"):
            return None
        if self.type is bool:
            if t.lower() not in ("true", "false", "1", "0"):
                raise ValueError(t)
            return t.lower() in ("true", "1")
        if self.type is int:
            return int(t)
        if self.type is float:
            v = float(t)
            if not math.isfinite(v):
                raise ValueError(t)
            return v
        return t

    def problem(self, value: Any) -> str | None:
        """None when ``value`` fits, else what is wrong with it."""
        if value is None:
            return None if self.none_ok else "is missing"
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not self.type:
            return f"is not {self.allowed()}"
        if self.type is float and not math.isfinite(value):
            return "is not a finite number"
        if self.type in (int, float):
            below = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
            above = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
            if below or above:
                return f"is out of range; allowed: {self.allowed()}{' (' + self.reason + ')' if self.reason else ''}"
        return None


def check_options(what: str, options: Mapping[str, Any], kinds: Mapping[str, OptionKind]) -> dict[str, Any]:
    """``options`` when each fits its kind; else a one-line UserError naming ``what`` (``defense 'finetune'``), the
    option, the value and what it takes."""
    for key, value in options.items():
        kind = kinds.get(key)
        if kind is None:
            raise UserError(f"{what} has no option {key}; its options: {', '.join(kinds) or 'none'}")
        why = kind.problem(value)
        if why:
            raise UserError(f"{what}: option {key}={value!r} {why}")
    return dict(options)


def parse_option_spec(spec: str, lookup: Callable[[str], Any], kinds_of: Callable[[Any], Mapping[str, OptionKind]],
                      what: str, example: str = "finetune:freeze_bn_stats=true") -> tuple[str, dict[str, Any]]:
    """``name[:opt=value[:opt=value...]]`` -> (name, typed and checked options); ``lookup(name)`` raises the
    unknown-name error, ``kinds_of(entry)`` gives the entry's option kinds; ``what`` is "defense" or "detector"."""
    name, *parts = [p.strip() for p in spec.split(":")]
    entry = lookup(name)
    kinds = kinds_of(entry)
    opts: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"{what} '{spec}': options are written name:option=value, e.g. {example}")
        if key not in kinds:
            raise UserError(f"{what} '{name}' has no option {key}; its options: {', '.join(kinds) or 'none'}")
        if key in opts:
            raise UserError(f"{what} '{spec}' sets option {key} twice; give it once")
        try:
            opts[key] = kinds[key].parse(value)
        except ValueError:
            raise UserError(f"{what} '{name}': option {key}={value} is not a {kinds[key].type.__name__} "
                            f"(it takes {kinds[key].allowed()})") from None
    return name, check_options(f"{what} '{name}'", opts, kinds)


def option_label(name: str, defaults: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    """A spec's row label: the name plus every option that differs from its default (``strip n_perturb=16``)."""
    return " ".join([name, *(f"{k}={v}" for k, v in {**defaults, **options}.items() if defaults.get(k) != v)])


def spec_list(text: str | Iterable[str], option: str, example: str, noun: str,
              parse: Callable[[str], tuple[str, dict[str, Any]]],
              label: Callable[[str, dict[str, Any]], str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``a,b:opt=v,...`` -> (spec, name, options) per spec, each parsed and checked; two specs that are the same
    (same name, same options once defaults are filled in) are a one-line error, like a name given twice."""
    out, seen = [], {}
    for spec in name_list(text, option, example, noun):
        name, opts = parse(spec)
        lab = label(name, opts)
        if lab in seen:
            raise UserError(f"{option}: {seen[lab]} and {spec} are the same {noun} ({lab}); give it once")
        seen[lab] = spec
        out.append((spec, name, opts))
    return out


def name_list(text: str | Iterable[str], option: str, example: str, noun: str = "") -> list[str]:
    """Comma-separated names (or a list): an empty name or one given twice is a one-line error (no silent drop)."""
    raw = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in raw]
    if not any(names):
        raise UserError(f"{option} takes comma-separated {noun + ' ' if noun else ''}names such as {example}")
    if "" in names:
        raise UserError(f"{option} '{text if isinstance(text, str) else ','.join(raw)}' has an empty name (two "
                        f"commas, or one at an end); give names such as {example}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{option} names {', '.join(twice)} twice; give each once")
    return names
