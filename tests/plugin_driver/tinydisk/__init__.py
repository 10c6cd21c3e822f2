"""A driver from outside fusedisk, for tests/test_driver_plugin.py: the image is a
512-byte header ("TINYDISK" + the size) followed by the guest's bytes.

It is one package, declared under the `fusedisk.drivers` entry-point group (the
dist-info folder beside it), and fills every slot of the driver contract: probe,
create, info and the requests.  Nothing in fusedisk names it.
"""

from __future__ import annotations

import struct
from typing import Any

from fusedisk.errors import CorruptImage, SpecError
from fusedisk.graph.driver_slots import PROBE_CERTAIN
from fusedisk.graph.edge import Edge
from fusedisk.graph.node import ChildSlot, GraphOp, Node, Role
from fusedisk.graph.options import Option, option_table
from fusedisk.hostio.files import create_file, read_head

MAGIC = b"TINYDISK"
HEADER = 512


class TinyNode(Node):
    driver = "tiny"
    summary = "a test format: a 512-byte header, then the guest's bytes"
    child_slots = (ChildSlot("file", Role.FILE),)
    graph_op = GraphOp.TARGET
    accepts_filename = True
    create_options = option_table(Option("fill", "int", 0, "byte the new disk holds"))

    @classmethod
    def probe(cls, head: bytes) -> int:
        return PROBE_CERTAIN if head[:8] == MAGIC else 0

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
            raise SpecError("a tiny image needs a size")
        header = MAGIC + struct.pack(">Q", size)
        body = bytes([options["fill"]]) * size if options["fill"] else b""
        create_file(target, f"cannot create '{target}'", chunks=((0, header), (HEADER, body)),
                    size=HEADER + size)  # fmt: skip

    @classmethod
    def info(cls, target: str) -> dict[str, Any]:
        head = read_head(target, 16, f"tiny image '{target}'")
        return {"virtual-size": struct.unpack(">Q", head[8:16])[0],
                "format-specific": {"type": "tiny", "data": {"header-bytes": HEADER}}}  # fmt: skip

    @property
    def file(self) -> Edge:
        return self.children["file"]

    async def open(self) -> None:
        await super().open()
        head = await self.file.read(0, 16)
        if head[:8] != MAGIC:
            raise CorruptImage(f"node '{self.name}': no tiny header")
        self.size = struct.unpack(">Q", head[8:16])[0]

    async def read(self, offset: int, length: int) -> bytes:
        return await self.file.read(HEADER + offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.file.write(HEADER + offset, data)

    async def flush(self) -> None:
        await self.file.flush()


__all__ = ["TinyNode"]
