"""A test-only in-memory node with a chosen request alignment, to check the edge
and the disk gate without files, and to stack drivers on."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from fusedisk.graph.extents import Extent, Status
from fusedisk.graph.node import Node
from fusedisk.graph.options import Option, option_table


class Context:
    base_dir = Path("/nonexistent")

    async def open_implicit(self, *args: Any) -> Node:
        raise NotImplementedError

    def shared(self, *args: Any) -> Any:
        raise NotImplementedError

    async def open_spare(self, name: str) -> Node:
        raise NotImplementedError

    async def remove_node(self, node: Node) -> None:
        await node.close()

    def record_change(self, change: dict[str, Any]) -> None:
        self.changes = [*getattr(self, "changes", []), change]


class MemoryNode(Node):
    """Bytes in a bytearray; records every request it sees (to check alignment)."""

    def __init__(self, size: int, align: int = 1, name: str = "mem") -> None:
        super().__init__(name, {}, {}, Context())
        self.size = size
        self.request_alignment = align
        self.buf = bytearray(size)
        self.requests: list[tuple[str, int, int]] = []
        self.flushes = 0
        self.gate: trio.Event | None = None  # when set, writes wait on it

    def _seen(self, kind: str, offset: int, length: int) -> None:
        assert offset % self.request_alignment == 0, (kind, offset)
        assert length % self.request_alignment == 0, (kind, length)
        self.requests.append((kind, offset, length))

    async def read(self, offset: int, length: int) -> bytes:
        self._seen("read", offset, length)
        await trio.lowlevel.checkpoint()
        return bytes(self.buf[offset : offset + length])

    async def write(self, offset: int, data: bytes) -> None:
        self._seen("write", offset, len(data))
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        self.buf[offset : offset + len(data)] = data

    async def flush(self) -> None:
        self.flushes += 1

    async def discard(self, offset: int, length: int) -> None:
        self._seen("discard", offset, length)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._seen("write_zeroes", offset, length)
        self.buf[offset : offset + length] = bytes(length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length, Status.DATA | Status.ALLOCATED)]


class MemoryDriver(MemoryNode):
    """MemoryNode as a spec driver (`driver = "memory"`, option `size`), for tests on
    trio's mock clock: its requests never leave the event loop, while the `file`
    driver's wait in worker threads, which the mock clock's autojump cannot see.
    Register it per test with `monkeypatch.setitem(drivers(), "memory", MemoryDriver)`."""

    driver = "memory"
    option_specs = option_table(Option("size", "size", 4 << 20, "the size in bytes"))

    def __init__(
        self, name: str, options: Mapping[str, Any], children: Mapping[str, Any], context: Any
    ) -> None:
        Node.__init__(self, name, options, children, context)
        self.size = int(self.options["size"])
        self.buf = bytearray(self.size)
        self.requests = []
        self.flushes = 0
        self.gate = None
