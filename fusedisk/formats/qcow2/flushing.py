"""Writing a qcow2 image's metadata back in the crash-safe order.

A flush writes refcount blocks, syncs, the refcount table, syncs, L2 tables,
syncs, the L1 table, syncs, and only then applies the refcount decrements that
the new tables made safe; the clusters freed are then handed back to the host
file.  A crash therefore leaves leaks at worst (docs/drivers/qcow2.md).
"""

from __future__ import annotations

from fusedisk.formats.qcow2.mapping import encode_l2
from fusedisk.formats.qcow2.opening import ImageOpening


class ImageFlushing(ImageOpening):
    """`writeback` and `flush`: dirty tables and refcounts to stable storage, in order."""

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
