"""The write path of a qcow2 image: writes in place, and cluster allocation for the rest.

A write into clusters allocated here (refcount one, every touched subcluster
allocated) takes no lock.  Any other write *claims* the guest clusters it
changes (a second writer to the same cluster waits, then finds it
allocated), builds each cluster's new content (copy-on-write of the old
guest bytes for a partial cluster), writes the data to newly allocated host
clusters, and only then points the L2 entries at them, under the metadata
lock; the old references are queued for release after the next flush.
"""

from __future__ import annotations

import numpy as np
import trio

from fusedisk.errors import CorruptImage
from fusedisk.formats.qcow2.layout import (
    ALL_SUBCLUSTERS,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    decode_compressed,
)
from fusedisk.formats.qcow2.reading import ImageReading

_MAX_RUN_BYTES = 4 << 20  # clusters allocated together by one write


class ImageWriting(ImageReading):
    """`write`, the claims on guest clusters, and `_set_l2` (allocates L2 tables)."""

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
