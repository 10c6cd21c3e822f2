"""`fusedisk status MOUNTPOINT`: one screen per mount, like `mdadm --detail` or `dmsetup status`.

Disks with their size and read-only flag, each disk's tree with the driver of every
node, health where a node reports it (a quorum's children states, error counts,
last errors), the running or last job with progress and ETA, and the mount's
last refused control write.  `--json` gives the same for scripts.  Reads only
the mount's files (fusedisk/service/reader.py); rich draws the tree, and is
imported here only, never by the daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fusedisk.service.reader import (
    DiskView,
    JobProgress,
    MountView,
    NodeView,
    human_bytes,
    job_line,
    read_mount,
    tree_rows,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="show a mount's disks, trees, health and jobs",
        description="Show a running mount at a glance: disks, size, read-only, each "
        "disk's tree (driver per node), health (quorum children states, errors, last "
        "error) and jobs with progress and ETA. Reads only the mount's files.",
    )
    p.add_argument("mountpoint", type=Path, help="where fusedisk is mounted")
    p.add_argument("--json", action="store_true", help="print JSON instead")
    p.set_defaults(func=run)


def errors(node: NodeView) -> int:
    """Failed requests the node's counters show, every kind together."""
    return sum(
        v.get("errors", 0)
        for v in node.stats.values()
        if isinstance(v, dict) and isinstance(v.get("errors", 0), int)
    )


def _job_doc(doc: dict[str, Any], kind: str = "") -> dict[str, Any]:
    job = JobProgress.of(doc, kind)
    return {**doc, "rate_bytes_per_second": round(job.rate), "eta_seconds": job.eta}


def disk_summary(disk: DiskView) -> dict[str, Any]:
    health = {n.name: h for n in disk.nodes.values() if (h := n.health()) is not None}
    tasks = {
        f"{n.name}/{task}": _job_doc(doc, task)
        for n in disk.nodes.values()
        for task, doc in n.tasks().items()
    }
    return {
        "size": disk.size,
        "read_only": disk.read_only,
        "top": disk.top,
        "nodes": {
            n.name: {
                "driver": n.driver,
                "size": n.size,
                "children": n.children,
                "errors": errors(n),
                "in_flight": n.stats.get("in_flight", 0),
            }
            for n in disk.nodes.values()
        },
        "health": health,
        "job": _job_doc(disk.job) if disk.job else {"state": "none"},
        "tasks": tasks,
    }


def summary(view: MountView) -> dict[str, Any]:
    return {
        "mountpoint": str(view.mountpoint),
        "last_error": view.last_error,
        "disks": {name: disk_summary(d) for name, d in view.disks.items()},
    }


def _node_label(node: NodeView, link: str, parent_health: dict[str, Any] | None) -> str:
    from rich.markup import escape

    label = f"{link}: " if link else ""
    label += f"[bold]{escape(node.name)}[/] ({escape(node.driver)})"
    health = node.health()
    if health is not None:
        children = health["children"]
        in_service = health.get("children_in_service", "?")
        label += f" {_state(health['state'])}, {in_service} of {len(children)} children in service"
    if parent_health is not None:
        child = parent_health["children"].get(link)
        if isinstance(child, dict) and "state" in child:
            label += f" {_state(str(child['state']))}"
            if child.get("last_error"):
                label += f" ({escape(str(child['last_error']))})"
    if errors(node):
        label += f" [red]{errors(node)} errors[/]"
    return label


def _state(state: str) -> str:
    color = {"healthy": "green", "degraded": "yellow", "failed": "red"}.get(state, "cyan")
    return f"[{color}]{state}[/]"


def render(view: MountView) -> Any:
    """rich renderables, one group for the whole screen."""
    from rich.console import Group
    from rich.markup import escape
    from rich.text import Text
    from rich.tree import Tree

    parts: list[Any] = [
        Text(f"fusedisk mount {view.mountpoint}: {len(view.disks)} disk(s)", style="bold")
    ]
    if view.last_error:
        parts.append(Text(f"last refused control write: {view.last_error}", style="yellow"))
    for disk in view.disks.values():
        mode = "read-only" if disk.read_only else "read-write"
        size = f"{human_bytes(disk.size)} ({disk.size} bytes)" if disk.size is not None else "?"
        tree = Tree(f"[bold]{escape(disk.name)}[/] {size}, {mode}")

        branches = [tree]
        for row in tree_rows(disk):
            del branches[row.depth + 1 :]
            if row.node is None:
                branches[-1].add(f"{row.link}: {escape(row.name)}")
                continue
            health = row.parent.health() if row.parent is not None else None
            branches.append(branches[-1].add(_node_label(row.node, row.link, health)))
        parts.append(tree)
        job = JobProgress.of(disk.job)
        if job.state != "none":
            parts.append(Text(f"  job: {job_line(job)}"))
        for node in disk.nodes.values():
            for task, doc in node.tasks().items():
                progress = JobProgress.of(doc, task)
                parts.append(Text(f"  {node.name} {job_line(progress)}"))
    return Group(*parts)


def run(args: argparse.Namespace) -> int:
    view = read_mount(args.mountpoint)
    if args.json:
        json.dump(summary(view), sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    from rich.console import Console

    Console(highlight=False).print(render(view))
    return 0
