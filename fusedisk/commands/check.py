"""`fusedisk check SPEC`: validate a spec, open its images read-only, print the trees."""

from __future__ import annotations

import argparse
import sys

import trio

from fusedisk.errors import CorruptImage
from fusedisk.graph.graph import Graph
from fusedisk.graph.node import Node
from fusedisk.spec import Spec, load_spec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="validate a spec and print its trees, without mounting",
        description="Check SPEC as `mount` would (every image is opened, read-only, and "
        "nothing is written), print each disk's tree of nodes, and run the consistency "
        "check of formats that have one (qcow2 refcounts as qemu-img check, dedup). Exit "
        "status: 0 clean, 1 refused, 2 corruption found, 3 leaks only.",
    )
    p.add_argument("spec", help="the TOML spec file")
    p.add_argument(
        "-U", "--force-share", action="store_true",
        help="open images that are in use (as qemu-img -U): no image lock is taken or "
        "tested; what a running writer changes meanwhile may show as errors",
    )  # fmt: skip
    p.set_defaults(func=run)


def _tree_lines(node: Node, label: str, depth: int) -> list[str]:
    lines = [f"{'  ' * depth}{label}{node.name} ({node.driver}, {node.size} bytes)"]
    for edge in node.children.values():
        lines += _tree_lines(edge.node, f"{edge.name}: ", depth + 1)
    return lines


async def _check(spec: Spec) -> tuple[list[str], int]:
    graph = await Graph.open(spec, read_only=True)
    try:
        lines = []
        status = 0
        for disk in graph.disks.values():
            lines.append(f"disk {disk.name}: {disk.size} bytes")
            lines += _tree_lines(disk.top, "", 1)
        # Formats with a consistency check of their own (qcow2, dedup) run it, read-only.
        for node in graph.nodes.values():
            check = getattr(node, "check", None)
            if check is not None:
                report = await check()
                lines += [f"node {node.name}: {line}" for line in report.lines()]
                status = max(status, report.exit_code)
        unused = sorted(set(spec.nodes) - set(graph.nodes))
        if unused:
            lines.append(f"nodes not in any disk: {', '.join(unused)}")
        return lines, status
    finally:
        await graph.close(flush=False)


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.force_share:  # every node that locks its file: `locking = "off"`
        for node in spec.nodes.values():
            if "locking" in node.options:
                node.options["locking"] = "off"
    try:
        lines, status = trio.run(_check, spec)
    except CorruptImage as e:  # found corrupt while opening: as qemu-img check, status 2
        print(f"fusedisk: {e}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return status
