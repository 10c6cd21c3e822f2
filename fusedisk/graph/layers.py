"""Commit, stream and revert: the snapshot controls that change a live chain.

Each is a job of the graph engine (jobs.py) and works on the overlays a
snapshot inserted (snapshot.py), found through the change log, so it acts
below the filters and on every sibling of a quorum at once.

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

stream (background; QEMU's block-stream):
    the copy loop fills each active overlay with what it does not hold from
    its backing chain; each chunk holds an exclusive range lock that guest
    writes to the overlay (hooked on its edge, shared locks) wait for, and asks
    the overlay again what it holds once it has the lock.  Ranges that read as
    zeroes are not copied.  Then one transaction: the record (the node has no
    backing), then the header drops its backing file and the old chain leaves.

revert (in the request): a fresh empty overlay on the same base is created
    beside the active one under a temporary name and opened; one transaction
    re-points the user's edge to it and renames its file over the old one (the
    atomic rename is the point of no return: node and file names stay the
    same, so no record is needed).

A job that fails or is cancelled before its transaction commits is rolled
back: the overlay stays on top, and what was copied so far is harmless.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusedisk.errors import FuseDiskError
from fusedisk.graph.changes import live_snapshots, load_changes, overlay_links
from fusedisk.graph.copy import Range, allocated, copier, copy_chunks, merge_ranges
from fusedisk.graph.disk import is_zero
from fusedisk.graph.edge import Edge, RangeLock
from fusedisk.graph.extents import Status
from fusedisk.graph.jobs import Job, JobError
from fusedisk.graph.node import Node, Role, walk
from fusedisk.graph.registry import overlay_driver
from fusedisk.graph.snapshot import image_of, repoint, snapshot_points
from fusedisk.graph.transaction import Action, Step, Transaction

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk
    from fusedisk.graph.graph import Graph

log = logging.getLogger("fusedisk")

CONVERGE_BYTES = 4 << 20  # copy the guest's new writes live while more is dirty than this
CONVERGE_ROUNDS = 8
JOB_ROLE = "job"  # a job's own edges: parentless, never in a node's children


# -- write hooks on the edge into an overlay (see edge.py) -----------------------------


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


class _CopyGate:
    """Guest writes take shared locks on their ranges; a copy chunk an exclusive one."""

    def __init__(self) -> None:
        self.lock = RangeLock()

    async def enter(self, offset: int, length: int) -> Any:
        return await self.lock.acquire(offset, offset + length, exclusive=False)

    def leave(self, token: Any) -> None:
        self.lock.release(token)


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


def _own_subtree(node: Node) -> list[Node]:
    """`node` and what it writes to: every node below it but through its backing."""
    out = [node]
    for edge in node.children.values():
        if edge.role != Role.BACKING:
            out.extend(_own_subtree(edge.node))
    return out


def _snapshot_record(graph: Graph, disk: Disk, name: str, action: str) -> dict[str, Any]:
    snaps = live_snapshots(load_changes(graph.spec.path), disk.name)
    if not snaps:
        raise JobError(f"disk '{disk.name}': {action}: the disk has no snapshot")
    if not name:
        return snaps[-1]
    for record in snaps:
        if record["name"] == name:
            return record
    raise JobError(f"disk '{disk.name}': {action}: there is no snapshot '{name}'")


def _backing(node: Node) -> Node:
    edge = node.children.get("backing")
    if edge is None or edge.role != Role.BACKING:
        raise JobError(f"node '{node.name}' has no backing")
    return edge.node


def _commit_chains(graph: Graph, disk: Disk, name: str) -> tuple[str, list[list[Node]]]:
    """Per overlay of the snapshot: the layers to commit, top first, down to that overlay."""
    record = _snapshot_record(graph, disk, name, "commit")
    links = overlay_links(load_changes(graph.spec.path))
    in_disk = {id(n) for n in walk(disk.top)}
    chains: list[list[Node]] = []
    for overlay in record["overlays"]:
        if links.get(overlay["node"]) != overlay["base"]:
            continue
        bottom = graph.nodes.get(overlay["node"])
        if bottom is None or id(bottom) not in in_disk:
            raise JobError(
                f"disk '{disk.name}': commit: overlay '{overlay['node']}' is not in the disk"
            )
        chains.append(_chain_down_to(disk, links, bottom))
    if not chains:
        raise JobError(f"disk '{disk.name}': commit: snapshot '{record['name']}' has no overlay")
    return record["name"], chains


def _chain_down_to(disk: Disk, links: dict[str, str | None], bottom: Node) -> list[Node]:
    layers = []
    layer = active_top(bottom)
    while True:
        base = _backing(layer)
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


def _rename(graph: Graph, node: Node, name: str) -> None:
    """Give a node opened under a temporary name the name of the one it replaced."""
    del graph.nodes[node.name]
    node.name = name
    graph.nodes[name] = node


def _temp_name(graph: Graph, name: str) -> str:
    temp = f"{name}~new"
    while temp in graph.nodes or temp in graph.spec.nodes:
        temp += "~"
    return temp


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

    async def prepare(self) -> None:
        self.target, self.chains = _commit_chains(self.graph, self.disk, self.name)
        self.detail["layers"] = [[n.name for n in chain] for chain in self.chains]

    async def run(self) -> None:
        pending = [list(chain) for chain in self.chains]
        while any(pending):
            self.txn = Transaction(self.graph, [self.disk], f"disk '{self.disk.name}': commit")
            layers = [chain.pop(0) for chain in pending if chain]
            await self._round([_Layer(n, _backing(n), user_edge(n)) for n in layers])

    async def _round(self, layers: list[_Layer]) -> None:
        steps: list[Step] = []
        for layer in layers:
            steps.append(Step(partial(self._make_writable, layer.base)))
            steps.append(hook(layer.user, layer.recorder))
            layer.src, src_step = job_edge(layer.overlay, "commit")
            layer.dst, dst_step = job_edge(layer.base, "commit")
            steps += [src_step, dst_step]
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
        changes = [
            {"op": "commit", "disk": self.disk.name, "overlay": layer.overlay.name,
             "base": layer.base.name}
            for layer in layers
        ]  # fmt: skip
        record = changes[0] if len(changes) == 1 else {"op": "transaction", "changes": changes}
        then: list[Action] = [partial(_detach_job_edges, layer) for layer in layers]
        then += [partial(self.graph.remove_node, layer.overlay) for layer in layers]
        then += [partial(path.unlink) for path in files]
        await self.txn.apply(steps, record, then=then)
        log.info("disk '%s': committed %s", self.disk.name,
                 ", ".join(f"{s.overlay.name} into {s.base.name}" for s in layers))  # fmt: skip

    async def _make_writable(self, base: Node) -> None:
        """Drained: swap in read-write opens of the base's leaves; base and subtree
        writable.  Its undo (registered first, so a half-done one is undone too)
        makes them read-only and clean again."""
        subtree = _own_subtree(base)
        declared = self.graph.user_spec.nodes
        for node in subtree:
            if node.name in declared and declared[node.name].options.get("read-only"):
                raise JobError(
                    f"node '{node.name}' is read-only in the spec; a commit would write to it"
                )
        self.txn.undo_later(partial(_set_read_only, base))
        for leaf in [n for n in subtree if not n.children]:
            await self._reopen_writable(leaf)
        writable = _own_subtree(base)
        for node in writable:
            node.read_only = False
        for node in reversed(writable):  # children first: a qcow2 writes to its file
            await node.prepare_writable()

    async def _reopen_writable(self, leaf: Node) -> None:
        graph = self.graph
        options = {**leaf.options, "read-only": False}
        fresh = await graph.add_node(_temp_name(graph, leaf.name), leaf.driver, options, {})
        for edge in [e for e in leaf.parents if e.role != JOB_ROLE]:
            edge.replace(fresh)
        await graph.remove_node(leaf)
        _rename(graph, fresh, leaf.name)


def _detach_job_edges(layer: _Layer) -> None:
    for edge in (layer.src, layer.dst):
        if edge is not None and edge in edge.node.parents:
            edge.detach()


async def _set_read_only(base: Node) -> None:
    """Back to read-only (parents first: a qcow2 writes back and marks itself clean)."""
    for node in _own_subtree(base):
        try:
            await node.prepare_read_only()
        except Exception as e:
            log.warning("node '%s': cannot mark it clean: %s", node.name, e)
        node.read_only = True


# -- stream -------------------------------------------------------------------------------------


class StreamJob(Job):
    kind = "stream"
    background = True

    def __init__(self, graph: Graph, disk: Disk, text: str) -> None:
        super().__init__(graph, disk)
        self.graph = graph
        self.text = text.strip()
        self.overlays: list[Node] = []
        self.gates: list[tuple[Node, Edge, _CopyGate, Edge]] = []

    def claims(self) -> list[Node]:
        return list(walk(self.disk.top))

    async def prepare(self) -> None:
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
            gate = _CopyGate()
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

    async def commit(self) -> None:
        steps = [Step(partial(user.hooks.remove, gate), partial(user.hooks.append, gate))
                 for _, user, gate, _ in self.gates]  # fmt: skip
        changes = [{"op": "stream", "disk": self.disk.name, "node": n.name} for n in self.overlays]
        record = changes[0] if len(changes) == 1 else {"op": "transaction", "changes": changes}
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


# -- revert -------------------------------------------------------------------------------------


class RevertJob(Job):
    """Throw away what was written since snapshot `name` (the newest if empty).

    Each overlay of the snapshot that is still the active layer is replaced by a
    fresh empty one on the same base, under the same file and node names.
    """

    kind = "revert"

    def __init__(self, graph: Graph, disk: Disk, name: str) -> None:
        super().__init__(graph, disk)
        self.graph = graph
        self.name = name.strip()
        self.targets: list[tuple[Node, Node, Path]] = []
        self.fresh: list[tuple[Node, Node, Path]] = []  # (file node, overlay node, temp file)
        self.files: list[str] = []

    def claims(self) -> list[Node]:
        return list(walk(self.disk.top))

    async def prepare(self) -> None:
        graph, disk = self.graph, self.disk
        record = _snapshot_record(graph, disk, self.name, "revert")
        self.target = record["name"]
        links = overlay_links(load_changes(graph.spec.path))
        in_disk = {id(n) for n in walk(disk.top)}
        for overlay in record["overlays"]:
            node = graph.nodes.get(overlay["node"])
            if node is None or id(node) not in in_disk or links.get(node.name) != overlay["base"]:
                continue
            if user_edge(node).role == Role.BACKING:
                continue  # a newer snapshot covers it
            self.targets.append((node, _backing(node), image_of(node)))
        if not self.targets:
            raise JobError(
                f"disk '{disk.name}': revert: no overlay of snapshot '{record['name']}' is the "
                "active layer (revert or commit the newer snapshots first)"
            )
        try:
            for node, base, path in self.targets:
                await self._fresh_overlay(node, base, path)
        except (FuseDiskError, OSError) as e:
            raise JobError(f"disk '{disk.name}': revert to '{record['name']}' failed: {e}") from e

    async def _fresh_overlay(self, node: Node, base: Node, path: Path) -> None:
        graph = self.graph
        driver = overlay_driver()
        temp = path.with_name(f".{path.name}.revert")
        self.txn.undo_later(partial(temp.unlink, missing_ok=True))
        temp.unlink(missing_ok=True)
        driver.create_overlay(temp, node.size, os.path.relpath(image_of(base), path.parent),
                              base.driver)  # fmt: skip
        file_node = await graph.add_node(
            _temp_name(graph, f"{node.name}.file"), "file", {"filename": str(temp)}, {}
        )
        self.txn.undo_later(partial(graph.remove_node, file_node))
        new = await graph.add_node(
            _temp_name(graph, node.name), driver.driver, {}, {"file": file_node, "backing": base}
        )
        self.txn.undo_later(partial(graph.remove_node, new))
        self.fresh.append((file_node, new, temp))

    async def commit(self) -> None:
        steps = [repoint(user_edge(old), new) for (old, _, _), (_, new, _) in
                 zip(self.targets, self.fresh, strict=True)]  # fmt: skip
        await self.txn.apply(steps, durable=self._rename_files, then=[self._forget_old])
        self.files = [str(path) for _, _, path in self.targets]
        log.info("disk '%s': reverted to snapshot '%s': %s", self.disk.name, self.target,
                 ", ".join(self.files))  # fmt: skip

    def _rename_files(self) -> None:
        """The point of no return: each fresh file takes the old one's name."""
        for (_, _, path), (file_node, _, temp) in zip(self.targets, self.fresh, strict=True):
            os.rename(temp, path)
            file_node.options["filename"] = str(path)
        for folder in {path.parent for _, _, path in self.targets}:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    async def _forget_old(self) -> None:
        for (old, _, _), (file_node, new, _) in zip(self.targets, self.fresh, strict=True):
            old_file = old.children["file"].node.name
            await self.graph.remove_node(old)
            _rename(self.graph, file_node, old_file)
            _rename(self.graph, new, old.name)


# -- starting them --------------------------------------------------------------------------------


async def start_commit(graph: Graph, disk: Disk, name: str) -> Job:
    """Start committing the newest snapshot (or every layer down to snapshot `name`)."""
    return await graph.jobs.start(CommitJob(graph, disk, name))


async def start_stream(graph: Graph, disk: Disk, text: str) -> Job:
    """Start streaming the backing chains into the disk's active layers."""
    return await graph.jobs.start(StreamJob(graph, disk, text))


async def revert(graph: Graph, disk: Disk, name: str) -> list[str]:
    """Revert to snapshot `name` (the newest if empty); returns the overlay files reset."""
    job = RevertJob(graph, disk, name)
    await graph.jobs.start(job)
    return job.files
