"""Driver `file`: a host file or block device, the leaf of every tree.

Reads and writes are done inline with os.pread/os.pwrite: a page-cache hit
costs about a microsecond, while handing each request to a thread costs
~260 µs (../shared/platform.md), which made a passthrough 2-5x slower.  Only
fdatasync, which waits for the device, goes to a worker thread, and it is
skipped when nothing was written since the last one (as QEMU does).
"""

from __future__ import annotations

import errno
import os
import stat

import trio

from fusedisk.errors import NotSupported, OpenError
from fusedisk.formats.hostio import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
    pread_full,
    pwrite_full,
    write_zero_bytes,
)
from fusedisk.graph.extents import Extent, Status
from fusedisk.graph.node import GraphOp, Node
from fusedisk.graph.options import REQUIRED, Option, option_table

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)


class FileNode(Node):
    driver = "file"
    summary = "a host file or block device"
    option_specs = option_table(
        Option("filename", "path", REQUIRED, "path of the host file or block device"),
    )
    graph_op = GraphOp.TARGET
    grows_on_write = True

    fd = -1
    is_block_device = False
    _write_gen = 0
    _flushed_gen = 0

    @property
    def path(self) -> str:
        return str(self.options["filename"])

    async def open(self) -> None:
        await super().open()
        self._flush_limiter = trio.CapacityLimiter(1)
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            raise OpenError(
                f"node '{self.name}': option 'filename': cannot open '{self.path}': {e.strerror}"
            ) from None
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            self.is_block_device = True
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        else:
            os.close(self.fd)
            self.fd = -1
            raise OpenError(
                f"node '{self.name}': option 'filename': '{self.path}' is neither a regular "
                "file nor a block device"
            )

    async def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def read(self, offset: int, length: int) -> bytes:
        return pread_full(self.fd, length, offset)

    async def write(self, offset: int, data: bytes) -> None:
        self._write_gen += 1
        pwrite_full(self.fd, data, offset)
        if offset + len(data) > self.size:
            self.size = offset + len(data)

    async def flush(self) -> None:
        gen = self._write_gen
        if gen == self._flushed_gen:
            return
        # One fdatasync at a time: a flush queued behind a running one still
        # syncs, because that one may have started before its writes landed.
        async with self._flush_limiter:
            if gen <= self._flushed_gen:
                return
            await trio.to_thread.run_sync(os.fdatasync, self.fd)
            self._flushed_gen = max(self._flushed_gen, gen)

    def _grow_to(self, end: int) -> None:
        if end > self.size:
            if self.is_block_device:
                raise NotSupported(f"node '{self.name}': cannot grow a block device")
            os.ftruncate(self.fd, end)
            self.size = end

    async def discard(self, offset: int, length: int) -> None:
        self._write_gen += 1
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._write_gen += 1
        self._grow_to(offset + length)
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if unmap:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
        write_zero_bytes(self.fd, offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        data_status = Status.DATA | Status.ALLOCATED
        if self.is_block_device:
            return [Extent(offset, length, data_status)]
        end = offset + length
        out: list[Extent] = []
        pos = offset
        while pos < end:
            try:
                data_at = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    return [Extent(offset, length, data_status)]
                data_at = end
            if data_at > pos:
                stop = min(data_at, end)
                out.append(Extent(pos, stop - pos, Status.ZERO | Status.ALLOCATED))
                pos = stop
                continue
            hole_at = os.lseek(self.fd, pos, os.SEEK_HOLE)
            stop = min(hole_at, end)
            out.append(Extent(pos, stop - pos, data_status))
            pos = stop
        return out

    async def truncate(self, size: int) -> None:
        if self.is_block_device:
            raise NotSupported(f"node '{self.name}': a block device cannot be resized")
        self._write_gen += 1
        os.ftruncate(self.fd, size)
        self.size = size
