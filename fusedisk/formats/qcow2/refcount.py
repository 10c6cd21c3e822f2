"""qcow2 refcounts: the two-level refcount structure and host cluster allocation.

References: QEMU docs/interop/qcow2.txt, "Host cluster management".

The refcount table is kept whole in memory; refcount blocks live in a
TableCache, decoded to uint64 arrays whatever their width (1 to 64 bits).

Allocation finds the first run of free clusters from a hint (the lowest
cluster that may be free), so an image is filled from the front and freed
clusters are reused.  A new refcount block is placed inside the range it
describes when it can (it then counts itself); a refcount table that is too
small is replaced by a larger one (see `_grow`).

Crash safety (the rule the driver relies on):
- increments may reach the disk at any time: the worst a crash leaves is a
  leak;
- decrements are *queued* (`queue_free`) and applied only after the metadata
  that dropped the reference is on stable storage (`apply_frees`, called by
  the driver's flush), so a crash never leaves a reference to a cluster whose
  refcount says it is free;
- a refcount block is on stable storage before the table entry that points
  to it (`write_blocks`, sync, `write_table`).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

import numpy as np

from fusedisk.errors import CorruptImage, IOFailure, TooLarge
from fusedisk.formats.qcow2.cache import TableCache
from fusedisk.formats.qcow2.layout import (
    MAX_REFTABLE_BYTES,
    OFF_REFTABLE_OFFSET,
    REFTABLE_OFFSET_MASK,
)


def decode_refblock(data: bytes, order: int) -> np.ndarray:
    bits = 1 << order
    if bits >= 8:
        return np.frombuffer(data, dtype=f">u{bits // 8}").astype(np.uint64)
    per = 8 // bits
    raw = np.frombuffer(data, dtype=np.uint8)
    shifts = np.arange(per, dtype=np.uint8) * bits
    values = (raw[:, None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(-1).astype(np.uint64)


def encode_refblock(values: np.ndarray, order: int) -> bytes:
    bits = 1 << order
    if bits >= 8:
        return values.astype(f">u{bits // 8}").tobytes()
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    packed = (values.astype(np.uint8).reshape(-1, per) << shifts).sum(axis=1, dtype=np.uint8)
    return packed.tobytes()


class MetaIO:
    """Reads, writes and syncs of the image file (metadata and, usually, data)."""

    def __init__(
        self,
        read: Callable[[int, int], Awaitable[bytes]],
        write: Callable[[int, bytes], Awaitable[None]],
        sync: Callable[[], Awaitable[None]],
    ) -> None:
        self.read = read
        self.write = write
        self.sync = sync


class Refcounts:
    """The refcounts of one image and its host cluster allocation (see the module doc)."""

    def __init__(
        self,
        io: MetaIO,
        *,
        where: str,
        cluster_bits: int,
        order: int,
        table: np.ndarray,
        table_offset: int,
        table_clusters: int,
        cache_tables: int,
        on_free: Callable[[int], None],
        on_metadata: Callable[[int], None],
        is_metadata: Callable[[int], bool],
    ) -> None:
        """`on_free` hears of each cluster whose refcount reaches 0, `on_metadata` of each
        refcount block or table allocated; `is_metadata` says whether a cluster holds
        metadata, so that allocation never hands it out (QEMU's overlap check)."""
        self.io = io
        self.where = where
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.order = order
        self.max_refcount = (1 << (1 << order)) - 1
        self.per_block = self.cs * 8 >> order
        self.table = table
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.table_dirty: set[int] = set()
        self.cache = TableCache(cache_tables, self._load)
        self.hint = 0
        self.pending: list[int] = []  # clusters whose decrement waits for a flush
        self._on_free = on_free
        self._on_metadata = on_metadata
        self._growing = False
        self.allocations = 0
        self.is_metadata = is_metadata

    # -- reading ------------------------------------------------------------

    async def _load(self, offset: int) -> np.ndarray:
        return decode_refblock(await self.io.read(offset, self.cs), self.order)

    def block_offset(self, rt: int) -> int:
        if rt >= len(self.table):
            return 0
        return int(self.table[rt]) & REFTABLE_OFFSET_MASK

    async def block(self, rt: int) -> np.ndarray | None:
        off = self.block_offset(rt)
        if not off:
            return None
        return self.cache.peek(off) if off in self.cache else await self.cache.get(off)

    async def get(self, cluster: int) -> int:
        blk = await self.block(cluster // self.per_block)
        return 0 if blk is None else int(blk[cluster % self.per_block])

    # -- changing -----------------------------------------------------------

    async def change(self, cluster: int, delta: int) -> int:
        """Add `delta` to one cluster's refcount; returns the new value."""
        rt = cluster // self.per_block
        if delta > 0:
            blk = await self._ensure_block(rt, set())
        else:
            found = await self.block(rt)
            if found is None:
                raise CorruptImage(
                    f"{self.where}: cluster {cluster} is in use but its refcount is already 0"
                )
            blk = found
        i = cluster % self.per_block
        value = int(blk[i]) + delta
        if value < 0:
            raise CorruptImage(
                f"{self.where}: cluster {cluster} is in use but its refcount is already 0"
            )
        if value > self.max_refcount:
            raise IOFailure(
                f"{self.where}: refcount of cluster {cluster} would overflow "
                f"({1 << self.order}-bit refcounts)"
            )
        blk[i] = value
        self.cache.mark_dirty(self.block_offset(rt))
        if value == 0:
            self.hint = min(self.hint, cluster)
            self._on_free(cluster)
        return value

    def queue_free(self, offset: int, length: int) -> None:
        """Drop one reference to every cluster of [offset, offset+length), at the next flush."""
        first = offset >> self.cluster_bits
        last = (offset + max(length, 1) - 1) >> self.cluster_bits
        self.pending.extend(range(first, last + 1))

    async def apply_frees(self) -> int:
        """Apply queued decrements; call only when the metadata that dropped them is stable."""
        pending, self.pending = self.pending, []
        for cluster in pending:
            await self.change(cluster, -1)
        return len(pending)

    async def allocate(self, count: int, reserved: set[int] | None = None) -> int:
        """Reserve `count` contiguous free clusters (refcount 1); returns the host offset."""
        reserved = set() if reserved is None else reserved
        start = await self._find_free(count, reserved)
        reserved.update(range(start, start + count))
        c = start
        while c < start + count:
            rt = c // self.per_block
            stop = min(start + count, (rt + 1) * self.per_block)
            blk = await self._ensure_block(rt, reserved)
            base = rt * self.per_block
            if np.any(blk[c - base : stop - base]):
                raise IOFailure(f"{self.where}: allocator picked a cluster in use ({c})")
            blk[c - base : stop - base] = 1
            self.cache.mark_dirty(self.block_offset(rt))
            c = stop
        self.allocations += count
        return start << self.cluster_bits

    async def _find_free(self, count: int, reserved: set[int]) -> int:
        """The first cluster of the first run of `count` free, unreserved clusters."""
        c = self.hint
        carry = 0  # free clusters just before `c`
        first_free: int | None = None
        while True:
            rt = c // self.per_block
            base = rt * self.per_block
            blk = await self.block(rt)
            if blk is None:
                free = np.ones(base + self.per_block - c, dtype=bool)
            else:
                free = blk[c - base :] == 0
            if reserved:
                end = base + self.per_block
                for r in reserved:
                    if c <= r < end:
                        free[r - c] = False
            padded = np.concatenate(([False], free, [False])).astype(np.int8)
            edges = np.diff(padded)
            starts = np.flatnonzero(edges == 1)
            ends = np.flatnonzero(edges == -1)
            if first_free is None and len(starts):
                first_free = c + int(starts[0])
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                run_start = c + s
                length = e - s
                if s == 0:
                    run_start -= carry
                    length += carry
                if length >= count:
                    self._refuse_overlap(run_start, count)
                    if first_free == run_start:
                        self.hint = run_start + count
                    elif first_free is not None:
                        self.hint = first_free
                    return run_start
            if len(ends) and ends[-1] == len(free):
                carry = (carry if starts[-1] == 0 else 0) + int(ends[-1] - starts[-1])
            else:
                carry = 0
            c = base + self.per_block

    def _refuse_overlap(self, start: int, count: int) -> None:
        """QEMU's overlap check at allocation: a cluster that holds metadata but whose
        refcount says free must not be given to data or other metadata (it would be
        overwritten: an L1 table destroyed by the first allocating write)."""
        for c in range(start, start + count):
            if self.is_metadata(c):
                raise CorruptImage(
                    f"{self.where}: cluster {c} holds metadata but its refcount is 0; "
                    "refusing to write over it (repair with 'qemu-img check -r all')"
                )

    async def _ensure_block(self, rt: int, reserved: set[int]) -> np.ndarray:
        if rt >= len(self.table):
            if self._growing:
                raise IOFailure(f"{self.where}: refcount table growth ran out of room")
            await self._grow(rt, reserved)
        off = self.block_offset(rt)
        if off:
            return await self.cache.get(off)
        spot = await self._find_free(1, reserved)
        reserved.add(spot)
        new = np.zeros(self.per_block, dtype=np.uint64)
        if spot // self.per_block == rt:
            new[spot % self.per_block] = 1  # the block counts itself
        else:
            other = await self._ensure_block(spot // self.per_block, reserved)
            other[spot % self.per_block] += 1
            self.cache.mark_dirty(self.block_offset(spot // self.per_block))
        self.table[rt] = spot << self.cluster_bits
        self.table_dirty.add(rt)
        self.cache.put(spot << self.cluster_bits, new)
        self._on_metadata(spot)
        return new

    async def _grow(self, rt_needed: int, reserved: set[int]) -> None:
        """Move the refcount table to a larger one.

        The new table and the blocks that count it are written and synced
        before the header points at them; the old table is freed after the
        header change is stable.  A crash leaves either the old or the new
        table in use, plus leaks.
        """
        per_cluster = self.cs // 8
        old_len = len(self.table)
        if (rt_needed + 1) * 8 > MAX_REFTABLE_BYTES:
            raise TooLarge(
                f"{self.where}: the image file would need a refcount table larger than "
                f"QEMU's limit of {MAX_REFTABLE_BYTES >> 20} MiB; it cannot grow further"
            )
        new_len = max(rt_needed + 1, old_len * 2)
        new_len = -(-new_len // per_cluster) * per_cluster
        new_len = max(rt_needed + 1, min(new_len, MAX_REFTABLE_BYTES // 8))
        clusters = -(-new_len // per_cluster)
        new_len = clusters * per_cluster
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table = np.concatenate([self.table, np.zeros(new_len - old_len, dtype=np.uint64)])
        self._growing = True
        try:
            start = await self._find_free(clusters, reserved)
            reserved.update(range(start, start + clusters))
            for c in range(start, start + clusters):
                blk = await self._ensure_block(c // self.per_block, reserved)
                blk[c % self.per_block] += 1
                self.cache.mark_dirty(self.block_offset(c // self.per_block))
                self._on_metadata(c)
        finally:
            self._growing = False
        await self.write_blocks()
        await self.io.sync()
        await self.io.write(start << self.cluster_bits, self.table.astype(">u8").tobytes())
        await self.io.sync()
        await self.io.write(
            OFF_REFTABLE_OFFSET, struct.pack(">QI", start << self.cluster_bits, clusters)
        )
        await self.io.sync()
        self.table_offset = start << self.cluster_bits
        self.table_clusters = clusters
        self.table_dirty.clear()
        old_first = old_offset >> self.cluster_bits
        for c in range(old_first, old_first + old_clusters):
            await self.change(c, -1)

    # -- writing back ---------------------------------------------------------

    async def write_blocks(self) -> int:
        dirty = self.cache.items_dirty()
        for off, blk in dirty:
            await self.io.write(off, encode_refblock(blk, self.order))
        self.cache.mark_clean([off for off, _ in dirty])
        return len(dirty)

    async def write_table(self) -> int:
        """Write the 512-byte pieces of the table that hold changed entries."""
        sectors = sorted({rt // 64 for rt in self.table_dirty})
        for s in sectors:
            chunk = self.table[s * 64 : s * 64 + 64].astype(">u8").tobytes()
            await self.io.write(self.table_offset + s * 512, chunk)
        self.table_dirty.clear()
        return len(sectors)

    # -- whole-image passes ---------------------------------------------------------

    async def used_clusters(self) -> dict[int, int]:
        """Every cluster with a nonzero refcount (reads every block)."""
        out: dict[int, int] = {}
        for rt in range(len(self.table)):
            blk = await self.block(rt)
            if blk is None:
                continue
            for i in np.flatnonzero(blk).tolist():
                out[rt * self.per_block + i] = int(blk[i])
        return out

    async def set_all(self, wanted: dict[int, int]) -> None:
        """Make every refcount equal `wanted` (0 where absent): the repair of a dirty image."""
        by_block: dict[int, list[tuple[int, int]]] = {}
        for c, n in wanted.items():
            by_block.setdefault(c // self.per_block, []).append((c, n))
        # first the blocks that exist, so the clusters they mark used are known
        for rt in range(len(self.table)):
            blk = await self.block(rt)
            if blk is None:
                continue
            base = rt * self.per_block
            new = np.zeros(self.per_block, dtype=np.uint64)
            for c, n in by_block.get(rt, []):
                new[c - base] = n
            own = self.block_offset(rt) >> self.cluster_bits
            if base <= own < base + self.per_block:
                new[own - base] = max(int(new[own - base]), 1)
            if not np.array_equal(new, blk):
                blk[:] = new
                self.cache.mark_dirty(self.block_offset(rt))
        # then clusters whose block is missing: create blocks that avoid used clusters
        missing = {c: n for c, n in wanted.items() if not self.block_offset(c // self.per_block)}
        reserved = set(missing)
        for c, n in sorted(missing.items()):
            blk = await self._ensure_block(c // self.per_block, reserved)
            blk[c % self.per_block] = n
            self.cache.mark_dirty(self.block_offset(c // self.per_block))
        self.hint = 0
