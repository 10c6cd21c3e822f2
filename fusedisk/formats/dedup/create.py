"""Making and checking dedup images offline: `fusedisk create -f dedup`,
`fusedisk dedup create|check`, and `fusedisk info` of a dedup image.

A dedup image is two files (metadata and data); formatting opens them as a
one-node graph with `format = true`, so there is one formatting path, the
driver's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from fusedisk.errors import OpenError, SpecError
from fusedisk.formats.dedup import layout
from fusedisk.formats.dedup.check import CheckReport
from fusedisk.graph.graph import Graph
from fusedisk.graph.registry import default_options
from fusedisk.hostio.files import create_file, read_head
from fusedisk.spec_types import DiskSpec, NodeSpec, Spec

_NODE = "dedup"


def _spec(metadata: Path, data: Path, options: dict[str, Any]) -> Spec:
    read_only = bool(options.get("read-only", False))
    children: dict[str, str | list[str]] = {}
    nodes = {}
    for role, path in (("metadata", metadata), ("data", data)):
        name = f"{_NODE}.{role}"
        nodes[name] = NodeSpec(
            name,
            "file",
            {**default_options("file"), "filename": str(path), "read-only": read_only},
            inline=True,
        )
        children[role] = name
    nodes[_NODE] = NodeSpec(_NODE, "dedup", {**default_options("dedup"), **options}, children)
    return Spec(metadata.parent / "dedup.toml", nodes, {_NODE: DiskSpec(_NODE, _NODE)})


def create_image(
    metadata: str | Path,
    data: str | Path,
    size: int,
    block_size: int = 4096,
    journal_size: int = layout.DEFAULT_JOURNAL_SIZE,
) -> None:
    """Create (if needed) and format a dedup image on two files."""
    metadata, data = Path(metadata).absolute(), Path(data).absolute()
    if metadata == data:
        raise SpecError("the metadata and the data must be two different files")
    if metadata.exists() and read_head(str(metadata), 8, f"'{metadata}'") == layout.MAGIC:
        raise OpenError(f"'{metadata}' already holds a dedup image; it is not replaced")
    created = []
    for path in (metadata, data):
        if not path.exists():
            create_file(path, f"cannot create '{path}'")
            created.append(path)
    options = {"format": True, "size": size, "block-size": block_size, "journal-size": journal_size}

    async def run() -> None:
        graph = await Graph.open(_spec(metadata, data, options))
        await graph.close()

    try:
        trio.run(run)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise


def check_image(metadata: str | Path, data: str | Path, hashes: bool = True) -> CheckReport:
    """Open the image read-only and check it; nothing is written."""

    async def run() -> CheckReport:
        spec = _spec(Path(metadata).absolute(), Path(data).absolute(), {"read-only": True})
        graph = await Graph.open(spec)
        try:
            node = graph.nodes[_NODE]
            report: CheckReport = await node.check(hashes)  # type: ignore[attr-defined]
            return report
        finally:
            await graph.close(flush=False)

    return trio.run(run)


def describe(path: str) -> dict[str, Any]:
    """What `fusedisk info` shows of a dedup metadata file."""
    page = layout.PAGE
    head = read_head(path, 2 * page, f"dedup image '{path}'")
    sb, reasons = layout.pick_superblock([head[:page], head[page : 2 * page]])
    if sb is None:
        raise OpenError(f"dedup image '{path}': no valid superblock ({'; '.join(reasons)})")
    c = sb.counters
    bs = sb.block_size
    return {
        "virtual-size": sb.logical_size,
        "cluster-size": bs,
        "format-specific": {
            "type": "dedup",
            "data": {
                "version": sb.version,
                "uuid": sb.uuid.hex(),
                "epoch": sb.epoch,
                "block-size": bs,
                "physical-blocks": sb.physical_blocks,
                "metadata-size": sb.metadata_size,
                "journal-size": sb.journal_size,
                "index-buckets": sb.index_buckets,
                "logical-bytes-used": c.used_logical * bs,
                "physical-bytes-used": c.used_physical * bs,
                "dedup-ratio": round(c.used_logical / c.used_physical, 3)
                if c.used_physical
                else 1.0,
                "index-hits": c.index_hits,
            },
        },
    }
