"""What commit, stream and revert share: finding the layers of a chain, and the
steps that hook a job onto an edge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fusedisk.graph.changes import load_changes
from fusedisk.graph.edge import Edge
from fusedisk.graph.jobs import JobError
from fusedisk.graph.node import Node, Role
from fusedisk.graph.snapshot_record import SnapshotChange, live_snapshots
from fusedisk.graph.transaction import Step

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk
    from fusedisk.graph.graph import Graph

JOB_ROLE = "job"  # a job's own edges: parentless, never in a node's children


def hook(edge: Edge, hook_: Any) -> Step:
    """Install a write hook on `edge` (drained); undo removes it."""
    return Step(lambda: edge.hooks.append(hook_), lambda: edge.hooks.remove(hook_))


def job_edge(node: Node, what: str) -> tuple[Edge, Step]:
    """A parentless edge for a job to read and write `node`; undo detaches it."""
    edge = Edge(None, what, JOB_ROLE, node)
    return edge, Step(lambda: None, lambda: edge.detach())


# -- finding the layers -------------------------------------------------------------------


def user_edge(node: Node) -> Edge:
    """The edge through which `node`'s one user reaches it (a job's own edges aside)."""
    edges = [e for e in node.parents if e.role != JOB_ROLE]
    if len(edges) != 1:
        raise JobError(f"node '{node.name}' has {len(edges)} users; expected one")
    return edges[0]


def active_top(node: Node) -> Node:
    """The layer the guest writes to, in the backing chain that `node` is part of."""
    while True:
        edge = user_edge(node)
        if edge.role != Role.BACKING or edge.parent is None:
            return node
        node = edge.parent


def own_subtree(node: Node) -> list[Node]:
    """`node` and what it writes to: every node below it but through its backing."""
    out = [node]
    for edge in node.children.values():
        if edge.role != Role.BACKING:
            out.extend(own_subtree(edge.node))
    return out


def snapshot_record(graph: Graph, disk: Disk, name: str, action: str) -> SnapshotChange:
    snaps = live_snapshots(load_changes(graph.spec.path), disk.name)
    if not snaps:
        raise JobError(f"disk '{disk.name}': {action}: the disk has no snapshot")
    if not name:
        return snaps[-1]
    for record in snaps:
        if record.name == name:
            return record
    raise JobError(f"disk '{disk.name}': {action}: there is no snapshot '{name}'")


def backing_of(node: Node) -> Node:
    edge = node.children.get("backing")
    if edge is None or edge.role != Role.BACKING:
        raise JobError(f"node '{node.name}' has no backing")
    return edge.node


def rename_node(graph: Graph, node: Node, name: str) -> None:
    """Give a node opened under a temporary name the name of the one it replaced."""
    del graph.nodes[node.name]
    node.name = name
    graph.nodes[name] = node


def temp_name(graph: Graph, name: str) -> str:
    temp = f"{name}~new"
    while temp in graph.nodes or temp in graph.spec.nodes:
        temp += "~"
    return temp
