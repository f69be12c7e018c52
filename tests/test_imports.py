"""No import circles in the package: the graph of its imports, read from the source (AST), is acyclic.

Two graphs: module-level imports (a cycle there breaks depending on which module is imported
first) and every import, those inside functions too (a cycle there means two modules that can
only be understood together; move the shared part into a small module instead). Importing a
submodule always runs its parent packages first, so edges to a module's own parents are left out.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "napari_restore"


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted((SRC / PKG).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, lazy: bool) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of module ``name`` (inside functions too if ``lazy``)."""
    path, is_pkg = MODULES[name]
    package = name if is_pkg else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def visit(nodes: list[ast.AST]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)  # annotations only
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not lazy:
                continue
            if isinstance(node, ast.Import):
                found.extend((a.name, node.lineno) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                found.append((mod, node.lineno))
                found.extend((f"{mod}.{a.name}", node.lineno) for a in node.names if f"{mod}.{a.name}" in MODULES)
            visit(list(ast.iter_child_nodes(node)))

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def _graph(lazy: bool) -> dict[str, dict[str, int]]:
    graph = {}
    for name in MODULES:
        parts = name.split(".")
        parents = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        graph[name] = {m: line for m, line in _imports(name, lazy) if m in MODULES and m not in parents}
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    inside = set(cycle)
    edges = [f"{a} -> {b} (line {line})" for a in cycle for b, line in graph[a].items() if b in inside]
    return "; ".join(edges)


def test_the_checker_sees_a_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []
    assert len(MODULES) > 40 and "napari_restore.options" in MODULES


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "all-imports"])
def test_no_import_cycles(lazy):
    graph = _graph(lazy)
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + " | ".join(_describe(graph, c) for c in cycles)


def test_options_and_the_cli_parser_import_without_torch():
    code = ("import sys, napari_restore.options, napari_restore.constants, napari_restore.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'monai', 'napari') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
