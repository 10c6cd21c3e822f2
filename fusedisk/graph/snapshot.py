"""External snapshots: a new qcow2 overlay above every format node of a subtree.

Where the overlays go is found by walking down from the starting edge using
only what nodes declare (`GraphOp`): a PASS node (throttle, luks, copy-on-read)
sends the operation to its one data child, a FANOUT node (quorum) to every
child, and a TARGET node (qcow2, raw) is where an overlay is inserted: the edge
that pointed at it is re-pointed to the overlay, whose `backing` child it becomes.
Filters stay on top; under a quorum each sibling gets its own overlay.

All or nothing: every overlay file is created and opened before the graph
changes; if any step fails, the files made so far are removed and nothing
changes.  The switch itself happens with the disk drained and is recorded
durably (changes.py) before it is made.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusedisk.errors import ControlError, FuseDiskError
from fusedisk.graph.changes import live_snapshots, load_changes, overlay_specs, save_changes
from fusedisk.graph.edge import Edge
from fusedisk.graph.node import GraphOp, Node, Role, walk

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk
    from fusedisk.graph.graph import Graph

log = logging.getLogger("fusedisk")

_SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]*$")
_DATA_ROLES = (Role.FILTERED, Role.FILE)


class SnapshotError(ControlError):
    pass


def snapshot_points(edge: Edge) -> list[Edge]:
    """The edges whose child gets an overlay, for a snapshot starting at `edge`."""
    node = edge.node
    if node.graph_op is GraphOp.TARGET:
        return [edge]
    if node.graph_op is GraphOp.FANOUT:
        return [p for child in node.children.values() for p in snapshot_points(child)]
    if node.graph_op is GraphOp.PASS:
        data = [e for e in node.children.values() if e.role in _DATA_ROLES]
        if len(data) != 1:
            raise SnapshotError(
                f"node '{node.name}' ({node.driver}) passes snapshots on, but has "
                f"{len(data)} data children"
            )
        return snapshot_points(data[0])
    raise SnapshotError(f"node '{node.name}' ({node.driver}) cannot be snapshotted")


def image_of(node: Node) -> Path:
    """The host file that holds a format node's image."""
    edge = node.children.get("file")
    filename = edge.node.options.get("filename") if edge is not None else None
    if edge is None or edge.node.driver != "file" or not filename:
        raise SnapshotError(
            f"node '{node.name}' ({node.driver}) does not sit on a host file; "
            "cannot place an overlay beside it"
        )
    return Path(filename)


def overlay_filename(image: Path, snapshot: str) -> Path:
    """`images/d0.qcow2` + `s1` -> `images/d0.s1.qcow2`: beside what it covers."""
    return image.with_name(f"{image.stem}.{snapshot}.qcow2")


@dataclass
class _Plan:
    edge: Edge
    base: Node
    image: Path
    overlay: Path
    node_name: str


def _unique_node_name(graph: Graph, wanted: str, taken: set[str]) -> str:
    name = wanted
    while name in graph.nodes or name in graph.spec.nodes or name in taken:
        name += "_"
    return name


async def take_snapshot(graph: Graph, disk: Disk, start: Edge, name: str) -> dict[str, Any]:
    """Insert the overlays of snapshot `name` below `start`; returns the record."""
    from fusedisk.formats.qcow2.create import create_qcow2

    name = name.strip() or time.strftime("snap-%Y%m%d-%H%M%S")
    if not _SNAPSHOT_NAME.match(name):
        raise SnapshotError(f"snapshot name {name!r}: use letters, digits and _ . + - only")
    changes = load_changes(graph.spec.path)
    if any(c.get("name") == name for c in changes):
        raise SnapshotError(f"disk '{disk.name}': a snapshot named '{name}' exists already")

    plans: list[_Plan] = []
    taken: set[str] = set()
    for edge in snapshot_points(start):
        image = image_of(edge.node)
        overlay_path = overlay_filename(image, name)
        if overlay_path.exists():
            raise SnapshotError(f"snapshot '{name}': '{overlay_path}' exists already")
        node_name = _unique_node_name(graph, f"{edge.node.name}.{name}", taken)
        taken.add(node_name)
        plans.append(_Plan(edge, edge.node, image, overlay_path, node_name))

    created: list[Path] = []
    opened: list[Node] = []
    try:
        for plan in plans:
            created.append(plan.overlay)
            create_qcow2(
                plan.overlay,
                plan.base.size,
                backing=os.path.relpath(plan.image, plan.overlay.parent),
                backing_fmt=plan.base.driver,
            )
        overlays = [
            {"node": p.node_name, "base": p.base.name, "filename": str(p.overlay)} for p in plans
        ]
        record = {
            "op": "snapshot",
            "name": name,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "disk": disk.name,
            "overlays": overlays,
        }
        for plan, overlay in zip(plans, overlays, strict=True):
            file_spec, qcow2_spec = overlay_specs(overlay)
            file_node = await graph.add_node(file_spec.name, "file", file_spec.options, {})
            opened.append(file_node)
            overlay_node = await graph.add_node(
                qcow2_spec.name, "qcow2", qcow2_spec.options,
                {"file": file_node, "backing": plan.base},
            )  # fmt: skip
            opened.append(overlay_node)
        async with disk.drained():
            save_changes(graph.spec.path, [*changes, record])
            for plan, node in zip(plans, opened[1::2], strict=True):
                for below in walk(plan.base):
                    await below.prepare_read_only()
                    below.read_only = True
                plan.edge.replace(node)
    except BaseException as e:
        for node in reversed(opened):
            await graph.remove_node(node)
        for path in created:
            path.unlink(missing_ok=True)
        if isinstance(e, FuseDiskError | OSError):
            raise SnapshotError(f"disk '{disk.name}': snapshot '{name}' failed: {e}") from e
        raise
    log.info("disk '%s': snapshot '%s' taken: %s", disk.name, name,
             ", ".join(str(p.overlay) for p in plans))  # fmt: skip
    return record


def list_snapshots(graph: Graph, disk: Disk) -> str:
    """The text of `<disk>/snapshot`: one line per snapshot, oldest first (a snapshot
    merged away by a commit or a stream is no longer listed)."""
    lines = []
    for change in live_snapshots(load_changes(graph.spec.path), disk.name):
        files = " ".join(o["filename"] for o in change["overlays"])
        lines.append(f"{change['name']}\t{change['time']}\t{files}")
    return "".join(f"{line}\n" for line in lines)
