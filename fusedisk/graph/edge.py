"""Edges: the only way a parent reaches a child.

An edge carries a role (file, filtered, backing, children, data, metadata,
root) and does the work every request needs once, so drivers never repeat it:
bounds checks, padding of requests to the child's `request_alignment`
(read-modify-write, serialised against overlapping writes), read-only
enforcement, and the per-node counters behind `stats`.

Re-pointing an edge to another node is how a graph change (snapshot, commit,
child replacement) is made; node contents are never swapped.

A background job (commit, stream: graph/commit.py, stream.py) may hook the writes that
pass an edge: each hook's `enter` is awaited before a write, write-zeroes or
discard (it may make the request wait) and its `leave` is called after it,
successful or not (the inner call passes `_hooked=True`).  An edge without
hooks pays one truth test per request.

Dirty bitmaps (graph/bitmaps.py): a write, write-zeroes or discard marks the
child's enabled bitmaps just before the child runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import trio

from fusedisk.errors import OutOfRange, ReadOnly
from fusedisk.graph.extents import Extent, clip_extents

if TYPE_CHECKING:
    from fusedisk.graph.node import Node


class RangeLock:
    """Locks on byte ranges: exclusive ones wait for every overlapping holder,
    shared ones only for overlapping exclusive holders.

    Edges to nodes with a request alignment above 1 take exclusive locks, so a
    read-modify-write of a partial block never interleaves with another write
    to that block; copy jobs (copy-on-read, stream) take exclusive locks while
    guest writes take shared ones, so a copy never overwrites newer data.
    """

    def __init__(self) -> None:
        self._held: list[tuple[int, int, bool, trio.Event]] = []

    async def acquire(
        self, start: int, end: int, exclusive: bool = True
    ) -> tuple[int, int, bool, trio.Event]:
        while True:
            for s, e, excl, event in self._held:
                if s < end and start < e and (exclusive or excl):
                    await event.wait()
                    break
            else:
                token = (start, end, exclusive, trio.Event())
                self._held.append(token)
                return token

    def release(self, token: tuple[int, int, bool, trio.Event]) -> None:
        self._held.remove(token)
        token[3].set()


class WriteHook(Protocol):
    """Sees (and may hold back) the writes that pass an edge; see the module doc."""

    async def enter(self, offset: int, length: int) -> Any: ...

    def leave(self, token: Any) -> None: ...


class Edge:
    """A parent's link to one child, named (`file`, `children.0`) and with a role."""

    __slots__ = ("_locks", "hooks", "name", "node", "parent", "role")

    def __init__(self, parent: Node | None, name: str, role: str, node: Node) -> None:
        self.parent = parent
        self.name = name
        self.role = role
        self.node = node
        self._locks = RangeLock()
        #: write hooks of a running job (install and remove them only while drained)
        self.hooks: list[WriteHook] = []
        node.parents.append(self)

    def __repr__(self) -> str:
        owner = self.parent.name if self.parent is not None else "<disk>"
        return f"<Edge {owner}.{self.name} ({self.role}) -> {self.node.name}>"

    @property
    def size(self) -> int:
        """The child's size now (it changes with the child and with `replace`)."""
        return self.node.size

    def replace(self, new_node: Node) -> None:
        """Point this edge at `new_node` (call only while the disk is drained)."""
        self.node.parents.remove(self)
        self.node = new_node
        new_node.parents.append(self)

    def detach(self) -> None:
        self.node.parents.remove(self)

    async def _enter_hooks(self, offset: int, length: int) -> list[tuple[WriteHook, Any]]:
        entered: list[tuple[WriteHook, Any]] = []
        try:
            for hook in list(self.hooks):
                entered.append((hook, await hook.enter(offset, length)))
        except BaseException:
            self._leave_hooks(entered)
            raise
        return entered

    @staticmethod
    def _leave_hooks(entered: list[tuple[WriteHook, Any]]) -> None:
        for hook, token in reversed(entered):
            hook.leave(token)

    # -- checks -------------------------------------------------------------

    def _check_range(self, offset: int, length: int, writing: bool) -> Node:
        node = self.node
        if offset < 0 or length < 0:
            raise OutOfRange(f"node '{node.name}': negative offset or length")
        # Padding to the alignment may reach into the last partial block past the
        # end (QEMU reads it too: a file reads zeroes there, and an O_DIRECT file
        # whose size is not aligned needs it).
        align = node.request_alignment
        end = -(-node.size // align) * align if align > 1 else node.size
        if offset + length > end and not (writing and node.grows_on_write):
            raise OutOfRange(
                f"node '{node.name}': request {offset}+{length} is past its end ({node.size})"
            )
        if writing and node.read_only:
            raise ReadOnly(f"node '{node.name}' is read-only")
        return node

    # -- requests -----------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        node = self._check_range(offset, length, False)
        if length == 0:
            return b""
        align = node.request_alignment
        if align > 1 and (offset % align or length % align):
            start = offset - offset % align
            end = -(-(offset + length) // align) * align
            padded = await self.read(start, end - start)
            return padded[offset - start : offset - start + length]
        st = node.stats
        t0 = st.start()
        try:
            data = await node.read(offset, length)
        except BaseException as e:
            st.failed(st.read, e)
            raise
        st.done(st.read, length, t0)
        return data

    async def write(self, offset: int, data: bytes, *, _hooked: bool = False) -> None:
        if self.hooks and not _hooked:
            entered = await self._enter_hooks(offset, len(data))
            try:
                await self.write(offset, data, _hooked=True)
            finally:
                self._leave_hooks(entered)
            return
        length = len(data)
        node = self._check_range(offset, length, True)
        if length == 0:
            return
        align = node.request_alignment
        if align == 1:
            await self._write_now(node, offset, data)
            return
        start = offset - offset % align
        end = -(-(offset + length) // align) * align
        token = await self._locks.acquire(start, end)
        try:
            if start != offset or end != offset + length:
                data = await self._pad_with_old_data(offset, data, start, end, align)
            await self._write_now(node, start, data)
        finally:
            self._locks.release(token)

    async def _pad_with_old_data(
        self, offset: int, data: bytes, start: int, end: int, align: int
    ) -> bytes:
        buf = bytearray(end - start)
        if start != offset:
            buf[0:align] = await self.read(start, align)
        tail = end - align
        if end != offset + len(data) and (tail != start or start == offset):
            buf[tail - start :] = await self.read(tail, align)
        buf[offset - start : offset - start + len(data)] = data
        return bytes(buf)

    async def _write_now(self, node: Node, offset: int, data: bytes) -> None:
        if node.bitmaps.enabled:
            node.bitmaps.mark(offset, len(data))
        st = node.stats
        t0 = st.start()
        try:
            await node.write(offset, data)
        except BaseException as e:
            st.failed(st.write, e)
            raise
        st.done(st.write, len(data), t0)

    async def flush(self) -> None:
        node = self.node
        st = node.stats
        t0 = st.start()
        try:
            await node.flush()
        except BaseException as e:
            st.failed(st.flush, e)
            raise
        st.done(st.flush, 0, t0)

    async def discard(self, offset: int, length: int, *, _hooked: bool = False) -> None:
        """Discard is advisory: the unaligned head and tail are simply kept."""
        if self.hooks and not _hooked:
            entered = await self._enter_hooks(offset, length)
            try:
                await self.discard(offset, length, _hooked=True)
            finally:
                self._leave_hooks(entered)
            return
        node = self._check_range(offset, length, True)
        align = node.request_alignment
        start = -(-offset // align) * align
        end = (offset + length) // align * align
        if end <= start:
            return
        if node.bitmaps.enabled:
            node.bitmaps.mark(start, end - start)
        st = node.stats
        t0 = st.start()
        try:
            await node.discard(start, end - start)
        except BaseException as e:
            st.failed(st.discard, e)
            raise
        st.done(st.discard, end - start, t0)

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool = False, *, _hooked: bool = False
    ) -> None:
        """Zero a range; unaligned ends are written as zero bytes (read-modify-write)."""
        if self.hooks and not _hooked:
            entered = await self._enter_hooks(offset, length)
            try:
                await self.write_zeroes(offset, length, unmap, _hooked=True)
            finally:
                self._leave_hooks(entered)
            return
        node = self._check_range(offset, length, True)
        if length == 0:
            return
        align = node.request_alignment
        start = -(-offset // align) * align
        end = (offset + length) // align * align
        if end <= start:
            await self.write(offset, bytes(length))
            return
        if start > offset:
            await self.write(offset, bytes(start - offset))
        if offset + length > end:
            await self.write(end, bytes(offset + length - end))
        token = await self._locks.acquire(start, end) if align > 1 else None
        if node.bitmaps.enabled:
            node.bitmaps.mark(start, end - start)
        st = node.stats
        t0 = st.start()
        try:
            await node.write_zeroes(start, end - start, unmap)
        except BaseException as e:
            st.failed(st.write_zeroes, e)
            raise
        finally:
            if token is not None:
                self._locks.release(token)
        st.done(st.write_zeroes, end - start, t0)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        node = self._check_range(offset, length, False)
        if length == 0:
            return []
        st = node.stats
        t0 = st.start()
        try:
            extents = await node.block_status(offset, length)
        except BaseException as e:
            st.failed(st.block_status, e)
            raise
        st.done(st.block_status, length, t0)
        return clip_extents(extents, offset, length)

    async def truncate(self, size: int) -> None:
        if self.node.read_only:
            raise ReadOnly(f"node '{self.node.name}' is read-only")
        await self.node.truncate(size)
        self.node.bitmaps.resize(self.node.size)
