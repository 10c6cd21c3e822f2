"""The layers of docs/design-notes.md hold in the imports (issue 21):

- nothing below graph/ (errors, spec_types, hostio/) imports graph/ or anything above;
- graph/ imports only itself and what is below it (no driver, no spec parser, no front);
- no import cycle among modules at load time (imports inside functions, and under
  TYPE_CHECKING, do not run at load time and are not counted).
"""

from __future__ import annotations

import ast
from pathlib import Path

import fusedisk

ROOT = Path(fusedisk.__file__).parent
BELOW_GRAPH = ("fusedisk.errors", "fusedisk.spec_types", "fusedisk.hostio")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _load_time_imports(path: Path, modules: set[str]) -> set[str]:
    """Modules imported when `path` loads: top-level statements, not TYPE_CHECKING."""
    found: set[str] = set()
    for stmt in ast.parse(path.read_text()).body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            continue
        names: list[str] = []
        if isinstance(stmt, ast.Import):
            names = [alias.name for alias in stmt.names]
        elif isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
            names = [stmt.module] + [f"{stmt.module}.{a.name}" for a in stmt.names]
        found.update(n for n in names if n in modules)
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> what it imports at load time.  A module's own parent packages are
    left out: they are in sys.modules before any of their submodules runs."""
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {
        name: {i for i in _load_time_imports(path, set(paths)) if not name.startswith(i + ".")}
        for name, path in paths.items()
    }


def test_nothing_below_graph_imports_graph_or_above() -> None:
    wrong = {
        name: sorted(i for i in imports if not i.startswith(BELOW_GRAPH))
        for name, imports in _graph().items()
        if name.startswith(BELOW_GRAPH)
    }
    assert {name: found for name, found in wrong.items() if found} == {}


def test_graph_imports_only_itself_and_what_is_below() -> None:
    """The spec's types live below graph (spec_types), so graph never imports the
    spec parser, a front or a command (the parser imports graph, not back)."""
    allowed = (*BELOW_GRAPH, "fusedisk.graph")
    wrong = {
        name: sorted(i for i in imports if not i.startswith(allowed))
        for name, imports in _graph().items()
        if name.startswith("fusedisk.graph")
    }
    assert {name: found for name, found in wrong.items() if found} == {}


def test_no_import_cycle_at_load_time() -> None:
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
