"""Read a running mount through its files: what `status`, `top` and `job` show.

Only the mount's own files are read (docs/mount.md), so these commands work
against any running mount, started by any user or unit, with no socket or
privilege of their own.  Files are read tolerantly: a control missing, not JSON,
or with fields added or renamed yields what can be read, never a traceback.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusedisk.service.mounts import NotAMount, fusedisk_mount_of

#: a node directory's standard entries; anything else is a driver's control file
NODE_FILES = {"driver", "size", "options", "children", "parents", "siblings", "stats", "snapshot"}


def read_text(path: Path) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def read_json(path: Path) -> dict[str, Any]:
    text = read_text(path)
    try:
        doc = json.loads(text) if text else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def read_int(path: Path) -> int | None:
    text = read_text(path)
    try:
        return int(text.strip()) if text else None
    except ValueError:
        return None


@dataclass
class NodeView:
    name: str
    driver: str
    size: int | None
    children: dict[str, str]  # child name (file, backing, children.0) -> node name
    stats: dict[str, Any]
    #: the node's JSON control files (a quorum's status, scrub, replace ...), by name
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)

    def health(self) -> dict[str, Any] | None:
        """A report with a `state` and per-child states (a quorum's `status`), if any."""
        for doc in self.reports.values():
            if isinstance(doc.get("state"), str) and isinstance(doc.get("children"), dict):
                return doc
        return None

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Reports shaped like jobs (state and progress): scrub, replace ..."""
        return {
            name: doc
            for name, doc in self.reports.items()
            if "progress" in doc and isinstance(doc.get("state"), str)
        }


@dataclass
class DiskView:
    name: str
    size: int | None
    read_only: bool
    top: str | None
    nodes: dict[str, NodeView]
    stats: dict[str, Any]
    job: dict[str, Any]


@dataclass
class TreeRow:
    depth: int
    link: str  # the child name in its parent ("" for the top node)
    name: str
    node: NodeView | None  # None: the link names a node the disk's nodes/ did not show
    parent: NodeView | None


def tree_rows(disk: DiskView) -> list[TreeRow]:
    """The disk's tree, depth first from its top node, each node once."""
    rows: list[TreeRow] = []
    seen: set[str] = set()
    stack: list[tuple[int, str, str, NodeView | None]] = []
    if disk.top is not None:
        stack.append((0, "", disk.top, None))
    while stack:
        depth, link, name, parent = stack.pop()
        node = disk.nodes.get(name)
        rows.append(TreeRow(depth, link, name, node, parent))
        if node is None or name in seen:
            continue
        seen.add(name)
        for child_link, child in reversed(node.children.items()):
            stack.append((depth + 1, child_link, child, node))
    return rows


@dataclass
class MountView:
    mountpoint: Path
    disks: dict[str, DiskView]
    last_error: str


def check_mount(mountpoint: Path) -> None:
    """Refuse a path that is not the mount point of a live fusedisk mount (a dead
    one is named as such, with how to clear it: service/mounts.py)."""
    try:
        mounted = fusedisk_mount_of(mountpoint)
    except NotAMount:
        mounted = None
    if mounted is None or Path(os.path.realpath(mountpoint)) != mounted:
        where = f"; the mount is at '{mounted}'" if mounted is not None else ""
        raise NotAMount(f"'{mountpoint}' is not a fusedisk mount{where}")


def disk_names(mountpoint: Path) -> list[str]:
    return sorted(
        name[:-4]
        for name in os.listdir(mountpoint)
        if name.endswith(".img") and (mountpoint / name[:-4]).is_dir()
    )


def read_node(directory: Path, with_reports: bool = True) -> NodeView:
    children = {}
    try:
        for child in sorted(os.listdir(directory / "children")):
            children[child] = os.path.basename(os.readlink(directory / "children" / child))
    except OSError:
        pass
    reports: dict[str, dict[str, Any]] = {}
    if with_reports:
        try:
            names = sorted(set(os.listdir(directory)) - NODE_FILES)
        except OSError:
            names = []
        for name in names:
            doc = read_json(directory / name)
            if doc:
                reports[name] = doc
    return NodeView(
        name=directory.name,
        driver=(read_text(directory / "driver") or "?").strip(),
        size=read_int(directory / "size"),
        children=children,
        stats=read_json(directory / "stats"),
        reports=reports,
    )


def read_disk(mountpoint: Path, name: str, with_reports: bool = True) -> DiskView:
    folder = mountpoint / name
    try:
        top: str | None = os.path.basename(os.readlink(folder / "root"))
    except OSError:
        top = None
    try:
        node_names = sorted(os.listdir(folder / "nodes"))
    except OSError:
        node_names = []
    try:
        mode = os.stat(mountpoint / f"{name}.img").st_mode
        read_only = not mode & 0o222
    except OSError:
        read_only = False
    return DiskView(
        name=name,
        size=read_int(folder / "size"),
        read_only=read_only,
        top=top,
        nodes={n: read_node(folder / "nodes" / n, with_reports) for n in node_names},
        stats=read_json(folder / "stats"),
        job=read_json(folder / "job"),
    )


def read_mount(mountpoint: Path, with_reports: bool = True) -> MountView:
    mountpoint = Path(mountpoint)
    check_mount(mountpoint)
    return MountView(
        mountpoint=mountpoint,
        disks={n: read_disk(mountpoint, n, with_reports) for n in disk_names(mountpoint)},
        last_error=(read_text(mountpoint / "last-error") or "").strip(),
    )


# -- job documents -----------------------------------------------------------------------


@dataclass
class JobProgress:
    """A job or task document, read tolerantly, with its rate and time left."""

    kind: str
    state: str
    done: int
    total: int
    elapsed: float
    error: str
    target: str

    @classmethod
    def of(cls, doc: dict[str, Any], kind: str = "") -> JobProgress:
        def number(key: str) -> float:
            value = doc.get(key)
            return value if isinstance(value, int | float) else 0

        return cls(
            kind=str(doc.get("kind") or kind or "job"),
            state=str(doc.get("state") or "none"),
            done=int(number("done_bytes")),
            total=int(number("total_bytes")),
            elapsed=float(number("elapsed")),
            error=str(doc.get("error") or ""),
            target=str(doc.get("target") or ""),
        )

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def failed(self) -> bool:
        return self.state in ("failed", "cancelled")

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else float(self.state == "done")

    @property
    def rate(self) -> float:
        """Bytes per second, averaged over the job's life."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if not self.running or self.rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / self.rate)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def human_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def job_line(job: JobProgress) -> str:
    """One line: `commit s1: running 45.0%, 12.0 MiB of 26.0 MiB, 2.1 MiB/s, ETA 6s`."""
    what = f"{job.kind} {job.target}".strip()
    line = f"{what}: {job.state}"
    if job.state == "none":
        return "no job"
    line += f" {job.fraction * 100:.1f}%, {human_bytes(job.done)} of {human_bytes(job.total)}"
    if job.running:
        line += f", {human_bytes(job.rate)}/s, ETA {human_seconds(job.eta)}"
    else:
        line += f" in {human_seconds(job.elapsed)}"
    if job.error:
        line += f": {job.error}"
    return line
