"""The virtual file tree of a mount: disk files, node directories, control files.

It is computed from the graph each time a path is resolved, so a graph change
(a snapshot inserting nodes) shows at once, with no cache to invalidate here.
It knows nodes only through the Node API (options, controls, stats, edges) and
nothing of pyfuse3; `ops.py` adapts it to FUSE.

    <disk>.img                  the disk
    metrics                     every counter, Prometheus text format (fusedisk/metrics.py)
    <disk>/root                 -> nodes/<top>
    <disk>/stats                disk counters (JSON)
    <disk>/snapshot             take a snapshot / list them (docs/snapshots.md)
    <disk>/commit, stream       start a background job; <disk>/job: its progress, cancel
    <disk>/revert               back to a snapshot
    <disk>/backup               start a point-in-time backup (docs/backup.md)
    <disk>/nodes/<node>/        driver, size, options/, children/, parents/,
                                siblings/, stats, bitmaps/, and the driver's controls
    <disk>/bitmaps              -> nodes/<format node>/bitmaps (docs/backup.md)
    <section>/<name>/           shared objects (throttle-groups): options/, stats
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from fusedisk import metrics
from fusedisk.fuse.names import LAST_ERROR, METRICS
from fusedisk.graph import bitmap_control
from fusedisk.graph.backup import HELP as BACKUP_HELP
from fusedisk.graph.backup import start_backup
from fusedisk.graph.children import start_replace, start_scrub
from fusedisk.graph.commit import start_commit
from fusedisk.graph.disk import Disk
from fusedisk.graph.graph import Graph
from fusedisk.graph.jobs import Job
from fusedisk.graph.node import GraphOp, Node
from fusedisk.graph.revert import revert
from fusedisk.graph.snapshot import list_snapshots, take_snapshot
from fusedisk.graph.stream import start_stream


class Entry:
    """Something at a path of the mount."""


@dataclass
class DirEntry(Entry):
    list: Callable[[], dict[str, Entry]]


@dataclass
class FileEntry(Entry):
    """A control file: `read` renders its content, `write` (if any) acts on text."""

    read: Callable[[], str]
    write: Callable[[str], Awaitable[None]] | None = None


@dataclass
class LinkEntry(Entry):
    target: str


@dataclass
class DiskEntry(Entry):
    disk: Disk


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


_COMMIT_HELP = (
    "write nothing to merge the newest snapshot's overlays into their bases, or a snapshot's\n"
    "name to merge every layer down to its bases; runs in the background: see job\n"
)
_STREAM_HELP = (
    "write nothing to copy the backing data into the active overlays and drop their\n"
    "backing files; runs in the background: see job\n"
)
_REVERT_HELP = (
    "write nothing to throw away what was written since the newest snapshot, or a\n"
    "snapshot's name to go back to it (its overlays must be the active layers)\n"
)


def _value(text: Callable[[], Any]) -> FileEntry:
    return FileEntry(lambda: f"{text()}\n")


class ControlTree:
    """Resolves paths of the mount against the live graph."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.jobs = graph.jobs
        #: why the last refused control-file write was refused (`echo` only shows errno)
        self.last_error = ""

    def resolve(self, path: tuple[str, ...]) -> Entry | None:
        entry: Entry = DirEntry(self.root)
        for name in path:
            if not isinstance(entry, DirEntry):
                return None
            found = entry.list().get(name)
            if found is None:
                return None
            entry = found
        return entry

    # -- directories ------------------------------------------------------------

    def root(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for name, disk in self.graph.disks.items():
            out[f"{name}.img"] = DiskEntry(disk)
            out[name] = DirEntry(partial(self.disk_dir, disk))
        sections = sorted({section for section, _ in self.graph.shared_objects})
        for section in sections:
            out[section] = DirEntry(partial(self.section_dir, section))
        out[LAST_ERROR] = FileEntry(lambda: self.last_error)
        out[METRICS] = FileEntry(lambda: metrics.render(self.graph))
        return out

    def disk_dir(self, disk: Disk) -> dict[str, Entry]:
        nodes = {n.name: n for n in self.graph.disk_nodes(disk)}

        async def snapshot(text: str) -> None:
            await take_snapshot(self.graph, disk, disk.root, text)

        async def commit(text: str) -> None:
            await start_commit(self.graph, disk, text)

        async def stream(text: str) -> None:
            await start_stream(self.graph, disk, text)

        async def revert_to(text: str) -> None:
            await revert(self.graph, disk, text)

        async def job(text: str) -> None:
            await self.jobs.control(disk, text)

        async def backup(text: str) -> None:
            await start_backup(self.graph, disk, text)

        return {
            "root": LinkEntry(f"nodes/{disk.top.name}"),
            "nodes": DirEntry(
                lambda: {
                    name: DirEntry(partial(self.node_dir, disk, n)) for name, n in nodes.items()
                }
            ),
            "size": _value(lambda: disk.size),
            "stats": FileEntry(lambda: _json(disk.stats_dict())),
            "snapshot": FileEntry(lambda: list_snapshots(self.graph, disk), snapshot),
            "commit": FileEntry(lambda: _COMMIT_HELP, commit),
            "stream": FileEntry(lambda: _STREAM_HELP, stream),
            "revert": FileEntry(lambda: _REVERT_HELP, revert_to),
            "job": FileEntry(lambda: self.jobs.status(disk), job),
            "backup": FileEntry(lambda: BACKUP_HELP, backup),
            "bitmaps": LinkEntry(f"nodes/{bitmap_control.bitmap_node(disk).name}/bitmaps"),
        }

    def node_dir(self, disk: Disk, node: Node) -> dict[str, Entry]:
        out: dict[str, Entry] = {
            "driver": _value(lambda: node.driver),
            "size": _value(lambda: node.size),
            "options": DirEntry(lambda: self.options_dir(node)),
            "children": DirEntry(
                lambda: {
                    name: LinkEntry(f"../../{edge.node.name}")
                    for name, edge in node.children.items()
                }
            ),
            "parents": DirEntry(
                lambda: {
                    edge.parent.name: LinkEntry(f"../../{edge.parent.name}")
                    for edge in node.parents
                    if edge.parent is not None
                }
            ),
            "siblings": DirEntry(lambda: self.siblings_dir(node)),
            "stats": FileEntry(lambda: _json({**node.stats.as_dict(), **node.driver_stats()})),
            "bitmaps": DirEntry(lambda: self.bitmaps_dir(node)),
        }
        if node.graph_op is not GraphOp.REFUSE and node.parents:

            async def snapshot(text: str) -> None:
                await take_snapshot(self.graph, disk, node.parents[0], text)

            out["snapshot"] = FileEntry(lambda: list_snapshots(self.graph, disk), snapshot)
        if node.child_set() is not None:
            out.update(self.child_jobs(disk, node))
        for name, control in node.controls().items():
            out[name] = FileEntry(control.read, control.write)
        return out

    def bitmaps_dir(self, node: Node) -> dict[str, Entry]:
        """A node's dirty bitmaps: one directory each, and the commands (bitmap_control.py)."""
        out: dict[str, Entry] = {}
        for bitmap in node.bitmaps:
            files = {k: FileEntry(v) for k, v in bitmap_control.bitmap_files(bitmap).items()}
            out[bitmap.name] = DirEntry(partial(dict, files))
        for name, write in bitmap_control.commands(self.graph, node).items():
            out[name] = FileEntry(partial(str, bitmap_control.COMMANDS[name]), write)
        return out

    def child_jobs(self, disk: Disk, node: Node) -> dict[str, Entry]:
        """`scrub` and `replace` of a fan-out node: jobs of the graph (graph/children.py)."""

        def show(kind: str) -> str:
            job = self.jobs.last_owned.get((node.name, kind))
            return _json({"state": "never run"} if job is None else job.as_dict())

        async def then_wait(job: Job, wait: bool) -> None:
            if wait:
                await self.jobs.wait(job)

        async def scrub(text: str) -> None:
            words = text.split()
            running = self.jobs.last_owned.get((node.name, "scrub"))
            if words == ["wait"] and running is not None and running.state == "running":
                await self.jobs.wait(running)
                return
            await then_wait(await start_scrub(self.graph, disk, node), "wait" in words)

        async def replace(text: str) -> None:
            words = text.split()
            wait = len(words) == 3 and words[2] == "wait"
            text = " ".join(words[:2]) if wait else text
            await then_wait(await start_replace(self.graph, disk, node, text), wait)

        return {
            "scrub": FileEntry(partial(show, "scrub"), scrub),
            "replace": FileEntry(partial(show, "replace"), replace),
        }

    def options_dir(self, owner: Node | Any) -> dict[str, Entry]:
        """One file per option of a node or shared object; run-time ones writable."""
        runtime = owner.runtime_options()
        out: dict[str, Entry] = {}
        for name in owner.option_values():

            def read(name: str = name) -> str:
                return f"{owner.option_values()[name]}\n"

            async def write(text: str, name: str = name) -> None:
                await owner.set_option(name, text)

            out[name] = FileEntry(read, write if name in runtime else None)
        return out

    def siblings_dir(self, node: Node) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for up in node.parents:
            if up.parent is None:
                continue
            for edge in up.parent.children.values():
                if edge.node is not node:
                    out[edge.node.name] = LinkEntry(f"../../{edge.node.name}")
        return out

    def section_dir(self, section: str) -> dict[str, Entry]:
        return {
            name: DirEntry(partial(self.shared_dir, obj))
            for (sec, name), obj in self.graph.shared_objects.items()
            if sec == section
        }

    def shared_dir(self, obj: Any) -> dict[str, Entry]:
        return {
            "options": DirEntry(lambda: self.options_dir(obj)),
            "stats": FileEntry(lambda: _json(obj.stats_dict())),
        }
