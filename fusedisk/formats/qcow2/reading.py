"""The read path of a qcow2 image: mapped runs, compressed clusters, block status.

Reads take no lock: they map the range (mapping.py) and read each run from
the data file, the backing file (zeroes past its end) or a decompressed
cluster (the last one is kept, as reads of one cluster come in pieces).
"""

from __future__ import annotations

from fusedisk.formats.qcow2.compress import decompress_cluster
from fusedisk.formats.qcow2.flushing import ImageFlushing
from fusedisk.formats.qcow2.layout import decode_compressed
from fusedisk.formats.qcow2.mapping import COMPRESSED, DATA, UNALLOCATED, ZERO
from fusedisk.graph.extents import Extent, Status, merge_extents


class ImageReading(ImageFlushing):
    """`read` and `block_status`, and the guest bytes a partial write keeps (`_old_content`)."""

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

    # -- requests -------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        return await self._read_runs(offset, length)

    # -- block status ------------------------------------------------------------

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
