"""Cluster mapping: guest cluster -> L1 -> L2 -> host, with a bounded L2 cache.

References: QEMU docs/interop/qcow2.txt, "Cluster mapping" and "Extended L2
Entries".  The active L1 table is kept whole in memory (QEMU limits it to
32 MiB); L2 tables are loaded on demand into a TableCache and checked once,
as they are loaded, against the file: a data cluster past the end of the
file, unaligned, or on top of metadata is refused as corruption.

A range of the guest disk is mapped to runs of one kind (data at a host
offset, zeroes, unallocated, compressed), and the driver does I/O per run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fusedisk.errors import CorruptImage
from fusedisk.formats.qcow2.cache import TableCache
from fusedisk.formats.qcow2.layout import (
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Header,
    compressed_geometry,
)
from fusedisk.formats.qcow2.refcount import MetaIO

# kinds of runs
DATA = 0  # host offset
ZERO = 1  # reads as zeroes, defined here
UNALLOCATED = 2  # from the backing file, or zeroes
COMPRESSED = 3  # host = the L2 entry

_U64 = np.uint64


def decode_l2(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=">u8").astype(np.uint64)


def encode_l2(table: np.ndarray) -> bytes:
    return table.astype(">u8").tobytes()


class ClusterMap:
    def __init__(
        self,
        header: Header,
        io: MetaIO,
        l1: np.ndarray,
        cache_tables: int,
        where: str,
        file_size: Callable[[], int],
        metadata_clusters: Callable[[], np.ndarray],
    ) -> None:
        self.h = header
        self.io = io
        self.where = where
        self.cluster_bits = header.cluster_bits
        self.cs = header.cluster_size
        self.extended = header.extended_l2
        self.v3_zero = header.version >= 3 and not self.extended
        self.data_file = header.has_data_file
        self.l2_bits = self.cluster_bits - (4 if self.extended else 3)
        self.l2_mask = (1 << self.l2_bits) - 1
        self.sc_bits = self.cluster_bits - 5 if self.extended else self.cluster_bits
        self.l1 = l1
        self.l1_dirty: set[int] = set()
        self.cache = TableCache(cache_tables, self._load)
        self._file_size = file_size
        self._metadata_clusters = metadata_clusters
        self._comp_bits, _ = compressed_geometry(self.cluster_bits)

    # -- loading and checking L2 tables -----------------------------------------

    async def _load(self, offset: int) -> np.ndarray:
        table = decode_l2(await self.io.read(offset, self.cs))
        self.check_table(table, offset)
        return table

    def check_table(self, table: np.ndarray, offset: int) -> None:
        entries = table[0::2] if self.extended else table
        compressed = (entries & _U64(OFLAG_COMPRESSED)) != 0
        hosts = entries & _U64(OFFSET_MASK)
        standard = ~compressed & (hosts != 0)
        where = f"{self.where}: L2 table at {offset:#x}"
        if self.extended:
            bitmaps = table[1::2]
            alloc = bitmaps & _U64(0xFFFFFFFF)
            zero = bitmaps >> _U64(32)
            bad = ~compressed & ((alloc & zero) != 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise CorruptImage(f"{where}: entry {i} marks subclusters both allocated and zero")
            if not self.data_file:
                bad = ~compressed & (alloc != 0) & (hosts == 0)
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise CorruptImage(
                        f"{where}: entry {i} has allocated subclusters but no host cluster"
                    )
        if self.data_file:
            return
        fsize = self._file_size()
        unaligned = standard & ((hosts & _U64(self.cs - 1)) != 0)
        if unaligned.any():
            i = int(np.flatnonzero(unaligned)[0])
            raise CorruptImage(f"{where}: entry {i} points at unaligned offset {int(hosts[i]):#x}")
        past = standard & (hosts >= _U64(fsize))
        if past.any():
            i = int(np.flatnonzero(past)[0])
            raise CorruptImage(
                f"{where}: entry {i} points at {int(hosts[i]):#x}, past the end of the file "
                f"({fsize} bytes); is the image truncated?"
            )
        meta = self._metadata_clusters()
        clash = standard & np.isin(hosts >> _U64(self.cluster_bits), meta)
        if clash.any():
            i = int(np.flatnonzero(clash)[0])
            raise CorruptImage(
                f"{where}: entry {i} points at {int(hosts[i]):#x}, which overlaps metadata"
            )
        coffs = entries & _U64((1 << self._comp_bits) - 1)
        past = compressed & (coffs >= _U64(fsize))
        if past.any():
            i = int(np.flatnonzero(past)[0])
            raise CorruptImage(
                f"{where}: compressed entry {i} points past the end of the file ({fsize} bytes)"
            )

    # -- lookups ----------------------------------------------------------------

    def l2_offset(self, l1_index: int) -> int:
        if l1_index >= len(self.l1):
            return 0
        return int(self.l1[l1_index]) & OFFSET_MASK

    async def table(self, l2_offset: int) -> np.ndarray:
        table = self.cache.peek(l2_offset)
        if table is None:
            table = await self.cache.get(l2_offset)
        return table

    async def entry(self, cluster: int) -> tuple[int, int]:
        """(L2 entry, subcluster bitmap) of a guest cluster; (0, 0) when unallocated.

        COPIED is cleared when the L2 table itself is shared (its L1 entry
        lacks COPIED), so the caller copies before writing.
        """
        l1i = cluster >> self.l2_bits
        if l1i >= len(self.l1):
            return 0, 0
        l1e = int(self.l1[l1i])
        off = l1e & OFFSET_MASK
        if not off:
            return 0, 0
        table = self.cache.peek(off)
        if table is None:
            table = await self.cache.get(off)
        i = cluster & self.l2_mask
        if self.extended:
            e, b = int(table[2 * i]), int(table[2 * i + 1])
        else:
            e, b = int(table[i]), 0
        if not l1e & OFLAG_COPIED:
            e &= ~OFLAG_COPIED
        return e, b

    def is_allocated(self, e: int) -> bool:
        """Whether a standard entry names a host cluster (data, or preallocated zeroes)."""
        if e & OFLAG_COMPRESSED:
            return False
        return bool(e & OFFSET_MASK) or (self.data_file and bool(e & OFLAG_COPIED))

    async def map_range(self, offset: int, length: int) -> list[list[int]]:
        """Runs [kind, guest offset, length, host] covering [offset, offset+length)."""
        runs: list[list[int]] = []
        pos = offset
        end = offset + length
        cb = self.cluster_bits
        cs = self.cs
        while pos < end:
            ci = pos >> cb
            cstart = ci << cb
            stop = min(end, cstart + cs)
            e, b = await self.entry(ci)
            if e & OFLAG_COMPRESSED:
                _add(runs, COMPRESSED, pos, stop - pos, e)
            elif self.extended:
                host = e & OFFSET_MASK
                p = pos
                while p < stop:
                    sc = (p - cstart) >> self.sc_bits
                    sc_end = min(stop, cstart + ((sc + 1) << self.sc_bits))
                    if b >> sc & 1:
                        _add(runs, DATA, p, sc_end - p, host + (p - cstart))
                    elif b >> (32 + sc) & 1:
                        _add(runs, ZERO, p, sc_end - p, 0)
                    else:
                        _add(runs, UNALLOCATED, p, sc_end - p, 0)
                    p = sc_end
            else:
                host = e & OFFSET_MASK
                if self.v3_zero and e & OFLAG_ZERO:
                    _add(runs, ZERO, pos, stop - pos, 0)
                elif host or (self.data_file and e & OFLAG_COPIED):
                    _add(runs, DATA, pos, stop - pos, host + (pos - cstart))
                else:
                    _add(runs, UNALLOCATED, pos, stop - pos, 0)
            pos = stop
        return runs

    # -- changing entries (the caller holds the metadata lock) ---------------------

    def set_entry(self, table: np.ndarray, cluster: int, e: int, b: int) -> None:
        i = cluster & self.l2_mask
        if self.extended:
            table[2 * i] = e
            table[2 * i + 1] = b
        else:
            table[i] = e


def _add(runs: list[list[int]], kind: int, guest: int, length: int, host: int) -> None:
    if runs:
        last = runs[-1]
        if (
            last[0] == kind
            and kind != COMPRESSED
            and last[1] + last[2] == guest
            and (kind != DATA or last[3] + last[2] == host)
        ):
            last[2] += length
            return
    runs.append([kind, guest, length, host])
