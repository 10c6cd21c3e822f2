"""The commit job: an overlay merged into its base while the guest writes.

commit (background; QEMU's active commit, which is a mirror), per layer:
    prepare, drained: the base and what it writes to become writable (its
        leaves are opened again read-write and swapped in; a qcow2 base is
        marked dirty), and a recorder is hooked on the edge into the overlay:
        every guest write, write-zeroes or discard reaching it marks its range
    run: the copy loop (copy.py) copies every extent the overlay holds into
        the base, then the ranges the guest wrote meanwhile, while many
    commit, one transaction: drained, the last written ranges are copied and
        the base flushed; the user's edge is re-pointed to the base; one record;
        then the overlay leaves the graph and its file is deleted
    `commit NAME` commits layer by layer down to the bases of snapshot NAME,
    each layer its own transaction.

A job that fails or is cancelled before its transaction commits is rolled
back: the overlay stays on top, and what was copied so far is harmless.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fusedisk.graph.chain import (
    JOB_ROLE,
    active_top,
    backing_of,
    hook,
    job_edge,
    own_subtree,
    rename_node,
    snapshot_record,
    temp_name,
    user_edge,
)
from fusedisk.graph.changes import Change, Replay, load_changes, one_record, overlay_links
from fusedisk.graph.copy import Range, allocated, copier, copy_chunks, merge_ranges
from fusedisk.graph.edge import Edge
from fusedisk.graph.jobs import Job, JobError
from fusedisk.graph.node import Node, walk
from fusedisk.graph.snapshot import image_of, repoint
from fusedisk.graph.transaction import Action, Step, Transaction

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk
    from fusedisk.graph.graph import Graph

log = logging.getLogger("fusedisk")

CONVERGE_BYTES = 4 << 20  # copy the guest's new writes live while more is dirty than this
CONVERGE_ROUNDS = 8


class _DirtyRecorder:
    """Marks the ranges guest requests changed, whether they succeeded or not."""

    def __init__(self) -> None:
        self._ranges: list[Range] = []

    async def enter(self, offset: int, length: int) -> Range:
        return (offset, offset + length)

    def leave(self, token: Range) -> None:
        self._ranges.append(token)

    def take(self) -> list[Range]:
        ranges, self._ranges = merge_ranges(self._ranges), []
        return ranges

    def pending(self) -> int:
        return sum(end - start for start, end in merge_ranges(self._ranges))


def _commit_chains(graph: Graph, disk: Disk, name: str) -> tuple[str, list[list[Node]]]:
    """Per overlay of the snapshot: the layers to commit, top first, down to that overlay."""
    record = snapshot_record(graph, disk, name, "commit")
    links = overlay_links(load_changes(graph.spec.path))
    in_disk = {id(n) for n in walk(disk.top)}
    chains: list[list[Node]] = []
    for overlay in record.overlays:
        if links.get(overlay.node) != overlay.base:
            continue
        bottom = graph.nodes.get(overlay.node)
        if bottom is None or id(bottom) not in in_disk:
            raise JobError(
                f"disk '{disk.name}': commit: overlay '{overlay.node}' is not in the disk"
            )
        chains.append(_chain_down_to(disk, links, bottom))
    if not chains:
        raise JobError(f"disk '{disk.name}': commit: snapshot '{record.name}' has no overlay")
    return record.name, chains


def _chain_down_to(disk: Disk, links: dict[str, str | None], bottom: Node) -> list[Node]:
    layers = []
    layer = active_top(bottom)
    while True:
        base = backing_of(layer)
        if links.get(layer.name) != base.name:
            raise JobError(
                f"disk '{disk.name}': commit: node '{layer.name}' is not a snapshot "
                f"overlay on '{base.name}'; it cannot be committed"
            )
        if layer.size != base.size:
            raise JobError(
                f"disk '{disk.name}': commit: node '{layer.name}' ({layer.size} bytes) and "
                f"its base '{base.name}' ({base.size} bytes) differ in size"
            )
        layers.append(layer)
        if layer is bottom:
            return layers
        layer = base


# -- commit -------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """One overlay merged into its base in a commit round."""

    overlay: Node
    base: Node
    user: Edge
    recorder: _DirtyRecorder = field(default_factory=_DirtyRecorder)
    src: Edge | None = None
    dst: Edge | None = None


class CommitJob(Job):
    kind = "commit"
    background = True

    def __init__(self, graph: Graph, disk: Disk, name: str) -> None:
        super().__init__(graph, disk)
        self.graph = graph
        self.name = name.strip()
        self.chains: list[list[Node]] = []

    def claims(self) -> list[Node]:
        return list(walk(self.disk.top))

    async def setup(self) -> None:
        self.target, self.chains = _commit_chains(self.graph, self.disk, self.name)
        self.detail["layers"] = [[n.name for n in chain] for chain in self.chains]

    async def run(self) -> None:
        pending = [list(chain) for chain in self.chains]
        while any(pending):
            self.txn = Transaction(self.graph, [self.disk], f"disk '{self.disk.name}': commit")
            layers = [chain.pop(0) for chain in pending if chain]
            await self._round([_Layer(n, backing_of(n), user_edge(n)) for n in layers])

    async def _round(self, layers: list[_Layer]) -> None:
        steps: list[Step] = []
        for layer in layers:
            steps.append(Step(partial(self._make_writable, layer)))
            steps.append(hook(layer.user, layer.recorder))
            layer.src, src_step = job_edge(layer.overlay, "commit")
            # the base is known once reopened (a leaf base, such as rbd, is replaced)
            steps += [src_step, Step(partial(_attach_dst, layer), partial(_detach_dst, layer))]
        await self.txn.apply(steps)
        plans = [(layer, await allocated(layer.src)) for layer in layers if layer.src]
        self.total_bytes += sum(end - start for _, ranges in plans for start, end in ranges)
        for layer, ranges in plans:
            assert layer.src is not None and layer.dst is not None
            await copy_chunks(ranges, copier(layer.src, layer.dst), disks=[self.disk],
                              progress=self)  # fmt: skip
        for _ in range(CONVERGE_ROUNDS):  # the guest's writes meanwhile, while they are many
            if sum(layer.recorder.pending() for layer in layers) <= CONVERGE_BYTES:
                break
            await self._copy_dirty(layers, live=True)
        await self._switch(layers)

    async def _copy_dirty(self, layers: list[_Layer], live: bool) -> None:
        for layer in layers:
            assert layer.src is not None and layer.dst is not None
            ranges = layer.recorder.take()
            self.total_bytes += sum(end - start for start, end in ranges)
            await copy_chunks(ranges, copier(layer.src, layer.dst),
                              disks=[self.disk] if live else None, progress=self)  # fmt: skip

    async def _switch(self, layers: list[_Layer]) -> None:
        files = [image_of(layer.overlay) for layer in layers]

        async def last_copy() -> None:
            await self._copy_dirty(layers, live=False)
            for layer in layers:
                assert layer.dst is not None
                await layer.dst.flush()

        steps = [Step(last_copy)]
        for layer in layers:
            steps.append(Step(partial(layer.user.hooks.remove, layer.recorder),
                              partial(layer.user.hooks.append, layer.recorder)))  # fmt: skip
            steps.append(repoint(layer.user, layer.base))
        record = one_record(
            [CommitChange(self.disk.name, layer.overlay.name, layer.base.name) for layer in layers]
        )
        then: list[Action] = [partial(_detach_job_edges, layer) for layer in layers]
        then += [partial(self.graph.remove_node, layer.overlay) for layer in layers]
        then += [partial(path.unlink) for path in files]
        await self.txn.apply(steps, record, then=then)
        log.info("disk '%s': committed %s", self.disk.name,
                 ", ".join(f"{s.overlay.name} into {s.base.name}" for s in layers))  # fmt: skip

    async def _make_writable(self, layer: _Layer) -> None:
        """Drained: swap in read-write opens of the base's leaves; base and subtree
        writable.  Its undo (registered first, so a half-done one is undone too)
        makes them read-only and clean again.  A base that is itself a leaf (rbd)
        is replaced by its read-write open in `layer.base`."""
        base = layer.base
        subtree = own_subtree(base)
        declared = self.graph.user_spec.nodes
        for node in subtree:
            if node.name in declared and declared[node.name].options.get("read-only"):
                raise JobError(
                    f"node '{node.name}' is read-only in the spec; a commit would write to it"
                )
        self.txn.undo_later(lambda: _set_read_only(layer.base))
        for leaf in [n for n in subtree if not n.children]:
            fresh = await self._reopen_writable(leaf)
            if leaf is base:
                layer.base = base = fresh
        writable = own_subtree(base)
        for node in writable:
            node.read_only = False
        for node in reversed(writable):  # children first: a qcow2 writes to its file
            await node.prepare_writable()

    async def _reopen_writable(self, leaf: Node) -> Node:
        graph = self.graph
        options = {**leaf.options, "read-only": False}
        fresh = await graph.add_node(temp_name(graph, leaf.name), leaf.driver, options, {})
        for edge in [e for e in leaf.parents if e.role != JOB_ROLE]:
            edge.replace(fresh)
        await graph.remove_node(leaf)
        rename_node(graph, fresh, leaf.name)
        return fresh


def _attach_dst(layer: _Layer) -> None:
    layer.dst = Edge(None, "commit", JOB_ROLE, layer.base)


def _detach_dst(layer: _Layer) -> None:
    if layer.dst is not None:
        layer.dst.detach()


def _detach_job_edges(layer: _Layer) -> None:
    for edge in (layer.src, layer.dst):
        if edge is not None and edge in edge.node.parents:
            edge.detach()


async def _set_read_only(base: Node) -> None:
    """Back to read-only (parents first: a qcow2 writes back and marks itself clean)."""
    for node in own_subtree(base):
        try:
            await node.prepare_read_only()
        except Exception as e:
            log.warning("node '%s': cannot mark it clean: %s", node.name, e)
        node.read_only = True


async def start_commit(graph: Graph, disk: Disk, name: str) -> Job:
    """Start committing the newest snapshot (or every layer down to snapshot `name`)."""
    return await graph.jobs.start(CommitJob(graph, disk, name))


@dataclass(frozen=True)
class CommitChange(Change):
    """The record of one overlay committed into its base: the base takes the
    overlay's place (writable again), the overlay leaves the spec."""

    op: ClassVar[str] = "commit"
    disk: str
    overlay: str
    base: str

    @classmethod
    def from_json(cls, record: dict[str, Any], where: Path) -> Change:
        return cls(str(record.get("disk", "")), str(record["overlay"]), str(record["base"]))

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "disk": self.disk, "overlay": self.overlay, "base": self.base}

    def replay(self, replay: Replay) -> None:
        if not replay.has(self.overlay, self.base):
            raise replay.refuse(
                f"recorded commit of node '{self.overlay}' into '{self.base}': the spec "
                "has no such node; refusing to open an older layer"
            )
        replay.repoint(self.overlay, self.base)
        children = replay.spec.nodes[self.overlay].children
        if children.get("backing") == self.base:
            del children["backing"]
        replay.remove_unused(self.overlay)
        replay.set_writable(self.base)

    def relink(self, links: dict[str, str | None]) -> None:
        links.pop(self.overlay, None)
