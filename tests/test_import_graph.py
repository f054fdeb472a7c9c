"""The package's import graph, read from every import statement in bnbackdoor/ (module level, inside functions,
classes and if/try blocks alike), holds the layering rules of docs/DESIGN.md ("Layering rules"):

1. no cycle between modules, and none between top-level units (``bnbackdoor/<unit>.py`` or ``bnbackdoor/<unit>/``);
2. every unit sits in one layer of the table there and imports only units of its own layer or below;
3. a layer marked "no torch" imports no torch and nothing of ours outside its own layer;
4. function-local imports only of the heavy optional third-party packages named in :data:`LAZY_OK`.

The checker (:func:`check`) takes any package folder and layer table, so the tests below also show it failing on
a small fake package with a deliberate cycle. Dynamic imports (``importlib.import_module``, e.g. the defenses'
auto-discovery) are not statements and are not read.
"""
from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

PKG = ROOT / "bnbackdoor"
DESIGN = ROOT / "docs" / "DESIGN.md"

# The only packages a function may import: each is slow to import and needed on few paths.
LAZY_OK = {
    "torchvision": "about a second to import; needed only by two architectures, the first-use dataset download "
                   "and gradlog's block types",
    "submitit": "only the sweep's executors use it",
}

# Problems in files another change owns right now, with the edit that removes each. An entry that no longer
# matches a problem fails the test (delete it); any problem not listed fails it too.
PENDING: dict = {}


@dataclass(frozen=True)
class Import:
    module: str   # the importing module, e.g. bnbackdoor.metrics
    target: str   # ours: the deepest module named (bnbackdoor.models.layers); others: the top-level package
    line: int
    local: bool   # inside a function or lambda body
    ours: bool


@dataclass(frozen=True)
class Problem:
    rule: str
    module: str
    target: str
    where: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.rule, self.module, self.target)

    def __str__(self) -> str:
        arrow = f" -> {self.target}" if self.target else ""
        return f"{self.rule}: {self.module}{arrow}" + (f" ({self.where})" if self.where else "")


def module_name(path: Path, pkg: Path) -> str:
    parts = path.relative_to(pkg.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_imports(pkg: Path) -> tuple[set[str], list[Import]]:
    """(our module names, every import statement of every module under ``pkg``)."""
    files = {module_name(p, pkg): p for p in sorted(pkg.rglob("*.py"))}
    root = pkg.name
    out: list[Import] = []

    def ours_or_top(name: str) -> tuple[str, bool]:
        if name == root or name.startswith(root + "."):
            while name not in files and "." in name:  # bnbackdoor.models.MODELS -> bnbackdoor.models
                name = name.rsplit(".", 1)[0]
            return name, True
        return name.split(".")[0], False

    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]

        def visit(node: ast.AST, local: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inside = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:  # relative: from . / .. / .x import y
                        up = package.split(".")[:len(package.split(".")) - (child.level - 1)]
                        base = ".".join(up + ([child.module] if child.module else []))
                    # "from pkg import sub" imports the submodule pkg.sub when there is one
                    targets = [f"{base}.{a.name}" for a in child.names]
                for t in targets:
                    target, ours = ours_or_top(t)
                    out.append(Import(name, target, child.lineno, inside, ours))
                visit(child, inside)

        visit(ast.parse(path.read_text(), filename=str(path)), False)
    return set(files), out


def unit(module: str) -> str:
    """bnbackdoor.models.checkpoint -> models; bnbackdoor.zoo -> zoo; the package root -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per strongly connected component of more than one node, or with a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(_cycle_through(graph, set(comp), min(comp)))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _cycle_through(graph: dict[str, set[str]], comp: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first), for the message."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, ())):
            if w == start:
                return paths[v] + [start]
            if w in comp and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError("a strongly connected component without a cycle")


def parse_layers(text: str) -> list[tuple[str, set[str], bool]]:
    """The fenced table under "## Layering rules": one line per layer, top layer first:
    ``<layer> <unit> <unit> ...``, a trailing ``(no torch)`` marking a torch-free layer. Returns bottom first."""
    section = text.split("## Layering rules", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    layers = []
    for line in block.splitlines()[1:]:  # the first line is the header
        if line.strip():
            no_torch = "(no torch)" in line
            name, *units = line.replace("(no torch)", "").split()
            layers.append((name, set(units), no_torch))
    return layers[::-1]


def check(pkg: Path, layers: list[tuple[str, set[str], bool]], lazy_ok=LAZY_OK) -> list[Problem]:
    """Every breach of rules 1-4 (module doc) in the package folder ``pkg`` with ``layers`` (bottom first)."""
    modules, imports = read_imports(pkg)
    rank = {u: i for i, (_, units, _) in enumerate(layers) for u in units}
    no_torch = {u for _, units, flag in layers if flag for u in units}
    problems: list[Problem] = []
    for u in sorted({unit(m) for m in modules} - {""} - set(rank)):
        problems.append(Problem("no layer", f"{pkg.name}.{u}", "", "place it in the layering table"))
    mod_graph: dict[str, set[str]] = {}
    unit_graph: dict[str, set[str]] = {}
    for imp in imports:
        where = f"line {imp.line}"
        if imp.local and not (not imp.ours and imp.target in lazy_ok):
            problems.append(Problem("function-local", imp.module, imp.target, where))
        src = unit(imp.module)
        if not imp.ours:
            if src in no_torch and imp.target in ("torch", "torchvision"):
                problems.append(Problem("no-torch layer", imp.module, imp.target, where))
            continue
        dst = unit(imp.target)
        if imp.target != imp.module:
            mod_graph.setdefault(imp.module, set()).add(imp.target)
        if not src or not dst:
            if imp.target != imp.module and not dst:  # the package root holds only the version: nothing imports it
                problems.append(Problem("imports the package root", imp.module, imp.target, where))
            continue
        if src != dst:
            unit_graph.setdefault(src, set()).add(dst)
        if src in rank and dst in rank:
            if rank[dst] > rank[src]:
                problems.append(Problem("upward", imp.module, imp.target,
                                        f"{where}: {layers[rank[src]][0]} imports {layers[rank[dst]][0]}"))
            elif src in no_torch and rank[dst] != rank[src]:
                problems.append(Problem("no-torch layer", imp.module, imp.target, where))
    for c in cycles(mod_graph):
        problems.append(Problem("module cycle", " -> ".join(c), ""))
    for c in cycles(unit_graph):
        problems.append(Problem("unit cycle", " -> ".join(f"{pkg.name}.{u}" for u in c), ""))
    return list(dict.fromkeys(problems))  # "from x import a, b" reads as two imports: one problem


# ---------------------------------------------------------------------------------------------- the package
def test_the_package_keeps_the_layering_rules():
    layers = parse_layers(DESIGN.read_text())
    problems = check(PKG, layers)
    unexpected = [str(p) for p in problems if p.key not in PENDING]
    assert unexpected == [], "\n".join(unexpected)
    stale = sorted(set(PENDING) - {p.key for p in problems})
    assert stale == [], f"fixed: delete from PENDING: {stale}"


def test_the_reader_sees_the_whole_package():
    modules, imports = read_imports(PKG)
    assert len(modules) > 50 and len({unit(m) for m in modules}) > 20  # 24 units since the wings (issue 24)
    # function-local imports are read, not skipped (torchvision inside the architecture classes' __init__)
    assert any(i.local and i.module == "bnbackdoor.models.torchvision_models" and i.target == "torchvision"
               for i in imports)
    # "from ..train import x" in a subpackage resolves to our module
    assert any(i.module == "bnbackdoor.defenses.rebn" and i.target == "bnbackdoor.train" and i.ours
               for i in imports)


def test_every_unit_is_in_exactly_one_layer():
    layers = parse_layers(DESIGN.read_text())
    seen: list[str] = [u for _, units, _ in layers for u in units]
    assert len(seen) == len(set(seen)), "a unit is in two layers"
    on_disk = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert set(seen) == on_disk


def test_lazy_ok_names_only_third_party_packages():
    assert all(not name.startswith("bnbackdoor") and "." not in name for name in LAZY_OK)


# ---------------------------------------------------------------------------------------------- the checker
def _fake(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "fakepkg"
    for rel, text in {"__init__.py": "", **files}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(textwrap.dedent(text))
    return pkg


FAKE_LAYERS = [("low", {"a", "sub"}, False), ("report", {"rep"}, True), ("high", {"b"}, False)]


def test_checker_passes_a_clean_fake_package(tmp_path):
    pkg = _fake(tmp_path, {
        "a.py": "import os\n",
        "sub/__init__.py": "from .x import f\n",
        "sub/x.py": "from ..a import os\n\ndef f():\n    import torchvision\n",
        "rep.py": "import json\n",
        "b.py": "from . import a\nfrom .sub import x\nfrom fakepkg.rep import json\n",
    })
    assert check(pkg, FAKE_LAYERS) == []


def test_checker_fails_on_a_deliberate_cycle_hidden_in_a_function(tmp_path):
    # b imports a at module level; a imports b inside a function - the shape of the old models <-> train circle
    pkg = _fake(tmp_path, {
        "a.py": "def load():\n    from .b import train\n    return train()\n",
        "b.py": "from .a import load\n\ndef train():\n    pass\n",
        "sub/__init__.py": "", "rep.py": "",
    })
    problems = {str(p) for p in check(pkg, FAKE_LAYERS)}
    assert "module cycle: fakepkg.a -> fakepkg.b -> fakepkg.a" in problems
    assert "unit cycle: fakepkg.a -> fakepkg.b -> fakepkg.a" in problems
    assert "function-local: fakepkg.a -> fakepkg.b (line 2)" in problems
    assert any(p.startswith("upward: fakepkg.a -> fakepkg.b") for p in problems)


def test_checker_fails_on_a_cycle_inside_one_layer_and_one_unit(tmp_path):
    pkg = _fake(tmp_path, {
        "a.py": "from .sub import y\n",
        "sub/__init__.py": "", "sub/x.py": "from .y import g\n", "sub/y.py": "from fakepkg.sub.x import h\n",
        "rep.py": "", "b.py": "",
    })
    problems = {str(p) for p in check(pkg, FAKE_LAYERS)}
    assert "module cycle: fakepkg.sub.x -> fakepkg.sub.y -> fakepkg.sub.x" in problems
    pkg2 = _fake(tmp_path / "2", {"a.py": "from . import sub\n", "sub/__init__.py": "from ..a import q\n",
                                  "rep.py": "", "b.py": ""})
    assert "unit cycle: fakepkg.a -> fakepkg.sub -> fakepkg.a" in {str(p) for p in check(pkg2, FAKE_LAYERS)}


@pytest.mark.parametrize("files, expected", [
    ({"a.py": "def f():\n    import json\n"}, "function-local: fakepkg.a -> json (line 2)"),
    ({"a.py": "class C:\n    def m(self):\n        from . import rep\n"}, "function-local: fakepkg.a -> fakepkg.rep"),
    ({"a.py": "f = lambda: __import__('x')\ng = lambda: None\ndef h():\n    import submitit\n"}, None),
    ({"rep.py": "import torch\n"}, "no-torch layer: fakepkg.rep -> torch (line 1)"),
    ({"rep.py": "from .a import f\n"}, "no-torch layer: fakepkg.rep -> fakepkg.a (line 1)"),
    ({"new.py": ""}, "no layer: fakepkg.new (place it"),
    ({"a.py": "import fakepkg\n"}, "imports the package root: fakepkg.a -> fakepkg (line 1)"),
])
def test_checker_names_each_rule(tmp_path, files, expected):
    pkg = _fake(tmp_path, {"a.py": "", "sub/__init__.py": "", "rep.py": "", "b.py": "", **files})
    problems = [str(p) for p in check(pkg, FAKE_LAYERS)]
    if expected is None:
        assert problems == []
    else:
        assert any(p.startswith(expected) for p in problems), problems


def test_layer_table_parses_top_first_with_no_torch_marks():
    text = "intro\n## Layering rules\n\n```\nlayer units\nhigh  b c\nlow   a (no torch)\n```\nmore ```x```\n"
    assert parse_layers(text) == [("low", {"a"}, True), ("high", {"b", "c"}, False)]
