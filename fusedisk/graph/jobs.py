"""Commit, stream and revert: the snapshot controls that change a live chain.

Each works on the overlays a snapshot inserted (graph/snapshot.py), found
through the change log, so it acts below the filters and on every sibling of
a quorum at once.

commit (a background job; QEMU's active commit, which is a mirror):
    1. drained: the base and what it writes to become writable (its leaves are
       opened again read-write and swapped in; a qcow2 base is marked dirty),
       and a recorder is hooked on the edge into the overlay: from now on every
       guest write, write-zeroes or discard reaching the overlay marks its range
    2. live: every extent the overlay holds (ALLOCATED) is copied into the base,
       then the ranges the guest wrote meanwhile, while they still add up to much
    3. drained: the last written ranges are copied, the base is flushed, the
       change is recorded (changes.py), the edge is re-pointed to the base, the
       overlay leaves the graph and its file is deleted
    `commit NAME` commits layer by layer down to the bases of snapshot NAME.

stream (a background job; QEMU's block-stream):
    the overlay copies what it does not hold from its backing chain, chunk by
    chunk; each chunk holds an exclusive range lock that guest writes to the
    overlay (hooked on its edge, shared locks) wait for, and the chunk asks the
    overlay again what it holds once it has the lock, so a guest write is never
    overwritten by older backing data.  Ranges that read as zeroes are not
    copied: the standalone image reads them as zeroes too.  Then, drained, the
    header drops its backing file, the change is recorded, and the old backing
    chain leaves the graph (its files stay on the host).

revert (immediate): a fresh empty overlay on the same base is created beside the
    active one, opened, and renamed over it while the disk is drained; node and
    file names stay the same, so the change log needs no record.

A job that fails or is cancelled before its record is saved leaves the graph
as it was: the overlay stays on top, and what was copied so far is harmless
(a commit only wrote base ranges the overlay shadows; a stream only filled the
overlay with what it read through anyway).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from fusedisk.errors import ControlError, FuseDiskError
from fusedisk.graph.changes import live_snapshots, load_changes, overlay_links, save_changes
from fusedisk.graph.disk import is_zero
from fusedisk.graph.edge import Edge, RangeLock
from fusedisk.graph.extents import Status
from fusedisk.graph.node import Node, Role, walk
from fusedisk.graph.snapshot import image_of, snapshot_points

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk
    from fusedisk.graph.graph import Graph

log = logging.getLogger("fusedisk")

CHUNK = 1 << 20  # bytes copied per step (guest requests run in between)
SCAN = 64 << 20  # bytes of block status asked at once
CONVERGE_BYTES = 4 << 20  # copy the guest's new writes live while more is dirty than this
CONVERGE_ROUNDS = 8
JOB_ROLE = "job"  # a job's own edges: parentless, never in a node's children

Range = tuple[int, int]  # (start, end)


class JobError(ControlError):
    pass


def _merge(ranges: list[Range]) -> list[Range]:
    out: list[Range] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        elif end > start:
            out.append((start, end))
    return out


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
        ranges, self._ranges = _merge(self._ranges), []
        return ranges

    def pending(self) -> int:
        return sum(end - start for start, end in _merge(self._ranges))


class _CopyGate:
    """Guest writes take shared locks on their ranges, a stream chunk an exclusive one."""

    def __init__(self) -> None:
        self._locks = RangeLock()

    async def enter(self, offset: int, length: int) -> Any:
        return await self._locks.acquire(offset, offset + length, exclusive=False)

    async def lock(self, start: int, end: int) -> Any:
        return await self._locks.acquire(start, end, exclusive=True)

    def leave(self, token: Any) -> None:
        self._locks.release(token)


# -- the job object and the per-mount registry ------------------------------------------


@dataclass
class Job:
    """A background commit or stream, as `<disk>/job` shows it."""

    kind: str  # "commit" | "stream"
    disk: str
    target: str  # the snapshot committed down to, or the nodes streamed into
    state: str = "running"  # running | done | failed | cancelled
    done_bytes: int = 0
    total_bytes: int = 0
    error: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    over: trio.Event = field(default_factory=trio.Event)

    def as_dict(self) -> dict[str, Any]:
        end = self.finished if self.finished is not None else time.time()
        return {
            "kind": self.kind,
            "target": self.target,
            "state": self.state,
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "progress": round(self.done_bytes / self.total_bytes, 4) if self.total_bytes else 1.0,
            "elapsed": round(end - self.started, 3),
            "error": self.error,
            **self.detail,
        }


class Jobs:
    """The jobs of one mount: at most one running per disk, and the last one of each."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.running: dict[str, Job] = {}
        self.last: dict[str, Job] = {}

    def check_idle(self, disk: Disk, action: str) -> None:
        job = self.running.get(disk.name)
        if job is not None:
            raise JobError(
                f"disk '{disk.name}': a {job.kind} is running; {action} waits for it to end "
                "(or write 'cancel' to its job file)"
            )

    def status(self, disk: Disk) -> str:
        job = self.last.get(disk.name)
        doc = job.as_dict() if job is not None else {"kind": None, "state": "none"}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    async def control(self, disk: Disk, text: str) -> None:
        """`cancel`: stop the running job; `wait`: return when it ends (error if it failed)."""
        word = text.strip()
        job = self.running.get(disk.name)
        if word == "cancel":
            if job is None:
                raise JobError(f"disk '{disk.name}': no job is running")
            job.scope.cancel()
            await job.over.wait()
        elif word == "wait":
            job = job or self.last.get(disk.name)
            if job is None:
                raise JobError(f"disk '{disk.name}': there is no job to wait for")
            await job.over.wait()
            if job.state != "done":
                raise JobError(f"disk '{disk.name}': the {job.kind} {job.state}: {job.error}")
        else:
            raise JobError(f"disk '{disk.name}': job: write 'cancel' or 'wait', not {word!r}")

    def start(self, disk: Disk, job: Job, body: Callable[[Job], Awaitable[None]]) -> Job:
        self.check_idle(disk, f"a {job.kind}")
        self.running[disk.name] = self.last[disk.name] = job

        async def run() -> None:
            try:
                with job.scope:
                    await body(job)
                    job.state = "done"
                if job.state == "running":
                    job.state, job.error = "cancelled", "cancelled"
            except FuseDiskError as e:
                job.state, job.error = "failed", str(e)
            except Exception as e:
                job.state, job.error = "failed", f"{type(e).__name__}: {e}"
                log.exception("disk '%s': %s failed", disk.name, job.kind)
            finally:
                job.finished = time.time()
                del self.running[disk.name]
                job.over.set()
            if job.state == "failed":
                log.error("disk '%s': %s failed: %s", disk.name, job.kind, job.error)
            else:
                log.info("disk '%s': %s of %s %s", disk.name, job.kind, job.target, job.state)

        trio.lowlevel.spawn_system_task(run, name=f"{job.kind} {disk.name}")
        return job

    async def aclose(self) -> None:
        """Cancel every running job and wait for each to put its graph back."""
        for job in list(self.running.values()):
            job.scope.cancel()
            await job.over.wait()


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
                break
            layer = base
        chains.append(layers)
    if not chains:
        raise JobError(f"disk '{disk.name}': commit: snapshot '{record['name']}' has no overlay")
    return record["name"], chains


# -- helpers shared by the jobs -------------------------------------------------------------


async def _copy(job: Job, src: Edge, dst: Edge, start: int, end: int) -> None:
    """Copy [start, end) from `src` to `dst` in chunks; zeroes as write-zeroes."""
    pos = start
    while pos < end:
        n = min(CHUNK, end - pos)
        data = await src.read(pos, n)
        if is_zero(data):
            await dst.write_zeroes(pos, n, False)
        else:
            await dst.write(pos, data)
        pos += n
        job.done_bytes += n
        await trio.lowlevel.checkpoint()  # guest requests, and cancellation, in between


async def _allocated(edge: Edge) -> list[Range]:
    """The ranges a node holds itself (ALLOCATED), not from its backing."""
    out: list[Range] = []
    size = edge.node.size
    for offset in range(0, size, SCAN):
        for ext in await edge.block_status(offset, min(SCAN, size - offset)):
            if ext.status & Status.ALLOCATED:
                out.append((ext.offset, ext.end))
        await trio.lowlevel.checkpoint()
    return _merge(out)


def _rename(graph: Graph, node: Node, name: str) -> None:
    """Give a node opened under a temporary name the name of the one it replaced."""
    del graph.nodes[node.name]
    node.name = name
    graph.nodes[name] = node


async def _set_read_only(nodes: list[Node]) -> None:
    """Back to read-only (parents first: a qcow2 writes back and marks itself clean)."""
    for node in nodes:
        try:
            await node.prepare_read_only()
        except Exception as e:
            log.warning("node '%s': cannot mark it clean: %s", node.name, e)
        node.read_only = True


def _temp_name(graph: Graph, name: str) -> str:
    temp = f"{name}~new"
    while temp in graph.nodes or temp in graph.spec.nodes:
        temp += "~"
    return temp


# -- commit -------------------------------------------------------------------------------------


@dataclass
class _Step:
    """One overlay merged into its base in a commit round."""

    overlay: Node
    base: Node
    user: Edge
    recorder: _DirtyRecorder = field(default_factory=_DirtyRecorder)
    src: Edge | None = None
    dst: Edge | None = None
    writable: list[Node] = field(default_factory=list)


async def start_commit(graph: Graph, disk: Disk, jobs: Jobs, name: str) -> Job:
    """Start committing the newest snapshot (or every layer down to snapshot `name`)."""
    jobs.check_idle(disk, "a commit")
    target, chains = _commit_chains(graph, disk, name.strip())
    job = Job("commit", disk.name, target)
    job.detail["layers"] = [[n.name for n in chain] for chain in chains]

    async def body(job: Job) -> None:
        pending = [list(chain) for chain in chains]
        while any(pending):
            round_layers = [chain.pop(0) for chain in pending if chain]
            await _commit_round(graph, disk, job, round_layers)

    return jobs.start(disk, job, body)


async def _reopen_writable(graph: Graph, step: _Step) -> None:
    """Drained: swap in read-write opens of the base's leaves; base and subtree writable."""
    subtree = _own_subtree(step.base)
    declared = graph.user_spec.nodes
    for node in subtree:
        if node.name in declared and declared[node.name].options.get("read-only"):
            raise JobError(
                f"node '{node.name}' is read-only in the spec; a commit would write to it"
            )
    fresh: list[tuple[Node, Node]] = []
    try:
        for leaf in [n for n in subtree if not n.children]:
            options = {**leaf.options, "read-only": False}
            temp = _temp_name(graph, leaf.name)
            fresh.append((leaf, await graph.add_node(temp, leaf.driver, options, {})))
    except BaseException:
        with trio.CancelScope(shield=True):
            for _, node in fresh:
                await graph.remove_node(node)
        raise
    for old, new in fresh:
        for edge in [e for e in old.parents if e.role != JOB_ROLE]:
            edge.replace(new)
        await graph.remove_node(old)
        _rename(graph, new, old.name)
    step.writable = _own_subtree(step.base)
    for node in step.writable:
        node.read_only = False
    for node in reversed(step.writable):  # children first: a qcow2 writes to its file
        prepare = getattr(node, "prepare_writable", None)
        if prepare is not None:
            await prepare()


async def _commit_round(graph: Graph, disk: Disk, job: Job, layers: list[Node]) -> None:
    steps = [_Step(layer, _backing(layer), user_edge(layer)) for layer in layers]
    recorded = False
    try:
        async with disk.drained():
            for step in steps:
                step.writable = _own_subtree(step.base)  # to undo, even if half made
                await _reopen_writable(graph, step)
                step.user.hooks.append(step.recorder)
                step.src = Edge(None, "commit", JOB_ROLE, step.overlay)
                step.dst = Edge(None, "commit", JOB_ROLE, step.base)
        plans = [(step, await _allocated(step.src)) for step in steps if step.src is not None]
        job.total_bytes += sum(end - start for _, ranges in plans for start, end in ranges)
        for step, ranges in plans:
            assert step.src is not None and step.dst is not None
            for start, end in ranges:
                await _copy(job, step.src, step.dst, start, end)
        for _ in range(CONVERGE_ROUNDS):  # the guest's writes meanwhile, while they are many
            if sum(step.recorder.pending() for step in steps) <= CONVERGE_BYTES:
                break
            await _copy_dirty(job, steps)
        async with disk.drained():
            await _copy_dirty(job, steps)
            for step in steps:
                assert step.dst is not None
                await step.dst.flush()
            with trio.CancelScope(shield=True):
                files = [image_of(step.overlay) for step in steps]
                records = [
                    {"op": "commit", "disk": disk.name, "overlay": step.overlay.name,
                     "base": step.base.name}
                    for step in steps
                ]  # fmt: skip
                save_changes(graph.spec.path, [*load_changes(graph.spec.path), *records])
                recorded = True
                for step in steps:
                    _unhook(step)
                    step.user.replace(step.base)
                    await graph.remove_node(step.overlay)
        for path in files:
            try:
                path.unlink()
            except OSError as e:
                log.warning("disk '%s': commit: cannot delete '%s': %s", disk.name, path, e)
        log.info("disk '%s': committed %s", disk.name,
                 ", ".join(f"{s.overlay.name} into {s.base.name}" for s in steps))  # fmt: skip
    finally:
        if not recorded:
            with trio.CancelScope(shield=True):
                for step in steps:
                    _unhook(step)
                    await _set_read_only(step.writable)


async def _copy_dirty(job: Job, steps: list[_Step]) -> None:
    for step in steps:
        assert step.src is not None and step.dst is not None
        ranges = step.recorder.take()
        job.total_bytes += sum(end - start for start, end in ranges)
        for start, end in ranges:
            await _copy(job, step.src, step.dst, start, end)


def _unhook(step: _Step) -> None:
    if step.recorder in step.user.hooks:
        step.user.hooks.remove(step.recorder)
    for edge in (step.src, step.dst):
        if edge is not None and edge in edge.node.parents:
            edge.detach()
    step.src = step.dst = None


# -- stream -------------------------------------------------------------------------------------


async def start_stream(graph: Graph, disk: Disk, jobs: Jobs, text: str) -> Job:
    """Start streaming the backing chains into the disk's active layers."""
    jobs.check_idle(disk, "a stream")
    if text.strip():
        raise JobError(f"disk '{disk.name}': stream takes no argument, not {text.strip()!r}")
    overlays = []
    for edge in snapshot_points(disk.root):
        node = edge.node
        if "backing" not in node.children:
            continue
        if getattr(node, "drop_backing", None) is None:
            raise JobError(
                f"disk '{disk.name}': stream: node '{node.name}' ({node.driver}) cannot "
                "drop its backing file"
            )
        overlays.append(node)
    if not overlays:
        raise JobError(f"disk '{disk.name}': stream: no layer of the disk has a backing file")
    job = Job("stream", disk.name, ", ".join(n.name for n in overlays))
    return jobs.start(disk, job, lambda job: _stream(graph, disk, job, overlays))


async def _stream(graph: Graph, disk: Disk, job: Job, overlays: list[Node]) -> None:
    gates = [(node, user_edge(node), _CopyGate()) for node in overlays]
    edges: list[Edge] = []
    recorded = False
    try:
        async with disk.drained():  # hooks go in while no guest write is in flight
            for node, user, gate in gates:
                user.hooks.append(gate)
                edges.append(Edge(None, "stream", JOB_ROLE, node))
        job.total_bytes = sum(node.size for node in overlays)
        for (node, _, gate), edge in zip(gates, edges, strict=True):
            for offset in range(0, node.size, CHUNK):
                end = min(node.size, offset + CHUNK)
                token = await gate.lock(offset, end)
                try:
                    for ext in await edge.block_status(offset, end - offset):
                        if ext.status & (Status.ALLOCATED | Status.ZERO):
                            continue
                        data = await edge.read(ext.offset, ext.length)
                        if not is_zero(data):
                            await edge.write(ext.offset, data)
                finally:
                    gate.leave(token)
                job.done_bytes += end - offset
                await trio.lowlevel.checkpoint()
        async with disk.drained():
            for node in overlays:
                await node.drop_backing()  # type: ignore[attr-defined]
            with trio.CancelScope(shield=True):
                records = [{"op": "stream", "disk": disk.name, "node": n.name} for n in overlays]
                save_changes(graph.spec.path, [*load_changes(graph.spec.path), *records])
                recorded = True
                for (node, user, gate), edge in zip(gates, edges, strict=True):
                    user.hooks.remove(gate)
                    edge.detach()
                    backing = node.children.pop("backing")
                    backing.detach()
                    if not backing.node.parents:
                        await graph.remove_node(backing.node)
        log.info("disk '%s': streamed into %s", disk.name, job.target)
    finally:
        if not recorded:
            for (_, user, gate), edge in zip(gates, edges, strict=False):
                if gate in user.hooks:
                    user.hooks.remove(gate)
                edge.detach()


# -- revert -------------------------------------------------------------------------------------


async def revert(graph: Graph, disk: Disk, jobs: Jobs, name: str) -> list[str]:
    """Throw away what was written since snapshot `name` (the newest if empty).

    Each overlay of the snapshot that is still the active layer is replaced by a
    fresh empty one on the same base, under the same file and node names.
    Returns the overlay files reset.
    """
    from fusedisk.formats.qcow2.create import create_qcow2

    jobs.check_idle(disk, "a revert")
    record = _snapshot_record(graph, disk, name.strip(), "revert")
    links = overlay_links(load_changes(graph.spec.path))
    in_disk = {id(n) for n in walk(disk.top)}
    targets: list[tuple[Node, Node, Path]] = []
    for overlay in record["overlays"]:
        node = graph.nodes.get(overlay["node"])
        if node is None or id(node) not in in_disk or links.get(node.name) != overlay["base"]:
            continue
        if user_edge(node).role == Role.BACKING:
            continue  # a newer snapshot covers it
        targets.append((node, _backing(node), image_of(node)))
    if not targets:
        raise JobError(
            f"disk '{disk.name}': revert: no overlay of snapshot '{record['name']}' is the "
            "active layer (revert or commit the newer snapshots first)"
        )
    temps: list[Path] = []
    opened: list[Node] = []
    try:
        for node, base, path in targets:
            temp = path.with_name(f".{path.name}.revert")
            temps.append(temp)
            create_qcow2(
                temp,
                node.size,
                backing=os.path.relpath(image_of(base), path.parent),
                backing_fmt=base.driver,
                overwrite=True,
            )
            file_node = await graph.add_node(
                _temp_name(graph, f"{node.name}.file"), "file", {"filename": str(temp)}, {}
            )
            opened.append(file_node)
            opened.append(
                await graph.add_node(
                    _temp_name(graph, node.name), "qcow2", {}, {"file": file_node, "backing": base}
                )
            )
    except BaseException as e:
        with trio.CancelScope(shield=True):
            for new in reversed(opened):
                await graph.remove_node(new)
        for temp in temps:
            temp.unlink(missing_ok=True)
        if isinstance(e, FuseDiskError | OSError):
            raise JobError(f"disk '{disk.name}': revert to '{record['name']}' failed: {e}") from e
        raise
    async with disk.drained():
        with trio.CancelScope(shield=True):
            for (old, _, path), temp, file_node, new in zip(
                targets, temps, opened[0::2], opened[1::2], strict=True
            ):
                old_file = old.children["file"].node.name
                os.rename(temp, path)
                file_node.options["filename"] = str(path)
                user_edge(old).replace(new)
                await graph.remove_node(old)
                _rename(graph, file_node, old_file)
                _rename(graph, new, old.name)
            for folder in {path.parent for _, _, path in targets}:
                fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    files = [str(path) for _, _, path in targets]
    log.info("disk '%s': reverted to snapshot '%s': %s", disk.name, record["name"],
             ", ".join(files))  # fmt: skip
    return files
