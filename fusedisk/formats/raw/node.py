"""Driver `raw`: the image is the guest's bytes, optionally a window of its child.

With `offset` and `size` it exposes a slice of the file (a partition, or a
disk inside a larger container), as QEMU's raw driver does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from fusedisk.errors import NotSupported, OpenError, SpecError
from fusedisk.graph.driver_slots import PROBE_FALLBACK
from fusedisk.graph.edge import Edge
from fusedisk.graph.extents import Extent
from fusedisk.graph.node import ChildSlot, GraphOp, Node, Role
from fusedisk.graph.options import Option, option_table
from fusedisk.hostio.files import create_file, image_size


class RawNode(Node):
    driver = "raw"
    summary = "the guest's bytes as they are, optionally a window of the child"
    option_specs = option_table(
        Option("offset", "size", 0, "where the disk starts in the child, in bytes", minimum=0),
        Option("size", "size", None, "the disk's size (default: to the child's end)", minimum=0),
    )
    child_slots = (ChildSlot("file", Role.FILE),)
    graph_op = GraphOp.TARGET
    accepts_filename = True

    # -- image slots (graph/driver_slots.py) --------------------------------------------

    create_options: ClassVar[Mapping[str, Option] | None] = {}

    @classmethod
    def probe(cls, head: bytes) -> int:
        return PROBE_FALLBACK  # any bytes are a raw image; every format outbids it

    @classmethod
    def create(
        cls,
        target: str,
        size: int | None,
        options: dict[str, Any],
        backing: str | None = None,
        backing_format: str | None = None,
    ) -> None:
        if size is None:
            raise SpecError("a raw image needs a size")
        create_file(target, f"cannot create '{target}'", size=size)

    @classmethod
    def info(cls, target: str) -> dict[str, Any]:
        return {"virtual-size": image_size(target, f"image '{target}'")}

    @property
    def file(self) -> Edge:
        return self.children["file"]

    async def open(self) -> None:
        await super().open()
        child = self.file.node
        self._offset = int(self.options["offset"])
        if self._offset > child.size:
            raise OpenError(
                f"node '{self.name}': option 'offset': {self._offset} is past the end of "
                f"'{child.name}' ({child.size} bytes)"
            )
        wanted = self.options["size"]
        self.size = child.size - self._offset if wanted is None else int(wanted)
        if self._offset + self.size > child.size:
            raise OpenError(
                f"node '{self.name}': option 'size': offset {self._offset} + size {self.size} "
                f"is past the end of '{child.name}' ({child.size} bytes)"
            )
        self.request_alignment = child.request_alignment

    async def read(self, offset: int, length: int) -> bytes:
        return await self.file.read(self._offset + offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.file.write(self._offset + offset, data)

    async def flush(self) -> None:
        await self.file.flush()

    async def discard(self, offset: int, length: int) -> None:
        await self.file.discard(self._offset + offset, length)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        await self.file.write_zeroes(self._offset + offset, length, unmap)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        extents = await self.file.block_status(self._offset + offset, length)
        return [e.shifted(-self._offset) for e in extents]

    async def truncate(self, size: int) -> None:
        if self._offset or self.options["size"] is not None:
            raise NotSupported(f"node '{self.name}': a window (offset/size) cannot be resized")
        await self.file.truncate(size)
        self.size = size
