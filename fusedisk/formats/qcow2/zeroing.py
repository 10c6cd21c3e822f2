"""Discard and write-zeroes on a qcow2 image: whole clusters by their L2 entries.

A whole cluster reads as zeroes with the zero flag (v3), an all-zero subcluster
bitmap (extended L2) or no entry at all (no backing file); the partial
clusters at the ends, and what a v2 image over a backing file cannot express,
are written as zero bytes.  A raw external data file must read as the disk, so
it is zeroed itself and discard leaves it alone.
"""

from __future__ import annotations

from fusedisk.formats.qcow2.layout import ALL_SUBCLUSTERS, OFLAG_COPIED, OFLAG_ZERO
from fusedisk.formats.qcow2.writing import ImageWriting


class ImageZeroing(ImageWriting):
    """`discard` and `write_zeroes`."""

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
