"""Scrub and replace: jobs on a fan-out node's children, by capability.

The node offers a Scrubber (check and repair one range) and a ChildSet (add and
delete a child: QEMU's bdrv_add_child / bdrv_del_child), graph/node.py.  A
replacement is built from those as QEMU builds it, from a copy job and a swap;
the node knows nothing of it:

replace OLD NEW:
    setup     the spare NEW is opened (undo: closed) and must fit (size, writable);
              OLD is found among the node's children; NEW is added as the
              non-voting child `OLD.new` (undo: deleted), so guest writes reach it
              from now on, and the node's refusals (too few children in service)
              come before any drain.  A write already in flight may miss it: the
              drain that follows waits for that write, and the copy reads it back.
              Drained: a copy gate is hooked on the node's parent edges, and job
              edges to the node and to NEW (undo: removed)
    run       the copy loop reads the node itself (what its parents read: voted
              for a quorum; ranges its block status calls zero are written as
              zeroes with unmap) and writes NEW, one chunk at a time holding the
              gate exclusively (guest writes hold it shared): no guest write
              interleaves a chunk.  NEW failing any write (a guest's or the
              copy's) fails the job: it would be missing data
    prepare   one transaction, drained: the gate off; `OLD.new` deleted (undo: added
              back, not voting); OLD deleted (undo: added back, in the state it
              had); NEW added in OLD's place as a voter (undo: deleted); one record
              `replace`; then the job edges go and OLD and its subtree are closed
scrub: the copy loop over the whole disk, each chunk handed to the Scrubber.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fusedisk.errors import FuseDiskError, IOFailure
from fusedisk.graph.chain import JOB_ROLE, hook, job_edge
from fusedisk.graph.changes import Change, Replay
from fusedisk.graph.copy import CopyGate, copy_chunks
from fusedisk.graph.extents import Status
from fusedisk.graph.jobs import Job, JobError
from fusedisk.graph.node import ChildSet, Node, Role, Scrubber, walk
from fusedisk.graph.transaction import Action, Step

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk
    from fusedisk.graph.edge import Edge
    from fusedisk.graph.graph import Graph

log = logging.getLogger("fusedisk")


def child_set(node: Node) -> ChildSet:
    found = node.child_set()
    if found is None:
        raise JobError(f"node '{node.name}' ({node.driver}) has no children to replace")
    return found


def scrubber(node: Node) -> Scrubber:
    found = node.scrubber()
    if found is None:
        raise JobError(f"node '{node.name}' ({node.driver}) has nothing to scrub")
    return found


class ScrubJob(Job):
    kind = "scrub"
    background = True

    def __init__(self, graph: Graph, disk: Disk, node: Node) -> None:
        super().__init__(graph, disk)
        self.node = node
        self.owner = node.name
        self.scrub = scrubber(node)

    def claims(self) -> list[Node]:
        return list(walk(self.node))

    async def run(self) -> None:
        self.total_bytes = self.node.size
        report = self.scrub.scrub_report()
        self.detail = report
        await copy_chunks([(0, self.node.size)], partial(self.scrub.scrub_chunk, report=report),
                          disks=[self.disk], progress=self)  # fmt: skip


# -- replace: the pieces -----------------------------------------------------------------


class WriteCounter:
    """A write hook that counts the writes passing an edge (the guest's, to a spare)."""

    def __init__(self) -> None:
        self.writes = 0

    async def enter(self, offset: int, length: int) -> None:
        self.writes += 1

    def leave(self, token: Any) -> None:
        pass


def find_child(node: Node, ref: str) -> Edge:
    """The child edge `ref` names, by edge name (children.1) or node name."""
    kids = node.edges_with_role(Role.CHILDREN)
    for edge in kids:
        if ref in (edge.name, edge.node.name):
            return edge
    names = ", ".join(f"{e.name} ('{e.node.name}')" for e in kids)
    raise JobError(f"node '{node.name}': replace: '{ref}' is not one of its children: {names}")


def check_spare(node: Node, spare: Node) -> None:
    """A spare must hold the same disk and be writable (generic checks)."""
    problem = ""
    if spare.size != node.size:
        problem = f"its size is {spare.size} bytes, the {node.driver}'s {node.size}"
    elif spare.read_only:
        problem = "it is read-only"
    if problem:
        raise JobError(f"node '{node.name}': replace: spare '{spare.name}': {problem}")


async def copy_read(src: Edge, dst: Edge, offset: int, length: int) -> None:
    """Copy what `src` reads into `dst`; ranges `src` reads as zeroes are written as
    zeroes with unmap (so a qcow2 spare stays sparse)."""
    for ext in await src.block_status(offset, length):
        if ext.status & Status.ZERO:
            await dst.write_zeroes(ext.offset, ext.length, True)
        else:
            await dst.write(ext.offset, await src.read(ext.offset, ext.length))


# -- replace: the job ------------------------------------------------------------------


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
        self.gate = CopyGate()
        self.mirrored = WriteCounter()
        self.users: list[Edge] = []
        self.errors_before = 0
        #: the spare's edges as a non-voting child (`OLD.new`), then in OLD's place
        self.temp: Edge | None = None
        self.new_edge: Edge | None = None

    def claims(self) -> list[Node]:
        spare = self.graph.nodes.get(self.new_name)
        return [*walk(self.node), *([spare] if spare is not None else [])]

    async def setup(self) -> None:
        node = self.node
        if node.read_only:
            raise JobError(f"node '{node.name}' is read-only; it cannot resync a child")
        try:
            spare = await self.graph.open_spare(self.new_name)
        except FuseDiskError as e:
            raise JobError(f"node '{node.name}': replace: {e}") from None
        self.txn.undo_later(partial(self.graph.remove_node, spare))
        self.claimed.extend(walk(spare))
        self.spare, self.slot = spare, find_child(node, self.old_ref)
        check_spare(node, spare)
        self.errors_before = spare.stats.write_errors()
        self.temp = temp = self.set.add_child(spare, f"{self.slot.name}.new", False)
        self.txn.undo_later(self._del_temp)
        self.users = [e for e in node.parents if e.role != JOB_ROLE]
        self.src, src_step = job_edge(node, "replace")
        self.dst, dst_step = job_edge(spare, "replace")
        hooks = [hook(user, self.gate) for user in self.users]
        await self.txn.apply([*hooks, hook(temp, self.mirrored), src_step, dst_step])
        self.detail = {"child": self.slot.name, "old": self.slot.node.name, "new": spare.name,
                       "guest_writes_mirrored": 0}  # fmt: skip
        log.info("node '%s': replacing %s ('%s') with '%s': resync started",
                 node.name, self.slot.name, self.slot.node.name, spare.name)  # fmt: skip

    def _del_temp(self) -> None:
        if self.temp is not None:
            self.set.del_child(self.temp)
            self.temp = None

    def _check_spare(self) -> None:
        """The spare failed a write (a guest write through the node, or the copy's):
        it may miss data, so it must not take the slot."""
        self.detail["guest_writes_mirrored"] = self.mirrored.writes
        failed = self.spare.stats.write_errors() - self.errors_before
        if failed:
            raise IOFailure(
                f"node '{self.node.name}': replace: the new child '{self.spare.name}' "
                f"failed {failed} writes or flushes"
            )

    async def run(self) -> None:
        self.total_bytes = self.node.size
        src, dst = self.src, self.dst

        async def step(offset: int, length: int) -> None:
            await copy_read(src, dst, offset, length)
            self._check_spare()

        await copy_chunks([(0, self.node.size)], step, lock=self.gate.lock,
                          disks=[self.disk], progress=self)  # fmt: skip
        await dst.flush()

    async def prepare(self) -> None:
        slot, temp, spare, old = self.slot, self.temp, self.spare, self.slot.node
        assert temp is not None
        record = ReplaceChange(self.node.name, old.name, spare.name,
                               time.strftime("%Y-%m-%dT%H:%M:%S%z"))  # fmt: skip

        def readd_temp() -> None:
            self.temp = self.set.add_child(spare, temp.name, False)

        def readd_old() -> None:
            self.set.add_child(old, slot.name, True)  # in the state it had

        def add_new() -> None:
            self.new_edge = self.set.add_child(spare, slot.name, True)

        def del_new() -> None:
            if self.new_edge is not None:
                self.set.del_child(self.new_edge)

        steps = [Step(self._check_spare)]
        steps += [Step(partial(u.hooks.remove, self.gate), partial(u.hooks.append, self.gate))
                  for u in self.users]  # fmt: skip
        steps += [
            Step(partial(self.set.del_child, temp), readd_temp),
            Step(partial(self.set.del_child, slot), readd_old),
            Step(add_new, del_new),
        ]
        then: list[Action] = [self.src.detach, self.dst.detach]
        then.append(partial(self.graph.remove_node, old))
        await self.txn.apply(steps, record, then=then)
        log.info("node '%s': %s is now '%s' (resynced)", self.node.name, slot.name, spare.name)


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
