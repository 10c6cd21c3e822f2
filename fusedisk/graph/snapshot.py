"""External snapshots: a new qcow2 overlay above every format node of a subtree.

Where the overlays go is found by walking down from the starting edge using
only what nodes declare (`GraphOp`): a PASS node (throttle, luks, copy-on-read)
sends the operation to its one data child, a FANOUT node (quorum) to every
child, and a TARGET node (qcow2, raw) is where an overlay is inserted: the edge
that pointed at it is re-pointed to the overlay, whose `backing` child it becomes.
Filters stay on top; under a quorum each sibling gets its own overlay.

All or nothing: a snapshot is a job of the graph engine (jobs.py).  Its
prepare creates and opens every overlay, registering each undo; its commit is
one transaction (transaction.py): under drain the edges are re-pointed and the
bases made read-only, then one change-log record makes it durable.  A failure
anywhere undoes what was done, newest first.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from fusedisk.errors import ControlError, FuseDiskError, describe
from fusedisk.graph.changes import Change, load_changes
from fusedisk.graph.edge import Edge
from fusedisk.graph.jobs import Job
from fusedisk.graph.naming import family, overlay_names, recorded_overlays
from fusedisk.graph.node import GraphOp, Node, Role, walk
from fusedisk.graph.registry import overlay_driver
from fusedisk.graph.snapshot_record import OverlayRecord, SnapshotChange, live_snapshots
from fusedisk.graph.transaction import Step

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk
    from fusedisk.graph.graph import Graph

log = logging.getLogger("fusedisk")

_SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]*$")
_DATA_ROLES = (Role.FILTERED, Role.FILE)
#: characters of a snapshot name; its file and node names are cut shorter (naming.py)
MAX_NAME = 255


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
    """The host file that holds a format node's image (its `file` child is a leaf
    with a filename)."""
    edge = node.children.get("file")
    filename = edge.node.options.get("filename") if edge is not None else None
    if edge is None or edge.node.children or not filename:
        raise SnapshotError(
            f"node '{node.name}' ({node.driver}) does not sit on a host file; "
            "cannot place an overlay beside it"
        )
    return Path(filename)


def leaf_driver(node: Node) -> str:
    """The driver of the leaf that holds a format node's image: an overlay beside it
    is opened with the same one (no driver is named here).  An overlay of a network
    leaf (a `protocol` such as rbd) is a host file: `file`."""
    if is_network_leaf(node):
        return "file"
    image_of(node)
    return node.children["file"].node.driver


def is_network_leaf(node: Node) -> bool:
    """A leaf whose image lives in a store named `PROTO:...` (rbd), not a host file."""
    return node.protocol is not None and not node.children


def overlay_place(node: Node, spec_folder: Path) -> tuple[Path, str]:
    """(folder, stem) an overlay of `node` is named from (graph/naming.py): beside its
    image file, or for a network leaf, in the spec's folder, named after the node."""
    if is_network_leaf(node):
        return spec_folder, node.name
    image = image_of(node)
    return image.parent, image.stem


def backing_reference(base: Node, overlay: Path) -> tuple[str, str]:
    """(name, format) an overlay's header gives for `base`: its image file relative to
    the overlay's folder, or a network leaf's own name (QEMU's `rbd:pool/image:...`)
    in raw format, so QEMU's tools can follow the chain."""
    if is_network_leaf(base):
        return base.backing_name(), "raw"  # type: ignore[attr-defined]
    return os.path.relpath(image_of(base), overlay.parent), base.driver


@dataclass
class _Plan:
    edge: Edge
    base: Node
    overlay: Path
    node_name: str
    stems: tuple[str, str]


def taken_node_names(graph: Graph, changes: list[Change]) -> set[str]:
    """Every node name a new overlay must not take: the graph's, the spec's, and
    every overlay the change log ever recorded (and its file node)."""
    recorded = recorded_overlays(changes)
    return {*graph.nodes, *graph.spec.nodes, *recorded, *(f"{n}.file" for n in recorded)}


def read_only_steps(base: Node) -> list[Step]:
    """The base of an overlay and what it writes to become read-only (undo: writable)."""
    steps = []
    for below in walk(base):
        if below.read_only:
            continue

        async def do(node: Node = below) -> None:
            await node.prepare_read_only()
            node.read_only = True

        async def undo(node: Node = below) -> None:
            node.read_only = False
            await node.prepare_writable()

        steps.append(Step(do, undo))
    return steps


def repoint(edge: Edge, new: Node) -> Step:
    """Point `edge` at `new`; undo points it back."""
    old = edge.node
    return Step(lambda: edge.replace(new), lambda: edge.replace(old))


class SnapshotJob(Job):
    """Insert the overlays of snapshot `name` below `start` (graph/jobs.py phases)."""

    kind = "snapshot"

    def __init__(self, graph: Graph, disk: Disk, start: Edge, name: str) -> None:
        super().__init__(graph, disk, name.strip() or time.strftime("snap-%Y%m%d-%H%M%S"))
        self.graph = graph
        self.start = start
        self.plans: list[_Plan] = []
        self.opened: list[Node] = []
        self.record: SnapshotChange | None = None

    def claims(self) -> list[Node]:
        return list(walk(self.start.node))

    async def setup(self) -> None:
        graph, name = self.graph, self.target
        if len(name) > MAX_NAME:
            raise SnapshotError(
                f"snapshot name '{name[:20]}...' is {len(name)} characters long; at most {MAX_NAME}"
            )
        if not _SNAPSHOT_NAME.match(name):
            raise SnapshotError(f"snapshot name {name!r}: use letters, digits and _ . + - only")
        changes = load_changes(graph.spec.path)
        if any(isinstance(c, SnapshotChange) and c.name == name for c in changes):
            raise SnapshotError(
                f"disk '{self.disk.name}': a snapshot named '{name}' exists already"
            )
        try:
            self._plan(changes)
            await self._make_overlays()
        except (FuseDiskError, OSError) as e:
            raise SnapshotError(
                f"disk '{self.disk.name}': snapshot '{name}' failed: {describe(e)}"
            ) from e

    def _plan(self, changes: list[Change]) -> None:
        """Where each overlay goes and its names (graph/naming.py)."""
        taken_files: set[Path] = set()
        taken_nodes = taken_node_names(self.graph, changes)
        for edge in snapshot_points(self.start):
            folder, stem = overlay_place(edge.node, self.graph.spec.base_dir)
            stems = family(changes, edge.node.name, stem)
            path, node = overlay_names(folder, stems, self.target, taken_files, taken_nodes)
            taken_files.add(path)
            taken_nodes.update((node, f"{node}.file"))
            self.plans.append(_Plan(edge, edge.node, path, node, stems))

    async def _make_overlays(self) -> None:
        driver = overlay_driver()
        overlays = []
        for plan in self.plans:
            self.txn.undo_later(partial(plan.overlay.unlink, missing_ok=True))
            backing, backing_format = backing_reference(plan.base, plan.overlay)
            driver.create_overlay(plan.overlay, plan.base.size, backing, backing_format)
            overlays.append(
                OverlayRecord(plan.node_name, plan.base.name, str(plan.overlay), driver.driver,
                              leaf_driver(plan.base), plan.stems[0], plan.stems[1])
            )  # fmt: skip
        self.record = SnapshotChange(
            self.target, time.strftime("%Y-%m-%dT%H:%M:%S%z"), self.disk.name, tuple(overlays)
        )
        for plan, overlay in zip(self.plans, overlays, strict=True):
            file_spec, image_spec = overlay.node_specs()
            file_node = await self.graph.add_node(
                file_spec.name, file_spec.driver, file_spec.options, {}
            )
            self.txn.undo_later(partial(self.graph.remove_node, file_node))
            node = await self.graph.add_node(
                image_spec.name, image_spec.driver, image_spec.options,
                {"file": file_node, "backing": plan.base},
            )  # fmt: skip
            self.txn.undo_later(partial(self.graph.remove_node, node))
            self.opened.append(node)

    async def prepare(self) -> None:
        steps: list[Step] = []
        for plan, node in zip(self.plans, self.opened, strict=True):
            steps.append(repoint(plan.edge, node))
            steps.extend(read_only_steps(plan.base))
        await self.txn.apply(steps, self.record)
        log.info("disk '%s': snapshot '%s' taken: %s", self.disk.name, self.target,
                 ", ".join(str(p.overlay) for p in self.plans))  # fmt: skip


async def take_snapshot(graph: Graph, disk: Disk, start: Edge, name: str) -> SnapshotChange:
    """Take snapshot `name` below `start` as a job of the graph; returns the record."""
    job = SnapshotJob(graph, disk, start, name)
    await graph.jobs.start(job)
    assert job.record is not None
    return job.record


def list_snapshots(graph: Graph, disk: Disk) -> str:
    """The text of `<disk>/snapshot`: one line per snapshot, oldest first (a snapshot
    merged away by a commit or a stream is no longer listed)."""
    lines = []
    for change in live_snapshots(load_changes(graph.spec.path), disk.name):
        files = " ".join(o.filename for o in change.overlays)
        lines.append(f"{change.name}\t{change.time}\t{files}")
    return "".join(f"{line}\n" for line in lines)
