"""Growing a qcow2 image (QEMU's qcow2_co_truncate, growth only).

A larger disk may need a larger L1 table: it is written whole to new
clusters and synced before the header points at it (with the new size, in
one write), so a crash leaves the old table or the new one.  The grown part
must then read as zeroes, not as old bytes of the last cluster or of a longer
backing file.
"""

from __future__ import annotations

import struct

import numpy as np

from fusedisk.errors import NotSupported
from fusedisk.formats.qcow2.layout import OFF_SIZE
from fusedisk.formats.qcow2.zeroing import ImageZeroing


class ImageGrowth(ImageZeroing):
    """`truncate` to a larger size."""

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
