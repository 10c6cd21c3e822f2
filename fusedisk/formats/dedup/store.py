"""The two block stores a dedup volume works on, as the volume sees them.

The node gives its `metadata` and `data` edges (driver.py adapts them), so
nothing below driver.py knows of nodes or edges.
"""

from __future__ import annotations

from typing import Protocol

from fusedisk.errors import CorruptImage, OutOfRange
from fusedisk.graph.extents import Extent


class BlockStore(Protocol):
    """Where the volume keeps its metadata or its data (a node's edge, adapted)."""

    @property
    def desc(self) -> str:
        """How messages name it: "child 'metadata' (node 'md')"."""
        ...

    @property
    def size(self) -> int: ...

    @property
    def grows(self) -> bool: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None: ...

    async def truncate(self, size: int) -> None: ...

    async def block_status(self, offset: int, length: int) -> list[Extent]: ...


async def read_physical(name: str, data: BlockStore, bs: int, pbn: int, count: int) -> bytes:
    """`count` physical blocks from `pbn` on; a block past the end is corruption."""
    try:
        return await data.read(pbn * bs, count * bs)
    except OutOfRange:
        raise CorruptImage(
            f"node '{name}': physical block {pbn + count - 1} is past the end of "
            f"{data.desc} ({data.size} bytes)"
        ) from None
