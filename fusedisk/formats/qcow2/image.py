"""The qcow2 image: the engine of the `qcow2` driver, knowing nothing of nodes.

It works on host files (`HostFile` below: the node's edges are such files): the
image file, the data file (the image file itself unless the header names an
external one) and an optional backing file, which may come and go at run time.
The node glue (children, options, header-named files, graph capabilities) is
in node.py.  References: QEMU docs/interop/qcow2.txt.  The on-disk layout is
in layout.py (parsed in header.py), the cluster mapping and L2 cache in mapping.py, refcounts and
allocation in refcount.py, the snapshot table in snapshots.py, compressed
clusters in compress.py, the repair of a dirty image in repair.py.

Qcow2Image is built of one part per concern, each on the one before it:
core.py (shared state, the metadata set), opening.py (header and tables,
checked), flushing.py (the crash-safe writeback), reading.py (reads, block
status), writing.py (writes, claims, cluster allocation), zeroing.py
(discard, write-zeroes), growth.py (truncate); this module adds the
read-write lifecycle (the dirty bit), dropping the backing file and
introspection.

Concurrency (trio is single-threaded; every await is a suspension point):
- reads and writes to clusters already allocated here (refcount one) take no
  lock: they map the range and do the I/O;
- anything that changes metadata (allocation, copy-on-write, discard) first
  *claims* the guest clusters it changes (a second writer to the same
  cluster waits, then finds it allocated), and changes tables and refcounts
  under one metadata lock, never held while waiting for a claim;
- the data of a new cluster is written before its L2 entry points at it.

Crash safety (see docs/drivers/qcow2.md): a flush writes refcount blocks,
syncs, the refcount table, syncs, L2 tables, syncs, the L1 table, syncs, and
only then applies the refcount decrements that the new tables made safe.
A crash therefore leaves leaks at worst.  A version 3 image is marked dirty
while it is open read-write, so the next read-write open repairs those leaks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from fusedisk.errors import OpenError, ReadOnly
from fusedisk.formats.qcow2.bitmaps import BitmapStore
from fusedisk.formats.qcow2.core import HostFile
from fusedisk.formats.qcow2.growth import ImageGrowth
from fusedisk.formats.qcow2.layout import (
    AUTOCLEAR_KNOWN,
    EXT_BACKING_FORMAT,
    EXT_END,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    OFF_AUTOCLEAR,
    OFF_BACKING_FILE,
    OFF_INCOMPAT,
    V2_HEADER_LENGTH,
)
from fusedisk.graph.bitmaps import BitmapSet

__all__ = ["HostFile", "Qcow2Image"]


class Qcow2Image(ImageGrowth):
    """A qcow2 image on its host files (see the module doc)."""

    def __init__(
        self,
        name: str,
        path: str,
        file: HostFile,
        backing: Callable[[], HostFile | None],
        l2_cache_size: int | None,
        refcount_cache_size: int,
        bitmaps: BitmapSet | None = None,
    ) -> None:
        """`name` is the node's, for messages; `path` names the image file in them.

        `backing` is asked at each use: the graph attaches and detaches it at run time.
        `bitmaps` (the node's) receives the image's persistent bitmaps at open and is
        what a store writes (bitmaps.py).
        """
        super().__init__(name, path, file, backing, l2_cache_size, refcount_cache_size, bitmaps)
        self.bitmap_store = BitmapStore(self)

    # -- read-write lifecycle: the dirty bit ------------------------------------------

    async def start_writing(self) -> None:
        """Repair a dirty image, clear unknown auto-clear bits, mark a v3 image dirty."""
        h = self.h
        if h.incompatible & INCOMPAT_DIRTY:
            from fusedisk.formats.qcow2.repair import repair

            await repair(self)
            self.counters["repairs"] += 1
        if h.autoclear & ~AUTOCLEAR_KNOWN:
            h.autoclear &= AUTOCLEAR_KNOWN
            await self.file.write(OFF_AUTOCLEAR, struct.pack(">Q", h.autoclear))
        if h.version >= 3:
            await self._set_incompat(h.incompatible | INCOMPAT_DIRTY)
        else:
            await self.file.flush()
        self.writing = True
        await self.bitmap_store.store(self.bitmaps, in_use=True)

    async def _set_incompat(self, bits: int) -> None:
        self.h.incompatible = bits
        await self.file.write(OFF_INCOMPAT, struct.pack(">Q", bits))
        await self.file.flush()

    async def stop_writing(self) -> None:
        """Write everything back and mark the image clean: it will not be written again."""
        if not self.writing:
            return
        self.writing = False
        async with self._meta_lock:
            await self.bitmap_store.store(self.bitmaps, in_use=False)
            await self.writeback()
            if self.h.version >= 3:
                await self._set_incompat(self.h.incompatible & ~INCOMPAT_DIRTY)

    async def resume_writing(self) -> None:
        """The counterpart of `stop_writing`: repair and mark dirty, as a read-write open."""
        if self.writing:
            return
        if self.h.incompatible & INCOMPAT_CORRUPT:
            raise OpenError(
                f"node '{self.name}': {self.where} is marked corrupt; it cannot be written"
            )
        async with self._meta_lock:
            await self.start_writing()

    async def store_bitmaps(self) -> None:
        """Write the persistent bitmaps now, marked in use (one was added or removed)."""
        if not self.writing:
            raise ReadOnly(f"node '{self.name}': {self.where} is read-only: its bitmaps "
                           "cannot change")  # fmt: skip
        async with self._meta_lock:
            await self.bitmap_store.store(self.bitmaps, in_use=True)

    async def drop_backing(self) -> None:
        """Make the image standalone: its header names no backing file any more.

        For the end of a stream, when this image holds everything its backing
        chain gave it.  Metadata is written back and synced first; then the
        backing name (offset and size in one 12-byte write) and the
        backing-format extension go.  The graph detaches the backing edge.
        """
        async with self._meta_lock:
            await self.writeback()
            h = self.h
            await self.file.write(OFF_BACKING_FILE, bytes(12))  # its offset and size
            await self.file.flush()
            start = h.header_length if h.version >= 3 else V2_HEADER_LENGTH
            limit = min(self.cs, self.file.size)
            head = await self.file.read(0, limit)
            kept, pos = bytearray(), start
            while pos + 8 <= limit:
                ext_type, length = struct.unpack_from(">II", head, pos)
                if ext_type == EXT_END:
                    break
                step = 8 + (length + 7) // 8 * 8
                if ext_type != EXT_BACKING_FORMAT:
                    kept += head[pos : pos + step]
                pos += step
            end = max(pos + 8, h.backing_file_offset + h.backing_file_size)
            new = bytes(kept) + bytes(8)  # the end marker
            await self.file.write(start, new + bytes(max(0, min(end, limit) - start - len(new))))
            await self.file.flush()
            h.backing_file_offset = h.backing_file_size = 0
            h.backing_file = h.backing_format = None

    # -- introspection -----------------------------------------------------------------------

    async def check(self) -> Any:
        """Refcounts against references, as qemu-img check (check.py)."""
        from fusedisk.formats.qcow2.check import check_image

        return await check_image(self)

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "l2_cache_hits": self.map.cache.hits,
            "l2_cache_misses": self.map.cache.misses,
            "refcount_cache_hits": self.refs.cache.hits,
            "refcount_cache_misses": self.refs.cache.misses,
            "clusters_allocated": self.refs.allocations,
        }
