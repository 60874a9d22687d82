"""The launcher's modules import one way: no circle, and each imports on its own.

``launchers.config`` (the run schema) must not import a backend; a backend imports the schema. A
circle through a function-level import (the old ``config.backends -> backends.hf.grpo_args ->
config.run_config -> config.backends``) works only thanks to the import order of the day, so the
graph below counts every import the code runs, at module level or inside a function, and leaves out
only ``if TYPE_CHECKING:`` blocks (never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST) -> set[str]:
    """Every module (and ``module.name``) an import statement names, outside ``if TYPE_CHECKING:`` blocks."""
    names: set[str] = set()

    class Imports(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    self.visit(child)
            else:
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            names.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)

    Imports().visit(tree)
    return names


def launchers_import_graph() -> dict[str, set[str]]:
    """Module -> the launchers modules it imports."""
    paths = {module_name(p): p for p in (ROOT / "launchers").rglob("*.py")}
    return {
        name: {dep for dep in imported_names(ast.parse(path.read_text())) if dep in paths and dep != name}
        for name, path in paths.items()
    }


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as a path that ends where it starts, or None (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (circle := visit(dep, [*path, dep])):
                return circle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (circle := visit(start, [start])):
            return circle
    return None


def test_find_circle_finds_the_circle_that_was_fixed():
    # the graph of the old layout, reduced to its three modules
    old = {"config.backends": {"hf.grpo_args"}, "hf.grpo_args": {"config.run_config"}, "config.run_config": {"config.backends"}}
    assert find_circle(old) == ["config.backends", "hf.grpo_args", "config.run_config", "config.backends"]
    assert find_circle({**old, "config.run_config": set()}) is None


def test_launchers_modules_import_each_other_without_a_circle():
    graph = launchers_import_graph()
    assert {"launchers.config.backends", "launchers.config.run_config", "launchers.backends.hf.grpo_args"} <= set(graph)
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_configuration_never_imports_a_backend():
    graph = launchers_import_graph()
    wrong = {m: sorted(d for d in deps if d.startswith("launchers.backends"))
             for m, deps in graph.items() if m.startswith("launchers.config")}
    assert {m: deps for m, deps in wrong.items() if deps} == {}


ISOLATED_IMPORTS = """
import importlib, pkgutil, sys
import launchers
names = sorted(m.name for m in pkgutil.walk_packages(launchers.__path__, "launchers."))
for name in names:
    for loaded in [m for m in sys.modules if m == "launchers" or m.startswith("launchers.")]:
        del sys.modules[loaded]
    importlib.import_module(name)
print(len(names))
"""


@pytest.mark.slow
def test_every_launchers_module_imports_first_in_a_fresh_interpreter():
    # one interpreter; before each module every launchers module is forgotten, so each is imported
    # first, with nothing of the package loaded (third-party packages stay loaded: they are not ours)
    result = subprocess.run([sys.executable, "-c", ISOLATED_IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) == len(launchers_import_graph()) - 1  # every module but launchers itself
