"""The spec as plain data: what the graph is built from.

Kept apart from the TOML parser (spec.py), which asks the driver registry to
check options: the graph imports these types, the parser imports the graph, and
no import runs back up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class NodeSpec:
    """One node of the spec, with typed options and its children by name."""

    name: str
    driver: str
    options: dict[str, Any]
    children: dict[str, str | list[str]] = field(default_factory=dict)
    inline: bool = False


@dataclass
class DiskSpec:
    name: str
    node: str
    mode: int = 0o600
    uid: int = 0
    gid: int = 0
    read_only: bool = False
    detect_zeroes: str = "off"
    growable: bool = False


@dataclass
class Spec:
    path: Path
    nodes: dict[str, NodeSpec]
    disks: dict[str, DiskSpec]
    sections: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def parent_of(self) -> dict[str, str]:
        """Node name -> the node or disk that uses it (each is used at most once)."""
        users: dict[str, str] = {}
        for node in self.nodes.values():
            for ref in node.children.values():
                for child in [ref] if isinstance(ref, str) else ref:
                    users[child] = node.name
        for disk in self.disks.values():
            users[disk.node] = f"disk:{disk.name}"
        return users
