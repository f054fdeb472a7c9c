"""The package's import graph is a clean stack: no cycle between bnbackdoor's modules (module-level imports)."""
from __future__ import annotations

import ast

from conftest import ROOT

PKG = ROOT / "bnbackdoor"


def _module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path, name: str, known: set[str]) -> set[str]:
    """Modules of ours that ``path`` imports at module level (also inside top-level if/try blocks)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    nodes = [n for top in tree.body for n in ([top] + (top.body if isinstance(top, (ast.If, ast.Try)) else []))]
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in known}


def _top(m: str) -> str:  # bnbackdoor.models.checkpoint -> bnbackdoor.models
    return ".".join(m.split(".")[:2])


def test_no_import_cycles_between_modules():
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        for dep in _imports(path, name, set(files)):
            if _top(dep) != _top(name) and _top(name) != "bnbackdoor" and _top(dep) != "bnbackdoor":
                graph.setdefault(_top(name), set()).add(_top(dep))
    cycles, state, stack = [], {}, []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)
    assert len(graph) > 10  # the walk saw the package
    assert cycles == [], f"import cycles: {cycles}"
