"""`fusedisk info IMAGE [--backing-chain] [--json]`: what `qemu-img info` shows.

For every format fusedisk reads: qcow2 (with its backing chain and internal
snapshots), LUKS (the header, without secrets), dedup metadata, raw.  The JSON
uses `qemu-img info --output=json`'s field names (fusedisk/service/imageinfo.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fusedisk.graph.registry import describable_drivers
from fusedisk.service.imageinfo import chain_info, image_info
from fusedisk.service.reader import human_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe an image file, as qemu-img info does",
        description="Describe IMAGE: format, virtual and allocated size, and what its "
        "format holds (qcow2: cluster size, features, backing file, snapshots; LUKS: "
        "cipher, hash, key slots, never secrets; dedup: geometry and use). Nothing is "
        "written.",
    )
    p.add_argument("image", type=Path, help="the image file (or block device)")
    p.add_argument(
        "-f",
        "--format",
        choices=sorted(describable_drivers()),
        help="do not probe: the image is this",
    )
    p.add_argument(
        "--backing-chain", action="store_true", help="every image of the qcow2 backing chain"
    )
    p.add_argument("--json", action="store_true", help="JSON, with qemu-img's field names")
    p.set_defaults(func=run)


def _size(n: int) -> str:
    return f"{human_bytes(n)} ({n} bytes)"


def _specific(value: Any, indent: int) -> list[str]:
    pad = "    " * indent
    lines = []
    for key, item in value.items():
        name = key.replace("-", " ")
        if isinstance(item, list):
            lines.append(f"{pad}{name}:")
            for i, entry in enumerate(item):
                if not isinstance(entry, dict):  # a list of words (a bitmap's flags)
                    lines.append(f"{pad}    [{i}]: {entry}")
                    continue
                lines.append(f"{pad}    [{i}]:")
                lines += _specific(entry, indent + 2)
        else:
            text = str(item).lower() if isinstance(item, bool) else str(item)
            lines.append(f"{pad}{name}: {text}")
    return lines


def text(info: dict[str, Any]) -> str:
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {_size(info['virtual-size'])}",
        f"disk size: {human_bytes(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        lines.append(
            f"backing file: {info['backing-filename']} "
            f"(actual path: {info['full-backing-filename']})"
        )
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if info.get("dirty-flag"):
        lines.append("dirty flag: yes (not closed cleanly)")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<10}{'TAG':<18}{'VM SIZE':>10}")
        for snap in info["snapshots"]:
            lines.append(f"{snap['id']:<10}{snap['name']:<18}{snap['vm-state-size']:>10}")
    specific = info.get("format-specific")
    if specific:
        lines.append("Format specific information:")
        lines += _specific(specific["data"], 1)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    infos = chain_info(args.image, args.format) if args.backing_chain else None
    if args.json:
        doc: Any = infos if infos is not None else image_info(args.image, args.format)
        print(json.dumps(doc, indent=4))
        return 0
    print("\n\n".join(text(i) for i in (infos or [image_info(args.image, args.format)])))
    return 0
