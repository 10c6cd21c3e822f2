"""The mount's `metrics` file: its counters in Prometheus text exposition format (0.0.4).

node_exporter's textfile collector, or a one-line scraper (`cat MOUNTPOINT/metrics`
behind any HTTP server), picks it up.  Everything is rendered from the live graph
when the file is read, from what the control tree shows anyway:

    fusedisk_disk_*{disk}                     size, read-only, in-flight requests
    fusedisk_disk_{requests,bytes,errors}_total{disk,op}, ..._request_seconds_total
    fusedisk_disk_job_*{disk,kind}            the running or last graph job of the disk
    fusedisk_node_*{node,driver}              the same request counters, per node
    fusedisk_node_info{disk,node,driver,parent,child}   the tree, one series per edge
    fusedisk_driver_<counter>{node,driver}    a driver's numeric counters (its stats file)
    fusedisk_node_state{node,state}           a node's health, where its `status` shows one
    fusedisk_node_child_state{node,child,child_node,state}   ... and its children's
    fusedisk_node_task_*{node,task}           background work a node's controls report
    fusedisk_node_bitmap_dirty_bytes{node,bitmap}   each dirty bitmap (docs/backup.md);
                                              _enabled, _inconsistent: 0 or 1
    fusedisk_shared_<counter>{section,name}   shared objects (throttle groups)

Nodes are known only through the Node API: what a node offers (numeric driver
stats, a JSON control with `state`/`children`, a JSON control with `progress`) is
read by its shape, never by driver name.  Written by hand: the format is a few
lines of text, and the daemon stays free of a metrics library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fusedisk

if TYPE_CHECKING:
    from fusedisk.graph.graph import Graph
    from fusedisk.graph.node import Node

Labels = dict[str, str]


@dataclass
class _Family:
    kind: str  # counter | gauge | untyped
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)


class Exposition:
    """Metric families in the order first seen; each family's samples together."""

    def __init__(self) -> None:
        self.families: dict[str, _Family] = {}

    def add(self, name: str, kind: str, help: str, labels: Labels, value: float) -> None:
        family = self.families.setdefault(name, _Family(kind, help))
        family.samples.append((labels, value))

    def text(self) -> str:
        lines: list[str] = []
        for name, family in self.families.items():
            lines.append(f"# HELP {name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {name} {family.kind}")
            for labels, value in family.samples:
                lines.append(f"{name}{_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items()) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def metric_name(text: str) -> str:
    """A stats key as a metric name part: [a-zA-Z0-9_] only."""
    name = re.sub(r"[^a-zA-Z0-9_]", "_", text)
    return name if not name[:1].isdigit() else f"_{name}"


def numbers(value: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """The numeric leaves of a stats dict, nested keys joined by '_' (bools as 0/1)."""
    if isinstance(value, bool):
        yield prefix, int(value)
    elif isinstance(value, int | float):
        yield prefix, value
    elif isinstance(value, dict):
        for key, inner in value.items():
            name = metric_name(str(key))
            yield from numbers(inner, f"{prefix}_{name}" if prefix else name)


# -- request counters (graph/stats.py's as_dict shape) -------------------------------------

_IO_FIELDS = {
    "ops": ("requests_total", "counter", "requests completed"),
    "bytes": ("bytes_total", "counter", "bytes of the requests completed"),
    "errors": ("errors_total", "counter", "requests that failed"),
}


def _io(out: Exposition, prefix: str, labels: Labels, stats: dict[str, Any], what: str) -> None:
    """Per-op request counters, in-flight, and any other numeric counter of a stats dict."""
    for key, value in stats.items():
        if isinstance(value, dict) and "ops" in value:
            op = {**labels, "op": key}
            for field_name, (suffix, kind, help) in _IO_FIELDS.items():
                if field_name in value:
                    out.add(f"{prefix}_{suffix}", kind, f"{what}: {help}", op, value[field_name])
            if "total_time_ns" in value:
                out.add(
                    f"{prefix}_request_seconds_total",
                    "counter",
                    f"{what}: time spent in requests (the latency sum; divide by requests)",
                    op,
                    value["total_time_ns"] / 1e9,
                )
        elif key == "in_flight":
            out.add(f"{prefix}_in_flight", "gauge", f"{what}: requests in progress", labels, value)
        elif key == "peak_in_flight":
            out.add(f"{prefix}_peak_in_flight", "gauge",
                    f"{what}: the most requests in progress at once", labels, value)  # fmt: skip
        else:
            for name, number in numbers(value, metric_name(key)):
                out.add(f"{prefix}_{name}", "untyped", f"{what}: {name}", labels, number)


# -- node-reported health and background tasks --------------------------------------------


def _json_controls(node: Node) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, control in node.controls().items():
        try:
            doc = json.loads(control.read())
        except Exception:  # not JSON (a luks header dump), or not readable now: skipped,
            continue  # a driver's control never breaks the metrics file
        if isinstance(doc, dict):
            yield name, doc


def _node_reports(out: Exposition, node: Node, labels: Labels) -> None:
    for control, doc in _json_controls(node):
        children = doc.get("children")
        if isinstance(children, dict) and isinstance(doc.get("state"), str):
            out.add(
                "fusedisk_node_state",
                "gauge",
                f"node health as its '{control}' control reports it (1 for the current state)",
                {**labels, "state": doc["state"]},
                1,
            )
            for child, info in children.items():
                if not isinstance(info, dict):
                    continue
                child_labels = {
                    "node": labels["node"],
                    "child": str(child),
                    "child_node": str(info.get("node", "")),
                }
                if isinstance(info.get("state"), str):
                    out.add(
                        "fusedisk_node_child_state",
                        "gauge",
                        "a child's state as its parent sees it (1 for the current state)",
                        {**child_labels, "state": info["state"]},
                        1,
                    )
                for name, number in numbers({k: v for k, v in info.items() if k != "state"}):
                    out.add(
                        f"fusedisk_node_child_{metric_name(name)}",
                        "untyped",
                        f"a child's {name} as its parent counts it",
                        child_labels,
                        number,
                    )
        elif "progress" in doc and isinstance(doc.get("state"), str):
            task = {**labels, "task": control}
            _task(out, "fusedisk_node_task", task, doc, f"the node's '{control}' task")


def _bitmaps(out: Exposition, node: Node) -> None:
    """A node's dirty bitmaps: how much each marks, and whether it is usable."""
    for bitmap in node.bitmaps:
        labels = {"node": node.name, "bitmap": bitmap.name}
        out.add("fusedisk_node_bitmap_dirty_bytes", "gauge", "bytes a dirty bitmap marks",
                labels, bitmap.count())  # fmt: skip
        out.add("fusedisk_node_bitmap_enabled", "gauge", "1 while writes mark the bitmap",
                labels, int(bitmap.enabled))  # fmt: skip
        out.add("fusedisk_node_bitmap_inconsistent", "gauge",
                "1 for a bitmap not stored cleanly (a crash): never trusted", labels,
                int(bitmap.inconsistent))  # fmt: skip


def _task(out: Exposition, prefix: str, labels: Labels, doc: dict[str, Any], what: str) -> None:
    """A job or task document: state, progress, bytes done and to do, elapsed time."""
    state = str(doc.get("state", "none"))
    out.add(f"{prefix}_running", "gauge", f"1 while {what} runs", labels, int(state == "running"))
    out.add(
        f"{prefix}_state", "gauge", f"{what}: its state (1 for the current one)",
        {**labels, "state": state}, 1,
    )  # fmt: skip
    for key, name, kind in (
        ("progress", "progress_ratio", "gauge"),
        ("done_bytes", "done_bytes", "gauge"),
        ("total_bytes", "total_bytes", "gauge"),
        ("elapsed", "elapsed_seconds", "gauge"),
    ):
        value = doc.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out.add(f"{prefix}_{name}", kind, f"{what}: {key}", labels, value)


# -- the whole mount ----------------------------------------------------------------------


def _node_tasks(out: Exposition, graph: Graph, node: Node, labels: dict[str, str]) -> None:
    """A fan-out node's scrub or replace (graph jobs it owns)."""
    for (owner, kind), job in graph.jobs.last_owned.items():
        if owner == node.name:
            task = {**labels, "task": kind}
            _task(out, "fusedisk_node_task", task, job.as_dict(), f"the node's '{kind}' task")


def render(graph: Graph) -> str:
    out = Exposition()
    out.add(
        "fusedisk_build_info", "gauge", "the fusedisk version serving this mount",
        {"version": fusedisk.__version__}, 1,
    )  # fmt: skip
    seen: set[str] = set()
    for disk in graph.disks.values():
        labels = {"disk": disk.name}
        out.add("fusedisk_disk_size_bytes", "gauge", "disk size", labels, disk.size)
        out.add(
            "fusedisk_disk_read_only", "gauge", "1 if the disk refuses writes", labels,
            int(disk.read_only),
        )  # fmt: skip
        _io(out, "fusedisk_disk", labels, disk.stats_dict(), "disk")
        tree_help = "the tree: one series per node and edge (the top node has no parent)"
        out.add(
            "fusedisk_node_info", "gauge", tree_help,
            {"disk": disk.name, "node": disk.top.name, "driver": disk.top.driver,
             "parent": "", "child": ""}, 1,
        )  # fmt: skip
        job = graph.jobs.last.get(disk.name)
        if job is not None:
            doc = job.as_dict()
            _task(
                out, "fusedisk_disk_job", {**labels, "kind": str(doc.get("kind"))}, doc,
                "the disk's last graph job",
            )  # fmt: skip
        for node in graph.disk_nodes(disk):
            for edge in node.children.values():
                out.add(
                    "fusedisk_node_info", "gauge", tree_help,
                    {"disk": disk.name, "node": edge.node.name, "driver": edge.node.driver,
                     "parent": node.name, "child": edge.name}, 1,
                )  # fmt: skip
            if node.name in seen:
                continue  # a node shared by two disks is counted once
            seen.add(node.name)
            node_labels = {"node": node.name, "driver": node.driver}
            out.add("fusedisk_node_size_bytes", "gauge", "node size", node_labels, node.size)
            _io(out, "fusedisk_node", node_labels, node.stats.as_dict(), "node")
            for name, number in numbers(node.driver_stats()):
                out.add(
                    f"fusedisk_driver_{metric_name(name)}", "untyped",
                    f"the driver's {name} (its stats file)", node_labels, number,
                )  # fmt: skip
            _node_reports(out, node, node_labels)
            _bitmaps(out, node)
            _node_tasks(out, graph, node, node_labels)
    for (section, name), obj in graph.shared_objects.items():
        for key, number in numbers(obj.stats_dict()):
            out.add(
                f"fusedisk_shared_{metric_name(key)}", "untyped", f"{section}: {key}",
                {"section": section, "name": name}, number,
            )  # fmt: skip
    return out.text()
