"""The stream job: an overlay made standalone while the guest writes.

stream (background; QEMU's block-stream):
    the copy loop fills each active overlay with what it does not hold from
    its backing chain; each chunk holds an exclusive range lock that guest
    writes to the overlay (hooked on its edge, shared locks) wait for, and asks
    the overlay again what it holds once it has the lock.  Ranges that read as
    zeroes are not copied.  Then one transaction: the record (the node has no
    backing), then the header drops its backing file and the old chain leaves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fusedisk.graph.chain import (
    hook,
    job_edge,
    user_edge,
)
from fusedisk.graph.changes import Change, Replay, one_record
from fusedisk.graph.copy import CopyGate, copy_chunks
from fusedisk.graph.disk import is_zero
from fusedisk.graph.edge import Edge
from fusedisk.graph.extents import Status
from fusedisk.graph.jobs import Job, JobError
from fusedisk.graph.node import Node, walk
from fusedisk.graph.snapshot import snapshot_points
from fusedisk.graph.transaction import Step

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk
    from fusedisk.graph.graph import Graph

log = logging.getLogger("fusedisk")


# -- stream -------------------------------------------------------------------------------------


class StreamJob(Job):
    kind = "stream"
    background = True

    def __init__(self, graph: Graph, disk: Disk, text: str) -> None:
        super().__init__(graph, disk)
        self.graph = graph
        self.text = text.strip()
        self.overlays: list[Node] = []
        self.gates: list[tuple[Node, Edge, CopyGate, Edge]] = []

    def claims(self) -> list[Node]:
        return list(walk(self.disk.top))

    async def setup(self) -> None:
        name = self.disk.name
        if self.text:
            raise JobError(f"disk '{name}': stream takes no argument, not {self.text!r}")
        for edge in snapshot_points(self.disk.root):
            node = edge.node
            if "backing" not in node.children:
                continue
            if not node.drops_backing:
                raise JobError(
                    f"disk '{name}': stream: node '{node.name}' ({node.driver}) cannot "
                    "drop its backing file"
                )
            self.overlays.append(node)
        if not self.overlays:
            raise JobError(f"disk '{name}': stream: no layer of the disk has a backing file")
        self.target = ", ".join(n.name for n in self.overlays)
        steps = []
        for node in self.overlays:
            gate = CopyGate()
            user = user_edge(node)
            edge, edge_step = job_edge(node, "stream")
            steps += [hook(user, gate), edge_step]
            self.gates.append((node, user, gate, edge))
        await self.txn.apply(steps)  # hooks go in while no guest write is in flight

    async def run(self) -> None:
        self.total_bytes = sum(node.size for node in self.overlays)
        for node, _, gate, edge in self.gates:
            await copy_chunks([(0, node.size)], partial(_fill_from_backing, edge),
                              lock=gate.lock, disks=[self.disk], progress=self)  # fmt: skip

    async def prepare(self) -> None:
        steps = [Step(partial(user.hooks.remove, gate), partial(user.hooks.append, gate))
                 for _, user, gate, _ in self.gates]  # fmt: skip
        record = one_record([StreamChange(self.disk.name, n.name) for n in self.overlays])
        then = [partial(self._standalone, node, edge) for node, _, _, edge in self.gates]
        await self.txn.apply(steps, record, then=then)
        log.info("disk '%s': streamed into %s", self.disk.name, self.target)

    async def _standalone(self, node: Node, edge: Edge) -> None:
        """After the record: the header drops its backing, the old chain leaves."""
        edge.detach()
        await node.drop_backing()
        backing = node.children.pop("backing")
        backing.detach()
        if not backing.node.parents:
            await self.graph.remove_node(backing.node)


async def _fill_from_backing(edge: Edge, offset: int, length: int) -> None:
    """Copy what the overlay does not hold; asked under the chunk's lock."""
    for ext in await edge.block_status(offset, length):
        if ext.status & (Status.ALLOCATED | Status.ZERO):
            continue
        data = await edge.read(ext.offset, ext.length)
        if not is_zero(data):
            await edge.write(ext.offset, data)


async def start_stream(graph: Graph, disk: Disk, text: str) -> Job:
    """Start streaming the backing chains into the disk's active layers."""
    return await graph.jobs.start(StreamJob(graph, disk, text))


@dataclass(frozen=True)
class StreamChange(Change):
    """The record of a stream into an overlay: it holds its whole chain now, and
    its header names no backing file."""

    op: ClassVar[str] = "stream"
    disk: str
    node: str

    @classmethod
    def from_json(cls, record: dict[str, Any], where: Path) -> Change:
        return cls(str(record.get("disk", "")), str(record["node"]))

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "disk": self.disk, "node": self.node}

    def replay(self, replay: Replay) -> None:
        if not replay.has(self.node):
            raise replay.refuse(
                f"recorded stream into node '{self.node}': the spec has no such node"
            )
        node = replay.spec.nodes[self.node]
        node.children.pop("backing", None)
        replay.spec.nodes[self.node] = replace(node, options={**node.options, "backing": None})

    def relink(self, links: dict[str, str | None]) -> None:
        below = links.get(self.node)
        links[self.node] = None
        while below is not None and below in links:
            name, below = below, links[below]
            links[name] = None
