"""Opening a qcow2 image: its header and tables, read and checked before any use.

The header is parsed and checked in header.py.  Here the L1 table, the
refcount table and the snapshot table are read, checked against each other
and against the file (no overlaps, nothing past the end, all aligned), the
clusters they occupy recorded as metadata, and the cluster map and refcounts
built on them.
"""

from __future__ import annotations

import struct

import numpy as np

from fusedisk.errors import CorruptImage, OpenError
from fusedisk.formats.qcow2.core import ImageCore
from fusedisk.formats.qcow2.header import check_overlaps, parse_header
from fusedisk.formats.qcow2.layout import (
    INCOMPAT_CORRUPT,
    MAGIC,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    OFF_CLUSTER_BITS,
    OFFSET_MASK,
    REFTABLE_OFFSET_MASK,
)
from fusedisk.formats.qcow2.mapping import ClusterMap, decode_l2
from fusedisk.formats.qcow2.refcount import MetaIO, Refcounts
from fusedisk.formats.qcow2.snapshots import read_snapshot_table

_DEFAULT_L2_CACHE = 32 << 20  # at most; by default just enough to map the whole disk


class ImageOpening(ImageCore):
    """`open`: the header, the tables and the metadata set of a qcow2 image."""

    async def open(self, read_only: bool) -> None:
        """Read and check the header and tables; the data file and backing come after."""
        fsize = self.file.size
        h = parse_header(await self._read_head(fsize), fsize, self.path)
        self.h = h
        self.where = f"qcow2 image '{self.path}'"
        self.cs = h.cluster_size
        self.cluster_bits = h.cluster_bits
        if h.incompatible & INCOMPAT_CORRUPT and not read_only:
            raise OpenError(
                f"node '{self.name}': {self.where} is marked corrupt; open it read-only "
                "(read-only = true) or repair it with 'qemu-img check -r all'"
            )
        self.io = MetaIO(self.file.read, self.file.write, self.file.flush)
        l1, reftable = await self._read_tables(fsize)
        self._record_metadata(l1, reftable, fsize)
        self._build_tables(l1, reftable)
        # L2 tables: check the ones that fit in the cache now (they are read anyway)
        for off in [int(e) & OFFSET_MASK for e in l1.tolist()][: self.map.cache.capacity]:
            if off:
                await self.map.table(off)
        self.size = h.size
        await self.bitmap_store.load(self.bitmaps)

    async def _read_head(self, fsize: int) -> bytes:
        """The header cluster: its first 4 KiB, or the whole cluster if that is larger."""
        first = await self.file.read(0, min(fsize, 4096))
        if len(first) >= OFF_CLUSTER_BITS + 4 and first[:4] == MAGIC:
            cb = struct.unpack_from(">I", first, OFF_CLUSTER_BITS)[0]
            if MIN_CLUSTER_BITS <= cb <= MAX_CLUSTER_BITS and (1 << cb) > len(first):
                first = await self.file.read(0, min(fsize, 1 << cb))
        return first

    async def _read_tables(self, fsize: int) -> tuple[np.ndarray, np.ndarray]:
        """The L1 table, the refcount table and the snapshot table, checked for overlaps."""
        h, cs = self.h, self.cs
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
        return l1, reftable

    def _record_metadata(self, l1: np.ndarray, reftable: np.ndarray, fsize: int) -> None:
        """Add snapshot L1 tables, refcount blocks and L2 tables to the metadata set."""
        cs = self.cs
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

    def _build_tables(self, l1: np.ndarray, reftable: np.ndarray) -> None:
        """The cluster map (L1 and L2 cache) and the refcounts, with their cache sizes."""
        h, cs = self.h, self.cs
        l2_bytes = self._l2_cache_size
        if l2_bytes is None:
            l2_bytes = min(_DEFAULT_L2_CACHE, max(len(l1), 1) * cs)
        self.map = ClusterMap(
            h, self.io, l1, max(4, int(l2_bytes) // cs), self.where,
            lambda: self.file.size, self._metadata_array,
        )  # fmt: skip
        self.refs = Refcounts(
            self.io,
            where=self.where,
            cluster_bits=h.cluster_bits,
            order=h.refcount_order,
            table=reftable,
            table_offset=h.refcount_table_offset,
            table_clusters=h.refcount_table_clusters,
            cache_tables=max(4, int(self._refcount_cache_size) // cs),
            on_free=self._cluster_freed,
            on_metadata=self._meta_add,
            is_metadata=self._meta.__contains__,  # the overlap check of allocation
        )

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
