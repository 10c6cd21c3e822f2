"""Scrub and replace: jobs on a fan-out node's children (a quorum), by capability.

The node offers a ChildSet (graph/node.py): a scrub step that votes and repairs
one range, a resync step that copies voted data into a new child, and
attach / detach / promote / demote of a child.  The graph runs the work as
jobs of its one engine (jobs.py), with its one copy loop (copy.py, holding the
node's own write lock per chunk) and one transaction for the switch:

replace OLD NEW (QEMU: add a child, mirror into it, remove the old one):
    prepare   the spare NEW is opened (undo: closed) and attached, drained, as a
              write-only child (undo: detached): guest writes reach it from now on
    run       the copy loop resyncs it chunk by chunk from the voted data
    commit    one transaction: drained, the slot's edge is pointed at NEW (undo:
              back), one record `replace`; then OLD and its subtree are closed
scrub: the copy loop over the whole disk; each chunk is voted and its losers
    rewritten.  No graph change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fusedisk.errors import FuseDiskError
from fusedisk.graph.changes import Change, Replay
from fusedisk.graph.copy import copy_chunks
from fusedisk.graph.jobs import Job, JobError
from fusedisk.graph.node import ChildSet, Node, walk
from fusedisk.graph.transaction import Step

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk
    from fusedisk.graph.edge import Edge
    from fusedisk.graph.graph import Graph


def child_set(node: Node) -> ChildSet:
    found = node.child_set()
    if found is None:
        raise JobError(f"node '{node.name}' ({node.driver}) has no children to scrub or replace")
    return found


class ScrubJob(Job):
    kind = "scrub"
    background = True

    def __init__(self, graph: Graph, disk: Disk, node: Node) -> None:
        super().__init__(graph, disk)
        self.node = node
        self.owner = node.name
        self.set = child_set(node)

    def claims(self) -> list[Node]:
        return list(walk(self.node))

    async def run(self) -> None:
        self.total_bytes = self.node.size
        report = self.set.scrub_report()
        self.detail = report
        await copy_chunks([(0, self.node.size)], partial(self.set.scrub_chunk, report=report),
                          lock=self.set.copy_lock, disks=[self.disk], progress=self)  # fmt: skip


class ReplaceJob(Job):
    kind = "replace"
    background = True

    def __init__(self, graph: Graph, disk: Disk, node: Node, old_ref: str, new: str) -> None:
        super().__init__(graph, disk)
        self.graph = graph
        self.node = node
        self.owner = node.name
        self.set = child_set(node)
        self.old_ref = old_ref
        self.new_name = new
        self.slot: Edge | None = None
        self.temp: Edge | None = None

    def claims(self) -> list[Node]:
        spare = self.graph.nodes.get(self.new_name)
        return [*walk(self.node), *([spare] if spare is not None else [])]

    async def setup(self) -> None:
        if self.node.read_only:
            raise JobError(f"node '{self.node.name}' is read-only; it cannot resync a child")
        try:
            spare = await self.graph.open_spare(self.new_name)
        except FuseDiskError as e:
            raise JobError(f"node '{self.node.name}': replace: {e}") from None
        self.txn.undo_later(partial(self.graph.remove_node, spare))
        self.claimed.extend(walk(spare))
        self.set.check_replace(self.old_ref, spare)  # before the drain: a clear refusal

        def attach() -> None:
            self.slot, self.temp = self.set.attach_resync(self.old_ref, spare)

        def detach() -> None:
            if self.temp is not None:
                self.set.detach_resync(self.temp)

        await self.txn.apply([Step(attach, detach)])
        assert self.slot is not None
        self.detail = {"child": self.slot.name, "old": self.slot.node.name, "new": spare.name,
                       "guest_writes_mirrored": 0}  # fmt: skip

    async def run(self) -> None:
        assert self.temp is not None
        self.total_bytes = self.node.size
        temp = self.temp

        async def step(offset: int, length: int) -> None:
            await self.set.resync_chunk(temp, offset, length)
            self.detail["guest_writes_mirrored"] = self.set.resync_writes(temp)

        await copy_chunks([(0, self.node.size)], step, lock=self.set.copy_lock,
                          disks=[self.disk], progress=self)  # fmt: skip
        await temp.flush()

    async def prepare(self) -> None:
        slot, temp = self.slot, self.temp
        assert slot is not None and temp is not None
        old, new = slot.node, temp.node
        record = ReplaceChange(self.node.name, old.name, new.name,
                               time.strftime("%Y-%m-%dT%H:%M:%S%z"))  # fmt: skip
        step = Step(partial(self.set.promote, slot, temp),
                    partial(self.set.demote, slot, temp, old))  # fmt: skip
        await self.txn.apply([step], record, then=[partial(self.graph.remove_node, old)])


async def start_scrub(graph: Graph, disk: Disk, node: Node) -> Job:
    return await graph.jobs.start(ScrubJob(graph, disk, node))


async def start_replace(graph: Graph, disk: Disk, node: Node, text: str) -> Job:
    words = text.split()
    if len(words) != 2:
        raise JobError(
            f"node '{node.name}': replace: write 'OLD NEW' (OLD a child such as "
            f"children.1 or its node name, NEW a spare node of the spec), got {text!r}"
        )
    return await graph.jobs.start(ReplaceJob(graph, disk, node, words[0], words[1]))


@dataclass(frozen=True)
class ReplaceChange(Change):
    """The record of a fan-out node's child replaced by a spare (filters/quorum)."""

    op: ClassVar[str] = "replace"
    parent: str
    old: str
    new: str
    time: str

    @classmethod
    def from_json(cls, record: dict[str, Any], where: Path) -> Change:
        return cls(str(record.get("parent", "")), str(record["old"]), str(record["new"]),
                   str(record.get("time", "")))  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "parent": self.parent, "old": self.old, "new": self.new,
                "time": self.time}  # fmt: skip

    def replay(self, replay: Replay) -> None:
        if not replay.has(self.old, self.new):
            raise replay.refuse(
                f"recorded replacement of node '{self.old}' by '{self.new}': the spec "
                "has no such node; refusing to open the replaced child"
            )
        replay.repoint(self.old, self.new)

    def relink(self, links: dict[str, str | None]) -> None:
        links.pop(self.old, None)  # a quorum child replaced: that overlay left the graph
