"""Which defenses with which options: the one parser of the defense list, for every script and study.

Spellings: a name (``rebn``), a name with options (``finetune:freeze_bn_stats=true:epochs=3``, each value read as
its option's type and checked against its range, :data:`bnbackdoor.defenses.OPTION_KINDS`), and comma lists of
them. An empty name, a name given twice or two specs that are the same defense are one-line errors; the flag
options of the ancestor-named scripts (``--augment``, ``--test-batch``, ``--trigger-fraction``) go to the chosen
defenses that have them.

>>> parse_defenses("rebn,finetune:epochs=3")
{'rebn': ('rebn', {}), 'finetune epochs=3': ('finetune', {'epochs': 3})}
"""
from __future__ import annotations

from typing import Any, Iterable

from ..cli import name_list, parse_option_spec
from ..errors import UserError
from . import DEFENSES, defense_label, get_defense

__all__ = ["BASELINES", "default_defenses", "parse_spec", "parse_defenses", "parse_fraction"]

BASELINES = ("finetune", "bn_finetune", "fine_pruning", "bnp", "anp")


def default_defenses() -> list[str]:
    """Every registered defense that yields a fixed model: Re-BN variants first, then the baselines, then others."""
    fixed = [n for n, d in DEFENSES.items() if not d.transductive]
    first = sorted(n for n in fixed if n.startswith("rebn"))
    return first + [n for n in BASELINES if n in fixed] + sorted(n for n in fixed if n not in first + list(BASELINES))


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A defense with options, ``name[:opt=value[:opt=value...]]``: ``finetune:freeze_bn_stats=true`` ->
    ``("finetune", {"freeze_bn_stats": True})``; each value is read as its option's type and checked against its
    range (:data:`OPTION_KINDS`); an unknown option, a value of the wrong kind or out of range is an error."""
    return parse_option_spec(spec, get_defense, lambda d: d.kinds, "defense")


def parse_defenses(text: str | Iterable[str], *, option: str = "--defense", fixed_only: str | None = None,
                   augment: bool | None = None, test_batch: int | None = None,
                   trigger_fraction: float | str | None = None) -> dict[str, tuple[str, dict[str, Any]]]:
    """Defense specs (comma text or a list) -> row label -> (registered name, options), in the order given.

    ``option`` names the flag in the errors. ``fixed_only``: the study that evaluates fixed models only (a
    transductive defense is then an error). The flag options go to each chosen defense that has them (a spec's own
    value wins); one that no chosen defense has is an error. ``trigger_fraction`` may be ``"1/B"``."""
    specs = name_list(text, option, "rebn,batchstats", "defense")  # an empty name or one given twice: an error
    given = {k: v for k, v in (("augment", augment), ("test_batch", test_batch),
                               ("trigger_fraction", trigger_fraction)) if v is not None}
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    seen: dict[str, str] = {}
    used: set[str] = set()
    for spec in specs:
        n, opts = parse_spec(spec)
        d = get_defense(n)
        if fixed_only and d.transductive:
            raise UserError(f"defense '{n}' is transductive (its predictions depend on the test batch); "
                            f"{fixed_only} evaluates fixed models only")
        flags = {k: v for k, v in given.items() if k in d.defaults}
        used |= set(flags)
        if flags.get("trigger_fraction") is not None:
            flags["trigger_fraction"] = parse_fraction(flags["trigger_fraction"],
                                                       flags.get("test_batch", d.defaults.get("test_batch")))
        opts = {**flags, **opts}
        label = defense_label(n, opts)
        if label in seen:
            raise UserError(f"{option}: {seen[label]} and {spec} are the same defense ({label}); give it once")
        seen[label] = spec
        out[label] = (n, opts)
    unused = sorted(set(given) - used)
    if unused:
        flags_text = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise UserError(f"{flags_text} applies to none of the chosen defenses ({', '.join(specs)})")
    return out


def parse_fraction(text: float | str, test_batch: int) -> float:
    """``0.25``, ``"0.25"``, ``"1/B"`` (one image per batch of ``test_batch``) or ``"1/64"`` -> a float in (0, 1]."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        t = str(text).strip()
        try:
            if "/" in t:
                num, den = t.split("/", 1)
                value = float(num) / (test_batch if den.strip().upper() == "B" else float(den))
            else:
                value = float(t)
        except (ValueError, ZeroDivisionError):
            raise UserError(f"--trigger-fraction takes a number in (0, 1], 1/B or a fraction like 1/64; got '{text}'") \
                from None
    if not 0 < value <= 1:
        raise UserError(f"--trigger-fraction must be in (0, 1], got {text}")
    return value
