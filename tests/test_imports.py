"""No import cycles among peftkit's modules.

A cycle works until someone moves a line: the module imported second sees the first half-initialised.
The graph is read from the source (ast), counting the imports that run when a module is imported:
those at module level and in class bodies, not those inside functions or under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The method registry: methods/__init__.py defines `register` and then imports each family module,
# which imports `register` back from the half-initialised package. Left for the methods rewrite
# (issue 17, item 6) to move the registry into a module of its own; delete this entry then.
KNOWN_CYCLES: list[set[str]] = []  # none: keep it so


def _sources(root: Path = ROOT, package: str = "peftkit") -> dict[str, tuple[bool, str]]:
    """Module name -> (is a package, source), for every module of `package`."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (is_package, path.read_text(encoding="utf-8"))
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _run_at_import(node: ast.AST):
    """The import statements under `node` that run when its module is imported."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            yield from _run_at_import(ast.Module(body=child.orelse, type_ignores=[]))
        elif isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        else:
            yield from _run_at_import(child)


def _edges(name: str, modules: dict[str, tuple[bool, str]]) -> set[str]:
    """The modules of `modules` that importing `name` imports first.

    A package that `name` is part of is already being imported when `name` runs, so passing through
    it on a dotted path (`from peftkit.data.formats import x` inside peftkit.data) is no edge; naming
    it (`from peftkit import data`, `from peftkit.data import x` inside peftkit.data) is one.
    """
    is_package, source = modules[name]
    package = name if is_package else name.rpartition(".")[0]
    named: set[str] = set()
    for node in _run_at_import(ast.parse(source)):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: `from . import x` is from the package itself
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([base] if base else [])])
        submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
        named |= submodules
        if len(submodules) < len(node.names):  # names taken from `base` itself
            named.add(base)
    edges = set()
    for target in named:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            step = ".".join(parts[:i])
            passed_through = i < len(parts) and (name == step or name.startswith(step + "."))
            if step in modules and step != name and not passed_through:
                edges.add(step)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles that a depth-first search meets (each: its modules in order, the first repeated at the end);
    none when there are none."""
    state: dict[str, str] = {}
    path: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        state[node] = "done"
        path.pop()

    for start in sorted(graph):
        if start not in state:
            visit(start)
    return found


def _graph(modules: dict[str, tuple[bool, str]]) -> dict[str, set[str]]:
    return {name: _edges(name, modules) for name in modules}


def test_no_module_level_import_cycle():
    cycles = [c for c in _cycles(_graph(_sources())) if not any(set(c) <= known for known in KNOWN_CYCLES)]
    assert not cycles, "import cycles (move the shared code into a module both can import): " + "; ".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_the_check_sees_a_cycle_through_a_package_and_ignores_imports_that_run_later():
    modules = {
        "p": (True, "from p import a\n"),
        "p.a": (False, "from typing import TYPE_CHECKING\nfrom p.b import x\nif TYPE_CHECKING:\n    import p.c\n"),
        "p.b": (False, "def f():\n    from p import a\n"),
        "p.c": (False, "from p.a import y\n"),
        "p.d": (False, "from p import helper\n"),  # a name from the package: p.d needs p's body run first
    }
    graph = _graph(modules)
    assert graph == {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": set(), "p.c": {"p.a"}, "p.d": {"p"}}
    assert _cycles(graph) == []
    modules["p.b"] = (False, "from . import a\n")  # now p.b needs p.a at import time, and p.a needs p.b
    assert _cycles(_graph(modules)) == [["p.a", "p.b", "p.a"]]
    modules["p"] = (True, "from p import a, d\n")  # p -> p.d -> p: a package importing what imports it
    assert ["p", "p.d", "p"] in _cycles(_graph(modules))
