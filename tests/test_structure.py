"""The package's structure: no two `loader` modules depend on each other, however indirectly.

Every import of a `loader` module counts, wherever it is written: at the top, inside a
function (deferred, but still a dependency), and under `TYPE_CHECKING` (types are part of a
module's interface: a cycle there is a cycle of responsibilities, and one edit away from a
runtime one). A package's `__init__` is a node only when something imports a name it defines
itself (`from loader import run`); `from loader import logs` is an edge to `loader.logs`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import loader

ROOT = Path(loader.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(name: str, node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The `loader` modules one import statement of module `name` depends on."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    base = node.module or ""
    if node.level:
        package = name.split(".")
        # A module's own package is its name less the last part (an __init__ is its package).
        is_package = (ROOT.parent / Path(*package) / "__init__.py").exists()
        anchor = package if is_package else package[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    found: set[str] = set()
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if submodule in modules:
            found.add(submodule)
        elif base in modules:
            found.add(base)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        name = _module_name(path)
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _targets(name, node, modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as the list of its modules (first repeated last), or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        on_path.add(module)
        for target in sorted(graph.get(module, ())):
            if target in on_path:
                return [*path[path.index(target) :], target]
            if target not in done and (cycle := visit(target)) is not None:
                return cycle
        on_path.discard(path.pop())
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_the_checker_sees_cycles_through_functions_and_type_checking() -> None:
    """The checker itself: a cycle closed by a deferred or type-only import is found."""
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from loader.b import B\n"
    a = ast.parse(source)
    b = ast.parse("def f():\n    from loader import a\n")
    modules = {"loader", "loader.a", "loader.b"}
    graph = {
        "loader.a": set().union(*(_targets("loader.a", n, modules) for n in ast.walk(a)
                                  if isinstance(n, ast.ImportFrom))),
        "loader.b": set().union(*(_targets("loader.b", n, modules) for n in ast.walk(b)
                                  if isinstance(n, ast.ImportFrom))),
    }  # fmt: skip
    assert graph == {"loader.a": {"loader.b"}, "loader.b": {"loader.a"}}
    assert find_cycle(graph) == ["loader.a", "loader.b", "loader.a"]


def test_no_import_cycle_among_loader_modules() -> None:
    graph = import_graph()
    assert "loader.source" in graph["loader.worker"]  # the graph is read at all
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_checker_resolves_relative_imports() -> None:
    modules = {"loader", "loader.a", "loader.testing", "loader.testing.wire"}

    def targets(name: str, source: str) -> set[str]:
        (node,) = ast.parse(source).body
        assert isinstance(node, ast.ImportFrom)
        return _targets(name, node, modules)

    assert targets("loader.testing.wire", "from .. import a") == {"loader.a"}
    assert targets("loader.testing.wire", "from ..a import x") == {"loader.a"}
    assert targets("loader.testing", "from . import wire") == {"loader.testing.wire"}
    assert targets("loader.a", "from .testing import wire") == {"loader.testing.wire"}
