"""graph/ knows capabilities, never drivers: it imports nothing from formats/ or filters/,
and asks nodes what they can do instead of probing them with hasattr/getattr."""

from __future__ import annotations

import ast
from pathlib import Path

import fusedisk.graph

GRAPH = Path(fusedisk.graph.__file__).parent
BANNED = ("fusedisk.formats", "fusedisk.filters")


def _imports(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def test_graph_imports_no_driver():
    found = {
        path.name: [m for m in _imports(ast.parse(path.read_text())) if m.startswith(BANNED)]
        for path in GRAPH.glob("*.py")
    }
    assert {name: mods for name, mods in found.items() if mods} == {}


def test_graph_probes_no_node_with_hasattr_or_getattr():
    probes = []
    for path in GRAPH.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr")
                and path.name != "stats.py"  # IoStats reads its own counters by name
            ):
                probes.append(f"{path.name}:{node.lineno}")
    assert probes == []
