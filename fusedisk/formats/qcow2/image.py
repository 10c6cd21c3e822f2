"""The qcow2 image: the engine of the `qcow2` driver, knowing nothing of nodes.

It works on host files (`HostFile` below: the node's edges are such files): the
image file, the data file (the image file itself unless the header names an
external one) and an optional backing file, which may come and go at run time.
The node glue (children, options, header-named files, graph capabilities) is
in node.py.  References: QEMU docs/interop/qcow2.txt.  The on-disk layout is
in layout.py, the cluster mapping and L2 cache in mapping.py, refcounts and
allocation in refcount.py, the snapshot table in snapshots.py, compressed
clusters in compress.py, the repair of a dirty image in repair.py.

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
from typing import Any, Protocol

import numpy as np
import trio

from fusedisk.errors import CorruptImage, NotSupported, OpenError, ReadOnly
from fusedisk.formats.qcow2.bitmaps import BitmapStore
from fusedisk.formats.qcow2.compress import decompress_cluster
from fusedisk.formats.qcow2.layout import (
    ALL_SUBCLUSTERS,
    AUTOCLEAR_KNOWN,
    EXT_BACKING_FORMAT,
    EXT_END,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAGIC,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    OFF_AUTOCLEAR,
    OFF_BACKING_FILE,
    OFF_CLUSTER_BITS,
    OFF_INCOMPAT,
    OFF_SIZE,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFTABLE_OFFSET_MASK,
    V2_HEADER_LENGTH,
    Header,
    check_overlaps,
    decode_compressed,
    parse_header,
)
from fusedisk.formats.qcow2.mapping import (
    COMPRESSED,
    DATA,
    UNALLOCATED,
    ZERO,
    ClusterMap,
    decode_l2,
    encode_l2,
)
from fusedisk.formats.qcow2.refcount import MetaIO, Refcounts
from fusedisk.formats.qcow2.snapshots import Snapshot, read_snapshot_table
from fusedisk.graph.bitmaps import BitmapSet
from fusedisk.graph.extents import Extent, Status, merge_extents

_DEFAULT_L2_CACHE = 32 << 20  # at most; by default just enough to map the whole disk
_MAX_RUN_BYTES = 4 << 20  # clusters allocated together by one write


class HostFile(Protocol):
    """A file the image lives on (a node's edge): image, data or backing file."""

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None: ...

    async def block_status(self, offset: int, length: int) -> list[Extent]: ...


class Qcow2Image:
    """A qcow2 image on its host files (see the module doc)."""

    #: set by open(), with the geometry (cs, cluster_bits) and tables (map, refs)
    h: Header

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
        self.name = name
        self.path = path
        self.file = file
        #: where guest data lives: `file` unless the header names an external data file
        self.data = file
        self._backing = backing
        self._l2_cache_size = l2_cache_size
        self._refcount_cache_size = refcount_cache_size
        self.where = f"node '{name}': qcow2 image '{path}'"
        self._meta_lock = trio.Lock()
        self._claims: dict[int, trio.Event] = {}
        self._io_in_flight = 0
        self._decompressed: tuple[int, bytes] | None = None
        self.counters = {"cow_clusters": 0, "allocating_writes": 0, "metadata_writebacks": 0,
                         "compressed_reads": 0, "repairs": 0}  # fmt: skip
        self.size = 0
        #: set while the image is open read-write and marked so (dirty, for v3)
        self.writing = False
        self.snapshots: list[Snapshot] = []
        self.snapshot_table_length = 0
        self._meta: set[int] = set()
        #: clusters whose refcount reached 0, to hand back to the host file after a flush
        self._freed: list[int] = []
        self._meta_array: np.ndarray | None = None
        self.bitmaps = bitmaps if bitmaps is not None else BitmapSet(name)
        self.bitmap_store = BitmapStore(self)

    # -- opening ------------------------------------------------------------------

    async def open(self, read_only: bool) -> None:
        """Read and check the header and tables; the data file and backing come after."""
        fsize = self.file.size
        first = await self.file.read(0, min(fsize, 4096))
        if len(first) >= OFF_CLUSTER_BITS + 4 and first[:4] == MAGIC:
            cb = struct.unpack_from(">I", first, OFF_CLUSTER_BITS)[0]
            if MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS and (1 << cb) > len(first):
                first = await self.file.read(0, min(fsize, 1 << cb))
        h = parse_header(first, fsize, self.path)
        self.h = h
        self.where = f"qcow2 image '{self.path}'"
        cs = h.cluster_size
        self.cs = cs
        self.cluster_bits = h.cluster_bits
        if h.incompatible & INCOMPAT_CORRUPT and not read_only:
            raise OpenError(
                f"node '{self.name}': {self.where} is marked corrupt; open it read-only "
                "(read-only = true) or repair it with 'qemu-img check -r all'"
            )
        self.io = MetaIO(self.file.read, self.file.write, self.file.flush)

        # L1, refcount table, snapshots: read and check before anything else
        l1 = decode_l2(await self.file.read(h.l1_table_offset, h.l1_size * 8)) if h.l1_size else (
            np.zeros(0, dtype=np.uint64))  # fmt: skip
        reftable = decode_l2(
            await self.file.read(h.refcount_table_offset, h.refcount_table_clusters * cs)
        )
        snap_len = 0
        if h.nb_snapshots:
            self.snapshots, snap_len = await read_snapshot_table(
                self.file.read, h.snapshots_offset, h.nb_snapshots, cs, fsize, self.where
            )
        self.snapshot_table_length = snap_len
        if h.has_data_file and (self.snapshots or (h.backing_file and h.data_file_raw)):
            raise CorruptImage(f"{self.where}: an external data file excludes internal snapshots")
        regions = [
            ("header", 0, cs),
            ("refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs),
        ]
        if h.l1_size:
            regions.append(("L1 table", h.l1_table_offset, h.l1_size * 8))
        if snap_len:
            regions.append(("snapshot table", h.snapshots_offset, snap_len))
        check_overlaps(self.where, regions, cs)
        for _, off, length in regions:
            self._meta.update(range(off // cs, (off + length - 1) // cs + 1))
        for s in self.snapshots:
            if s.l1_size:
                first_c = s.l1_table_offset // cs
                self._meta.update(range(first_c, (s.l1_table_offset + s.l1_size * 8 - 1) // cs + 1))
        static = set(self._meta)
        for i, e in enumerate(reftable.tolist()):
            off = e & REFTABLE_OFFSET_MASK
            if not off:
                continue
            self._check_pointer("refcount table", i, off, fsize, static)
            self._meta.add(off // cs)
        for i, e in enumerate(l1.tolist()):
            off = e & OFFSET_MASK
            if not off:
                continue
            self._check_pointer("L1 table", i, off, fsize, self._meta)
            self._meta.add(off // cs)
        self._meta_array = None

        l2_bytes = self._l2_cache_size
        if l2_bytes is None:
            l2_bytes = min(_DEFAULT_L2_CACHE, max(len(l1), 1) * cs)
        self.map = ClusterMap(
            h, self.io, l1, max(4, int(l2_bytes) // cs), self.where,
            lambda: self.file.size, self._metadata_array,
        )  # fmt: skip
        rc_tables = max(4, int(self._refcount_cache_size) // cs)
        self.refs = Refcounts(
            self.io, self.where, h.cluster_bits, h.refcount_order, reftable,
            h.refcount_table_offset, h.refcount_table_clusters, rc_tables,
            self._cluster_freed, self._meta_add,
        )  # fmt: skip
        self.refs.is_metadata = self._meta.__contains__  # overlap check (refcount.py)

        # L2 tables: check the ones that fit in the cache now (they are read anyway)
        for off in [int(e) & OFFSET_MASK for e in l1.tolist()][: self.map.cache.capacity]:
            if off:
                await self.map.table(off)
        self.size = h.size
        await self.bitmap_store.load(self.bitmaps)

    def _check_pointer(self, table: str, i: int, off: int, fsize: int, meta: set[int]) -> None:
        cs = self.cs
        if off % cs:
            raise CorruptImage(f"{self.where}: {table} entry {i} points at unaligned {off:#x}")
        if off + cs > fsize:
            raise CorruptImage(
                f"{self.where}: {table} entry {i} points at {off:#x}, past the end of the file "
                f"({fsize} bytes); is the image truncated?"
            )
        if off // cs in meta:
            raise CorruptImage(
                f"{self.where}: {table} entry {i} points at {off:#x}, which overlaps other metadata"
            )

    def _metadata_array(self) -> np.ndarray:
        if self._meta_array is None:
            self._meta_array = np.fromiter(self._meta, dtype=np.uint64, count=len(self._meta))
        return self._meta_array

    def _meta_add(self, cluster: int) -> None:
        self._meta.add(cluster)
        self._meta_array = None

    def _cluster_freed(self, cluster: int) -> None:
        self._freed.append(cluster)
        if cluster in self._meta:
            self._meta.discard(cluster)
            self._meta_array = None
            self.map.cache.drop(cluster << self.cluster_bits)
            self.refs.cache.drop(cluster << self.cluster_bits)

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

    # -- helpers for data I/O -----------------------------------------------------------

    @staticmethod
    async def _read_padded(file: HostFile | None, offset: int, length: int) -> bytes:
        """Bytes of `file`, and zeroes past its end (all zeroes without a file)."""
        avail = 0 if file is None else file.size - offset
        if file is None or avail <= 0:
            return bytes(length)
        if avail >= length:
            return await file.read(offset, length)
        return await file.read(offset, avail) + bytes(length - avail)

    async def _decompress(self, entry: int) -> bytes:
        if self._decompressed is not None and self._decompressed[0] == entry:
            return self._decompressed[1]
        host, stored = decode_compressed(entry, self.cluster_bits)
        raw = await self._read_padded(self.data, host, min(stored, max(0, self.file.size - host)))
        data = decompress_cluster(raw, self.h.compression_type, self.cs, self.where)
        self._decompressed = (entry, data)
        self.counters["compressed_reads"] += 1
        return data

    async def _read_runs(self, offset: int, length: int) -> bytes:
        runs = await self.map.map_range(offset, length)
        parts = []
        self._io_in_flight += 1
        try:
            for kind, guest, n, host in runs:
                if kind == DATA:
                    parts.append(await self._read_padded(self.data, host, n))
                elif kind == ZERO:
                    parts.append(bytes(n))
                elif kind == UNALLOCATED:
                    parts.append(await self._read_padded(self._backing(), guest, n))
                else:
                    start = guest & (self.cs - 1)
                    parts.append((await self._decompress(host))[start : start + n])
        finally:
            self._io_in_flight -= 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _old_content(self, start: int, length: int) -> bytes:
        """Guest bytes of [start, start+length) as they read now; zeroes past the disk end."""
        valid = max(0, min(length, self.size - start))
        data = await self._read_runs(start, valid) if valid else b""
        return data + bytes(length - valid)

    # -- requests -----------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        return await self._read_runs(offset, length)

    def _in_place(self, e: int, b: int, start: int, stop: int) -> int | None:
        """Host offset where bytes [start, stop) of a cluster can be written directly."""
        if e & OFLAG_COMPRESSED or not e & OFLAG_COPIED:
            return None
        host = e & OFFSET_MASK
        if not host and not self.h.has_data_file:
            return None
        if self.map.extended:
            sb = self.map.sc_bits
            first, last = start >> sb, (stop - 1) >> sb
            mask = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
            return host + start if b & mask == mask else None
        if self.map.v3_zero and e & OFLAG_ZERO:
            return None
        self._refuse_overlap(host)
        return host + start

    def _refuse_overlap(self, host: int) -> None:
        """QEMU's overlap check for a guest write into a cluster already allocated."""
        if not self.h.has_data_file and host >> self.cluster_bits in self._meta:
            raise CorruptImage(
                f"{self.where}: a data cluster at {host:#x} overlaps metadata; refusing "
                "to write (repair with 'qemu-img check -r all')"
            )

    async def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        end = offset + len(data)
        pos = offset
        cb, cs = self.cluster_bits, self.cs
        max_run = max(1, _MAX_RUN_BYTES >> cb)
        while pos < end:
            ci = pos >> cb
            cstart = ci << cb
            stop = min(end, cstart + cs)
            e, b = await self.map.entry(ci)
            host = self._in_place(e, b, pos - cstart, stop - cstart)
            if host is not None:
                run_end, expect = stop, host + (stop - pos)
                while run_end < end:
                    c2 = run_end >> cb
                    stop2 = min(end, (c2 + 1) << cb)
                    e2, b2 = await self.map.entry(c2)
                    if self._in_place(e2, b2, 0, stop2 - (c2 << cb)) != expect:
                        break
                    expect += stop2 - run_end
                    run_end = stop2
                self._io_in_flight += 1
                try:
                    await self.data.write(host, bytes(view[pos - offset : run_end - offset]))
                finally:
                    self._io_in_flight -= 1
                pos = run_end
                continue
            run_end, count = stop, 1
            while run_end < end and count < max_run:
                c2 = run_end >> cb
                stop2 = min(end, (c2 + 1) << cb)
                e2, b2 = await self.map.entry(c2)
                if self._in_place(e2, b2, 0, stop2 - (c2 << cb)) is not None:
                    break
                run_end, count = stop2, count + 1
            await self._write_allocating(pos, view[pos - offset : run_end - offset])
            pos = run_end

    # -- claims: one metadata change per guest cluster at a time -----------------------

    async def _claim(self, first: int, stop: int) -> trio.Event:
        while True:
            for c in range(first, stop):
                busy = self._claims.get(c)
                if busy is not None:
                    await busy.wait()
                    break
            else:
                event = trio.Event()
                for c in range(first, stop):
                    self._claims[c] = event
                return event

    def _release(self, first: int, stop: int, event: trio.Event) -> None:
        for c in range(first, stop):
            del self._claims[c]
        event.set()

    async def _write_allocating(self, offset: int, data: memoryview) -> None:
        cb, cs = self.cluster_bits, self.cs
        end = offset + len(data)
        first, stop = offset >> cb, ((end - 1) >> cb) + 1
        claim = await self._claim(first, stop)
        self._io_in_flight += 1
        try:
            fresh: list[tuple[int, int, int, bytes]] = []  # (cluster, old e, old b, content)
            for ci in range(first, stop):
                cstart = ci << cb
                a, z = max(offset, cstart), min(end, cstart + cs)
                chunk = data[a - offset : z - offset]
                e, b = await self.map.entry(ci)
                host = self._in_place(e, b, a - cstart, z - cstart)
                if host is not None:  # allocated by another writer meanwhile
                    await self.data.write(host, bytes(chunk))
                    continue
                if (
                    self.map.extended
                    and e & OFLAG_COPIED
                    and not e & OFLAG_COMPRESSED
                    and self.map.is_allocated(e)
                ):
                    await self._fill_subclusters(ci, e, b, a, chunk)
                    continue
                if a == cstart and z == cstart + cs:
                    content = bytes(chunk)
                else:
                    buf = bytearray(await self._old_content(cstart, cs))
                    buf[a - cstart : z - cstart] = chunk
                    content = bytes(buf)
                fresh.append((ci, e, b, content))
            # write new clusters in host-contiguous groups of guest-contiguous clusters
            i = 0
            while i < len(fresh):
                j = i + 1
                while j < len(fresh) and fresh[j][0] == fresh[j - 1][0] + 1:
                    j += 1
                group = fresh[i:j]
                if self.h.has_data_file:
                    host = group[0][0] << cb
                else:
                    async with self._meta_lock:
                        host = await self.refs.allocate(len(group))
                await self.data.write(host, b"".join(g[3] for g in group))
                async with self._meta_lock:
                    for k, (ci, e, _b, _) in enumerate(group):
                        new_b = ALL_SUBCLUSTERS if self.map.extended else 0
                        await self._set_l2(ci, (host + (k << cb)) | OFLAG_COPIED, new_b)
                        self._drop_reference(e)
                self.counters["allocating_writes"] += 1
                self.counters["cow_clusters"] += len(group)
                i = j
        finally:
            self._io_in_flight -= 1
            self._release(first, stop, claim)

    async def _fill_subclusters(self, ci: int, e: int, b: int, a: int, chunk: memoryview) -> None:
        """Write into an allocated extended-L2 cluster, some touched subclusters unallocated."""
        cb, sb = self.cluster_bits, self.map.sc_bits
        cstart = ci << cb
        first = (a - cstart) >> sb
        last = (a - cstart + len(chunk) - 1) >> sb
        span_start = cstart + (first << sb)
        span_len = (last - first + 1) << sb
        buf = bytearray(await self._old_content(span_start, span_len))
        buf[a - span_start : a - span_start + len(chunk)] = chunk
        host = e & OFFSET_MASK
        self._refuse_overlap(host)
        await self.data.write(host + (first << sb), bytes(buf))
        mask = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
        async with self._meta_lock:
            e2, b2 = await self.map.entry(ci)
            await self._set_l2(ci, e2, (b2 | mask) & ~(mask << 32))

    def _drop_reference(self, e: int) -> None:
        """Queue the refcount decrement of what an L2 entry pointed at (it was replaced)."""
        if self.h.has_data_file:
            return
        if e & OFLAG_COMPRESSED:
            host, stored = decode_compressed(e, self.cluster_bits)
            self.refs.queue_free(host, stored)
        elif e & OFFSET_MASK:
            self.refs.queue_free(e & OFFSET_MASK, self.cs)

    async def _set_l2(self, ci: int, e: int, b: int) -> None:
        """Point guest cluster `ci` at (e, b); allocates or copies its L2 table. Lock held."""
        m = self.map
        l1i = ci >> m.l2_bits
        l1e = int(m.l1[l1i])
        off = l1e & OFFSET_MASK
        if not off:
            off = await self.refs.allocate(1)
            m.cache.put(off, np.zeros(self.cs // 8, dtype=np.uint64))
            self._meta_add(off >> self.cluster_bits)
            m.l1[l1i] = off | OFLAG_COPIED
            m.l1_dirty.add(l1i)
        elif not l1e & OFLAG_COPIED:
            if await self.refs.get(off >> self.cluster_bits) == 1:
                m.l1[l1i] = off | OFLAG_COPIED
            else:  # the table is shared with a snapshot: copy it
                old = await m.table(off)
                new_off = await self.refs.allocate(1)
                m.cache.put(new_off, old.copy())
                self._meta_add(new_off >> self.cluster_bits)
                m.l1[l1i] = new_off | OFLAG_COPIED
                self.refs.queue_free(off, self.cs)
                off = new_off
            m.l1_dirty.add(l1i)
        table = await m.table(off)
        m.set_entry(table, ci, e, b)
        m.cache.mark_dirty(off)
        if m.cache.dirty_full or self.refs.cache.dirty_full:
            await self.writeback(apply_frees=False)

    # -- flush: the crash-safe order -------------------------------------------------------

    async def writeback(self, apply_frees: bool = True) -> None:
        """Write dirty metadata in dependency order; the metadata lock is held."""
        m, refs, io = self.map, self.refs, self.io
        if self.data is not self.file:
            await self.data.flush()
        wrote = await refs.write_blocks()
        if refs.table_dirty:
            await io.sync()  # new refcount blocks before the table entries naming them
            await refs.write_table()
            wrote += 1
        l2_dirty = m.cache.items_dirty()
        if l2_dirty or m.l1_dirty:
            await io.sync()  # data and refcounts before the tables that use them
            for off, table in l2_dirty:
                await io.write(off, encode_l2(table))
            m.cache.mark_clean([off for off, _ in l2_dirty])
            if m.l1_dirty:
                if l2_dirty:
                    await io.sync()  # new L2 tables before the L1 entries naming them
                for s in sorted({i // 64 for i in m.l1_dirty}):
                    chunk = m.l1[s * 64 : s * 64 + 64].astype(">u8").tobytes()
                    await io.write(self.h.l1_table_offset + s * 512, chunk)
                m.l1_dirty.clear()
            wrote += 1
        await io.sync()
        if wrote:
            self.counters["metadata_writebacks"] += 1
        if apply_frees and refs.pending and self._io_in_flight == 0:
            await refs.apply_frees()
            await refs.write_blocks()
            await io.sync()
        await self._discard_freed()

    async def _discard_freed(self) -> None:
        """Give freed clusters' space back to the host file, as QEMU's pass-discard-request.

        Only after the tables and refcounts that stopped using them are on stable
        storage; a cluster allocated again since is left alone.
        """
        freed, self._freed = sorted(set(self._freed)), []
        if not freed or self.h.has_data_file:
            return
        cb = self.cluster_bits
        run_start = prev = -2
        runs: list[tuple[int, int]] = []
        for c in freed:
            if await self.refs.get(c) != 0:
                continue
            if c != prev + 1:
                if run_start >= 0:
                    runs.append((run_start, prev + 1))
                run_start = c
            prev = c
        if run_start >= 0:
            runs.append((run_start, prev + 1))
        for first, stop in runs:
            await self.file.discard(first << cb, (stop - first) << cb)

    async def flush(self) -> None:
        async with self._meta_lock:
            await self.writeback()

    # -- discard, zeroes, size ---------------------------------------------------------------

    def _cleared_entry(self, zero: bool) -> tuple[int, int] | None:
        """The entry that makes a cluster read as zeroes (zero=True) or unallocated."""
        has_backing = self._backing() is not None
        if not zero and not has_backing:
            return 0, 0
        if self.map.extended:
            return 0, ALL_SUBCLUSTERS << 32
        if self.map.v3_zero:
            return OFLAG_ZERO, 0
        return (0, 0) if not has_backing else None

    async def _clear_clusters(self, offset: int, length: int, zero: bool) -> tuple[int, int]:
        """Apply `_cleared_entry` to the whole clusters inside the range; returns what is left
        (start, end) of whole clusters handled, or (0, 0) if it cannot."""
        cb = self.cluster_bits
        first = -(-offset >> cb)
        stop = (offset + length) >> cb
        if stop <= first:
            return 0, 0
        new = self._cleared_entry(zero)
        if new is None:
            return 0, 0
        claim = await self._claim(first, stop)
        try:
            async with self._meta_lock:
                for ci in range(first, stop):
                    e, b = await self.map.entry(ci)
                    if (e & ~OFLAG_COPIED, b) == new:
                        continue
                    if new == (0, 0) and not self.map.l2_offset(ci >> self.map.l2_bits):
                        continue
                    await self._set_l2(ci, new[0], new[1])
                    self._drop_reference(e)
        finally:
            self._release(first, stop, claim)
        if self.h.has_data_file and not self.h.data_file_raw:
            await self.data.discard(first << cb, (stop - first) << cb)
        return first << cb, stop << cb

    async def discard(self, offset: int, length: int) -> None:
        if self.h.data_file_raw:
            return  # the raw data file must keep its contents
        await self._clear_clusters(offset, length, zero=self._backing() is not None)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        end = offset + length
        if self.h.data_file_raw:
            # the raw data file must read as the disk: zero it, and allocate what is not
            await self.data.write_zeroes(offset, length, unmap)
            for ci in range(offset >> self.cluster_bits, ((end - 1) >> self.cluster_bits) + 1):
                e, _ = await self.map.entry(ci)
                if not self.map.is_allocated(e):
                    cstart = ci << self.cluster_bits
                    s, t = max(offset, cstart), min(end, cstart + self.cs)
                    await self.write(s, bytes(t - s))
            return
        a, z = await self._clear_clusters(offset, length, zero=True)
        if z <= a:
            a = z = end
        if offset < a:
            await self._write_zero_bytes(offset, a)
        if z < end:
            await self._write_zero_bytes(z, end)

    async def _write_zero_bytes(self, start: int, end: int) -> None:
        """Zeroes the format cannot express (partial clusters, v2 over a backing file)."""
        chunk = 1 << 20
        while start < end:
            n = min(end - start, chunk - start % chunk)
            await self.write(start, bytes(n))
            start += n

    async def truncate(self, size: int) -> None:
        if size < self.size:
            raise NotSupported(f"node '{self.name}': shrinking a qcow2 image is not supported")
        if size == self.size:
            return
        h, m, cs = self.h, self.map, self.cs
        h.check_size(size, f"node '{self.name}'")  # before a table of that size is built
        async with self._meta_lock:
            await self.writeback()
            need = h.l1_entries_needed(size)
            if need > len(m.l1):
                clusters = -(-need * 8 // cs)
                new_off = await self.refs.allocate(clusters)
                for c in range(clusters):
                    self._meta_add((new_off >> self.cluster_bits) + c)
                new_l1 = np.concatenate([m.l1, np.zeros(need - len(m.l1), dtype=np.uint64)])
                await self.writeback(apply_frees=False)
                await self.file.write(new_off, new_l1.astype(">u8").tobytes())
                await self.file.flush()
                await self.file.write(
                    OFF_SIZE, struct.pack(">QIIQ", size, h.crypt_method, need, new_off)
                )
                await self.file.flush()
                old_off, old_len = h.l1_table_offset, len(m.l1)
                h.l1_table_offset, h.l1_size = new_off, need
                m.l1 = new_l1
                m.l1_dirty.clear()
                if old_len:
                    self.refs.queue_free(old_off, old_len * 8)
                for c in range(old_off >> self.cluster_bits, (old_off + old_len * 8 - 1) // cs + 1):
                    self._meta.discard(c)
                self._meta_array = None
            else:
                await self.file.write(OFF_SIZE, struct.pack(">Q", size))
                await self.file.flush()
            old_size = self.size
            h.size = self.size = size
        # what the grown part shows must be zeroes, not old bytes of a cluster or the backing
        backing = self._backing()
        tail = max(-(-old_size // cs) * cs, backing.size if backing else 0)
        tail = min(tail, size)
        if tail > old_size:
            await self.write_zeroes(old_size, tail - old_size, False)

    # -- block status -----------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for kind, guest, n, _ in await self.map.map_range(offset, length):
            if kind in (DATA, COMPRESSED):
                out.append(Extent(guest, n, Status.DATA | Status.ALLOCATED))
            elif kind == ZERO:
                out.append(Extent(guest, n, Status.ZERO | Status.ALLOCATED))
            else:
                out.extend(await self._backing_status(guest, n))
        return merge_extents(out)

    async def _backing_status(self, offset: int, length: int) -> list[Extent]:
        backing = self._backing()
        avail = 0 if backing is None else max(0, min(length, backing.size - offset))
        out = []
        if avail and backing is not None:
            for ext in await backing.block_status(offset, avail):
                status = ext.status & ~Status.ALLOCATED
                out.append(Extent(ext.offset, ext.length, status or Status.DATA))
        if avail < length:
            out.append(Extent(offset + avail, length - avail, Status.ZERO))
        return out

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
