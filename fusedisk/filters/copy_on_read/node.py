"""Driver `copy-on-read`: data read from the backing chain is written into the top image.

Above an image with a backing file (usually a qcow2 overlay), every read of a
range the top image does not hold itself is, after being read, written back
into the top image, so reading the whole disk once leaves the top image
holding everything and its backing file can be dropped.  Writes, discard and
write-zeroes pass straight through.  References: QEMU block/copy-on-read.c
(cor_co_preadv_part) and bdrv_co_do_copy_on_readv in block/io.c.

Which ranges are copied, for a read of [offset, offset + length):

    top        (the `file` child, filters skipped)   ALLOCATED here -> plain read
    backing 1  |                                     \\
    backing 2  |  walk down the backing edges          > allocated in one of them -> copy
    bottom     v  (inclusive), or to the chain's end  /
    below      nothing below `bottom` is copied; a range allocated nowhere reads
               as zeroes with or without the backing, so it is not copied either

A copy must never overwrite newer guest data.  A copy takes an exclusive lock
on its range; guest writes, discards and write-zeroes take a shared lock on
theirs (they exclude copies, not each other).  Once the copy holds its lock it
asks the top image again what it holds, and copies only what is still not
allocated there: a guest write that finished meanwhile is never undone, and
one that arrives meanwhile waits and lands after the copy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fusedisk.errors import OpenError
from fusedisk.graph.copy import copy_chunks, write_data
from fusedisk.graph.disk import is_zero
from fusedisk.graph.edge import Edge, RangeLock
from fusedisk.graph.extents import Status
from fusedisk.graph.node import Filter, Node, NodeContext, Role
from fusedisk.graph.options import Option, option_table

log = logging.getLogger("fusedisk")


def _skip_filters(node: Node) -> Node:
    """The first node at or below `node` that is not a filter (follows FILTERED edges)."""
    while True:
        filtered = node.edges_with_role(Role.FILTERED)
        if not filtered:
            return node
        node = filtered[0].node


def _backing_edge(node: Node) -> Edge | None:
    edges = _skip_filters(node).edges_with_role(Role.BACKING)
    return edges[0] if edges else None


Range = tuple[int, int]  # (start, end)


def _subtract(ranges: list[Range], taken: list[Range]) -> list[Range]:
    """`ranges` minus `taken`; both sorted and non-overlapping within themselves."""
    out: list[Range] = []
    for start, end in ranges:
        pos = start
        for t_start, t_end in taken:
            if t_end <= pos or t_start >= end:
                continue
            if t_start > pos:
                out.append((pos, t_start))
            pos = max(pos, t_end)
        if pos < end:
            out.append((pos, end))
    return out


class CopyOnReadNode(Filter):
    driver = "copy-on-read"
    summary = "writes data read from the backing chain into the top image"
    option_specs = option_table(
        Option(
            "bottom",
            "str",
            None,
            "a node of the backing chain: data from it is copied, data below it is not",
        ),
    )

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        children: Mapping[str, Node | list[Node]],
        context: NodeContext,
    ) -> None:
        super().__init__(name, options, children, context)
        self._gate = RangeLock()
        self.copy_ops = 0
        self.copied_bytes = 0
        self.zero_copies = 0
        self.skipped_bytes = 0  # newer guest data arrived first
        self._warned_bottom = False
        self._opened = False

    async def open(self) -> None:
        await super().open()
        bottom = self.options.get("bottom")
        if bottom:
            top = _skip_filters(self.filtered.node)
            chain = self._chain()
            names = [e.node.name for e in chain]
            if top.name == bottom:
                raise OpenError(
                    f"node '{self.name}': option 'bottom': '{bottom}' is the top image "
                    "itself: nothing would ever be copied"
                )
            if bottom not in names:
                shown = " -> ".join([top.name, *names]) if names else f"{top.name} (no backing)"
                raise OpenError(
                    f"node '{self.name}': option 'bottom': node '{bottom}' is not in the "
                    f"backing chain below the top image ({shown})"
                )
        self._opened = True

    def _chain(self) -> list[Edge]:
        """Backing edges below the top image, down to `bottom` (inclusive) or the end."""
        bottom = self.options.get("bottom")
        edges: list[Edge] = []
        edge = _backing_edge(self.filtered.node)
        while edge is not None and len(edges) < 1000:
            edges.append(edge)
            if bottom and edge.node.name == bottom:
                return edges
            edge = _backing_edge(edge.node)
        if bottom:
            if not self._warned_bottom and self._opened:
                log.warning(
                    "node '%s': option 'bottom': node '%s' is no longer in the backing "
                    "chain; nothing is copied",
                    self.name,
                    bottom,
                )
                self._warned_bottom = True
            return []
        return edges

    # -- which ranges need copying ---------------------------------------------------

    async def _not_in_top(self, offset: int, length: int) -> list[Range]:
        out: list[Range] = []
        for ext in await self.filtered.block_status(offset, length):
            if not ext.status & Status.ALLOCATED:
                if out and out[-1][1] == ext.offset:
                    out[-1] = (out[-1][0], ext.end)
                else:
                    out.append((ext.offset, ext.end))
        return out

    async def _to_copy(self, offset: int, length: int) -> list[Range]:
        """Ranges not held by the top image but allocated somewhere down to `bottom`."""
        missing = await self._not_in_top(offset, length)
        if not missing:
            return []
        found: list[Range] = []
        for edge in self._chain():
            if not missing:
                break
            size = edge.node.size
            here: list[Range] = []
            for start, end in missing:
                stop = min(end, size)
                if start >= stop:
                    continue
                for ext in await edge.block_status(start, stop - start):
                    if ext.status & Status.ALLOCATED:
                        here.append((ext.offset, ext.end))
            found.extend(here)
            missing = _subtract(missing, here)
        found.sort()
        return found

    # -- requests -----------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        if self.read_only or self.filtered.node.read_only:
            return await self.filtered.read(offset, length)
        ranges = await self._to_copy(offset, length)
        if not ranges:
            return await self.filtered.read(offset, length)
        lock_start, lock_end = ranges[0][0], ranges[-1][1]
        token = await self._gate.acquire(lock_start, lock_end, exclusive=True)
        try:
            # Ask again under the lock: a guest write may have landed meanwhile.
            still = await self._not_in_top(lock_start, lock_end - lock_start)
            copies = _subtract(ranges, _subtract(ranges, still))
            self.skipped_bytes += sum(e - s for s, e in ranges) - sum(e - s for s, e in copies)
            data = await self.filtered.read(offset, length)
            view = memoryview(data)

            async def copy(start: int, n: int) -> None:
                chunk = view[start - offset : start - offset + n]
                if is_zero(chunk):
                    self.zero_copies += 1
                await write_data(self.filtered, start, chunk)
                self.copy_ops += 1

            # the graph's one copy loop; this read already holds the range's lock
            await copy_chunks(copies, copy, progress=self._progress, chunk=len(data) or 1)
        finally:
            self._gate.release(token)
        return data

    async def write(self, offset: int, data: bytes) -> None:
        token = await self._gate.acquire(offset, offset + len(data), exclusive=False)
        try:
            await self.filtered.write(offset, data)
        finally:
            self._gate.release(token)

    async def discard(self, offset: int, length: int) -> None:
        token = await self._gate.acquire(offset, offset + length, exclusive=False)
        try:
            await self.filtered.discard(offset, length)
        finally:
            self._gate.release(token)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        token = await self._gate.acquire(offset, offset + length, exclusive=False)
        try:
            await self.filtered.write_zeroes(offset, length, unmap)
        finally:
            self._gate.release(token)

    @property
    def _progress(self) -> _Copied:
        return _Copied(self)

    def driver_stats(self) -> dict[str, Any]:
        return {
            "copy_ops": self.copy_ops,
            "copied_bytes": self.copied_bytes,
            "zero_copies": self.zero_copies,
            "skipped_bytes": self.skipped_bytes,
        }


class _Copied:
    """Counts the copy loop's progress into the node's `copied_bytes`."""

    def __init__(self, node: CopyOnReadNode) -> None:
        self.node = node

    @property
    def done_bytes(self) -> int:
        return self.node.copied_bytes

    @done_bytes.setter
    def done_bytes(self, value: int) -> None:
        self.node.copied_bytes = value
