"""Driver `dedup`: inline block deduplication, metadata and data on separate children.

Glue only: the format's engine is DedupVolume (volume.py), which knows nothing of
nodes; this file gives it the node's two edges as block stores and forwards the
node contract's requests to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fusedisk.errors import SpecError
from fusedisk.formats.dedup.check import CheckReport
from fusedisk.formats.dedup.layout import MAGIC
from fusedisk.formats.dedup.volume import DedupVolume
from fusedisk.graph.driver_slots import PROBE_CERTAIN
from fusedisk.graph.edge import Edge
from fusedisk.graph.extents import Extent
from fusedisk.graph.node import ChildSlot, Control, GraphOp, Node, NodeContext, Role
from fusedisk.graph.options import Option, option_table

MiB = 1 << 20


class _Store:
    """A child edge as the volume's BlockStore."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    @property
    def desc(self) -> str:
        return f"child '{self.edge.name}' (node '{self.edge.node.name}')"

    @property
    def size(self) -> int:
        return self.edge.node.size

    @property
    def grows(self) -> bool:
        return self.edge.node.grows_on_write

    async def read(self, offset: int, length: int) -> bytes:
        return await self.edge.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.edge.write(offset, data)

    async def flush(self) -> None:
        await self.edge.flush()

    async def truncate(self, size: int) -> None:
        await self.edge.truncate(size)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.edge.block_status(offset, length)


class DedupNode(Node):
    driver = "dedup"
    summary = "deduplicating format: metadata (map, index, refcounts, journal) apart from data"
    option_specs = option_table(
        Option(
            "verify",
            "bool",
            True,
            "compare the bytes before sharing a block whose hash matches "
            "(off: trust xxh3_128, which a guest can collide on purpose)",
            runtime=True,
        ),
        Option(
            "format",
            "bool",
            False,
            "format the children if they are empty (needs size); an existing dedup "
            "image is opened as it is, anything else is refused",
        ),
        Option("size", "size", None, "the disk's size, for format", minimum=1),
        Option(
            "block-size",
            "size",
            None,
            "the deduplication block size, for format (a power of two, 512 B to 1 MiB; "
            "default 4096)",
            minimum=512,
            maximum=1 << 20,
        ),
        Option(
            "journal-size",
            "size",
            16 * MiB,
            "the journal size, for format",
            minimum=256 * 1024,
            maximum=256 * MiB,
        ),
        Option(
            "cache-size",
            "size",
            32 * MiB,
            "memory for cached metadata pages (the index, map and refcounts stay on "
            "the metadata child)",
            minimum=64 * 1024,
        ),
    )
    child_slots = (
        ChildSlot("metadata", Role.METADATA),
        ChildSlot("data", Role.DATA),
    )
    graph_op = GraphOp.TARGET

    # -- image slots (graph/driver_slots.py) --------------------------------------------

    create_options = option_table(
        Option("data", "str", None, "the data file (FILE holds the metadata)"),
        Option("block_size", "size", 4096, "deduplication block size"),
    )

    @classmethod
    def probe(cls, head: bytes) -> int:
        return PROBE_CERTAIN if head[: len(MAGIC)] == MAGIC else 0

    @classmethod
    def create(
        cls,
        target: str,
        size: int | None,
        options: dict[str, Any],
        backing: str | None = None,
        backing_format: str | None = None,
    ) -> None:
        from fusedisk.formats.dedup.create import create_image  # it opens a Graph

        if size is None or not options["data"]:
            raise SpecError("a dedup image needs a size and -o data=DATAFILE")
        create_image(target, options["data"], size, options["block_size"])

    @classmethod
    def info(cls, target: str) -> dict[str, Any]:
        from fusedisk.formats.dedup.create import describe

        return describe(target)

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        children: Mapping[str, Node | list[Node]],
        context: NodeContext,
    ) -> None:
        super().__init__(name, options, children, context)
        self.volume = DedupVolume(
            name,
            self.options,
            _Store(self.children["metadata"]),
            _Store(self.children["data"]),
        )

    async def open(self) -> None:
        await super().open()
        await self.volume.open(self.read_only)
        self.size = self.volume.size
        self.request_alignment = self.volume.sb.block_size

    async def close(self) -> None:
        await self.volume.close()

    async def read(self, offset: int, length: int) -> bytes:
        return await self.volume.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.volume.write(offset, data)

    async def discard(self, offset: int, length: int) -> None:
        """Unmaps the blocks: they read as zeroes and their space is freed."""
        await self.volume.discard(offset, length)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero blocks are never stored, so this always unmaps."""
        await self.volume.write_zeroes(offset, length, unmap)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.volume.block_status(offset, length)

    async def flush(self) -> None:
        await self.volume.flush()

    async def check(self, hashes: bool = True) -> CheckReport:
        """Check every refcount, map entry, index entry and (with `hashes`) block hash."""
        return await self.volume.check(hashes)

    def controls(self) -> dict[str, Control]:
        return {
            "check": Control(
                self.volume.check_text,
                self.volume.check_control,
                "write 1 to check every refcount, map and index entry and block hash "
                "('quick' skips reading the data); read the result (JSON)",
            )
        }

    def driver_stats(self) -> dict[str, Any]:
        return self.volume.stats()
