"""The structure of ftlib/, computed from the source with `ast`: no import circle (counting the
imports inside functions too: a lazy import that closes a loop is still a loop), modules of one
idea each, and thin jobs/ entry points (docs/ARCHITECTURE.md describes the layout)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "ftlib"
MAX_LINES = 420   # "~400": above it a module must say in its docstring that it is one idea


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def ftlib_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_edges(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported ftlib module: line number}, for every import statement in the file."""
    edges: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                # `from ftlib import data` imports the module ftlib.data; `from .x import y` imports x
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in found:
                while target and target not in modules:   # ftlib.a.b.name -> ftlib.a.b
                    target = target.rpartition(".")[0]
                if target.startswith("ftlib") and target != name and target != "ftlib":
                    targets.setdefault(target, node.lineno)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    edges = import_edges(ftlib_modules())
    assert sum(len(t) for t in edges.values()) > 40, "the graph reader found too few imports to be right"
    problems = []
    for component in cycles(edges):
        ties = [f"{a} -> {b} (line {edges[a][b]})" for a in component for b in edges[a] if b in component]
        problems.append(f"circle of {len(component)} modules: " + "; ".join(ties))
    assert not problems, "\n".join(problems)


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = {"ftlib.a": {"ftlib.b": 1}, "ftlib.b": {"ftlib.c": 1}, "ftlib.c": {"ftlib.a": 3}, "ftlib.d": {}}
    assert cycles(edges) == [["ftlib.a", "ftlib.b", "ftlib.c"]]
    assert cycles({"ftlib.a": {"ftlib.b": 1}, "ftlib.b": {}}) == []


def test_lazy_imports_count_as_arrows():
    modules = ftlib_modules()
    edges = import_edges(modules)
    # recipe.run_recipe imports transformers lazily but ftlib's modules at the top; the reader must
    # see both kinds: the relative `from .storage import ...` at the top of recipe.py ...
    assert "ftlib.storage" in edges["ftlib.recipe"]
    # ... and `from . import data as data_mod` as the module ftlib.data, not the package.
    assert "ftlib.data" in edges["ftlib.recipe"]


def test_modules_hold_one_idea_each():
    too_long = []
    for name, path in ftlib_modules().items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and not re.search(r"\breads? top to bottom", doc):
            too_long.append(f"{name}: {lines} lines, and its docstring does not say it is one idea "
                            "that reads top to bottom")
    assert not too_long, "\n".join(too_long)


def test_every_module_says_what_it_is_for():
    missing = [name for name, path in ftlib_modules().items()
               if path.name != "__init__.py" and not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


def test_jobs_are_thin_entry_points():
    for path in sorted((REPO / "jobs").glob("*.py")):
        tree = ast.parse(path.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("ftlib")]
        assert [n.module for n in imports] == ["ftlib.cli"], f"{path.name}: imports {[n.module for n in imports]}"
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not functions, f"{path.name} defines {[f.name for f in functions]}: logic belongs in ftlib/"


def test_argument_parsers_live_in_cli_only():
    outside = [name for name, path in ftlib_modules().items()
               if name != "ftlib.cli" and "ArgumentParser(" in path.read_text()]
    assert not outside, f"argument parsers outside ftlib/cli.py: {outside}"
