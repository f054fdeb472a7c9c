"""The defender's side has one door: ``data.clean_set`` hands out the clean set, ``CleanSet.record()`` says how
it was drawn, ``defenses/specs.py`` reads the defense list, and the library names the count ``clean_images``."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

from bnbackdoor.data import CleanSet, clean_set, load_split

PACKAGE = Path(__file__).resolve().parents[1] / "bnbackdoor"
# The doors and names this replaced (issue 44): none may come back.
GONE = ("calibration_set", "clean_sets", "asked_clean_set", "rebn_size", "defense_calibration")


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PACKAGE).as_posix(), node


def test_exactly_one_library_function_returns_the_clean_set():
    returning = [f"{p}:{f.name}" for p, f in _functions() if f.returns is not None
                 and re.search(r"\bCleanSet\b", ast.unparse(f.returns))]
    assert returning == ["data.py:clean_set"]
    text = {p.relative_to(PACKAGE).as_posix(): p.read_text() for p in PACKAGE.rglob("*.py")}
    left = [(p, n) for p, t in text.items() for n in GONE if re.search(rf"\b{n}\b", t)]
    assert left == []


def test_one_parser_reads_the_defense_list():
    parsers = sorted(f"{p}:{f.name}" for p, f in _functions() if f.name in ("parse_defenses", "parse_spec"))
    assert parsers == ["defenses/specs.py:parse_defenses", "defenses/specs.py:parse_spec"]


def test_record_says_split_counts_seed_and_exclusion(tiny_data_root, capsys):
    cs = clean_set("cifar10", 16, seed=3, data_root=tiny_data_root)
    x, y = load_split("cifar10", "train", size=16, seed=3, data_root=tiny_data_root)
    assert torch.equal(cs.x, x) and torch.equal(cs.y, y)
    assert cs.record() == {"split": "train", "requested": 16, "images": 16, "seed": 3, "excluded": 0}
    ex = clean_set("cifar10", 16, seed=3, data_root=tiny_data_root, exclude=torch.arange(10))
    assert ex.record() == {"split": "train", "requested": 16, "images": 16, "seed": 3, "excluded": 10}
    # more than the split holds: all of it, both counts recorded, and a notice only when a flag is named
    big = clean_set("cifar10", 1000, data_root=tiny_data_root)
    assert big.record() == {"split": "train", "requested": 1000, "images": 96, "seed": 0, "excluded": 0}
    assert capsys.readouterr().err == ""
    clean_set("cifar10", 1000, data_root=tiny_data_root, option="--rebn-size")
    assert "notice: --rebn-size 1000 is above the cifar10 training split (96 images)" in capsys.readouterr().err
    # a hand-made set (tests, transductive defenses) records what it holds
    assert CleanSet(x[:4], None, "cifar10").record()["requested"] == 4
