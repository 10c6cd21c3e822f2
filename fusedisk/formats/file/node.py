"""Driver `file`: a host file or block device, the leaf of every tree.

Every request that can wait for the device goes through a HostFile
(hostio.py): page-cache hits are answered inline (RWF_NOWAIT), buffered
writes are queued to the file's writer thread (write_behind.py), everything
else runs in the file's io_uring or worker pool, so a slow or hung host file
stalls only its own requests, never the event loop or another disk.  fdatasync is
skipped when nothing was written since the last one (as QEMU does).

Options follow QEMU's file driver: `cache.direct` opens with O_DIRECT (the
alignment it needs is discovered and becomes the node's request_alignment,
so the edges above pad requests), `cache.no-flush` makes flush a no-op, and
`aio` names the engine.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import stat
from typing import Any

import trio

from fusedisk.errors import NotSupported, OpenError
from fusedisk.graph.extents import Extent, Status
from fusedisk.graph.node import GraphOp, Node
from fusedisk.graph.options import REQUIRED, Option, option_table
from fusedisk.hostio import uring
from fusedisk.hostio.files import open_host_file
from fusedisk.hostio.host_file import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    HostFile,
    direct_io_alignment,
)
from fusedisk.hostio.locking import ImageLock, lock_image

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)

#: the engines `aio` may name (docs/design-notes.md has the measurements)
AIO_ENGINES = ("threads", "io_uring")


def default_aio() -> str:
    """io_uring where the kernel allows it (not blocked by seccomp or
    kernel.io_uring_disabled) on x86-64, whose memory order the ring code relies
    on; else the worker pool."""
    if platform.machine() == "x86_64" and uring.available() is None:
        return "io_uring"
    return "threads"


def _extents(fd: int, offset: int, length: int) -> list[Extent] | None:
    """Data and holes of `fd` in a range by lseek(SEEK_DATA/SEEK_HOLE); None if unsupported.

    Runs on a worker: lseek reads the file's extent map, which may wait for the device.
    """
    data_status = Status.DATA | Status.ALLOCATED
    end = offset + length
    out: list[Extent] = []
    pos = offset
    while pos < end:
        try:
            data_at = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                return None
            data_at = end
        if data_at > pos:
            stop = min(data_at, end)
            out.append(Extent(pos, stop - pos, Status.ZERO | Status.ALLOCATED))
            pos = stop
            continue
        hole_at = os.lseek(fd, pos, os.SEEK_HOLE)
        stop = min(hole_at, end)
        out.append(Extent(pos, stop - pos, data_status))
        pos = stop
    return out


class FileNode(Node):
    driver = "file"
    summary = "a host file or block device"
    option_specs = option_table(
        Option("filename", "path", REQUIRED, "path of the host file or block device"),
        Option(
            "cache.direct",
            "bool",
            False,
            "open with O_DIRECT: bypass the host page cache (QEMU's cache=none)",
        ),
        Option(
            "cache.no-flush",
            "bool",
            False,
            "ignore flushes: no fdatasync ever (fast, unsafe on a host crash)",
        ),
        Option(
            "aio",
            "str",
            None,
            "how host I/O leaves the event loop: io_uring (the default where the kernel "
            "allows it) or threads (a batched worker pool)",
            choices=AIO_ENGINES,
        ),
        Option(
            "locking",
            "str",
            "auto",
            "QEMU's image locking: on, off, or auto (on where the filesystem supports it)",
            choices=("auto", "on", "off"),
        ),
    )
    graph_op = GraphOp.TARGET
    grows_on_write = True

    fd = -1
    lock: ImageLock | None = None
    is_block_device = False
    host: HostFile | None = None
    _write_gen = 0
    _flushed_gen = 0

    @property
    def path(self) -> str:
        return str(self.options["filename"])

    @property
    def io(self) -> HostFile:
        if self.host is None:
            raise NotSupported(f"node '{self.name}' is closed")
        return self.host

    async def open(self) -> None:
        await super().open()
        self._flush_limiter = trio.CapacityLimiter(1)
        direct = bool(self.options.get("cache.direct"))
        where = f"node '{self.name}': option 'filename'"
        self.fd, st = open_host_file(self.path, not self.read_only, where, direct)
        try:
            self._take_size(st)
            if direct:
                self._discover_alignment()
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        aio = self.options.get("aio") or default_aio()
        self.options["aio"] = aio  # options/aio shows the engine in use
        try:
            self.host = HostFile(self.fd, f"file:{self.name}", direct=direct, aio=aio,
                                 where=f"node '{self.name}': '{self.path}'")  # fmt: skip
        except OSError as e:
            os.close(self.fd)
            self.fd = -1
            raise OpenError(
                f"node '{self.name}': option 'aio': io_uring cannot be used here: {e.strerror}"
            ) from None
        try:
            self.lock = lock_image(self.fd, self, self.options.get("locking", "auto"),
                                   f"{where}: '{self.path}'")  # fmt: skip
        except BaseException:
            await self.close()
            raise

    def _take_size(self, st: os.stat_result) -> None:
        """Size of the file (open_host_file let only regular files and block devices in)."""
        if stat.S_ISBLK(st.st_mode):
            self.is_block_device = True
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        else:
            self.size = st.st_size

    def _discover_alignment(self) -> None:
        try:
            self.request_alignment = direct_io_alignment(self.fd)
        except OSError as e:
            raise OpenError(
                f"node '{self.name}': option 'cache.direct': O_DIRECT reads of "
                f"'{self.path}' fail: {e.strerror}"
            ) from None

    async def prepare_read_only(self) -> None:
        if self.lock is not None:
            self.lock.downgrade()  # others may now open the file read-only

    async def prepare_writable(self) -> None:
        if self.lock is not None:
            self.lock.upgrade(f"node '{self.name}': option 'filename': '{self.path}'")

    async def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.host is not None:
            host, self.host = self.host, None
            with contextlib.suppress(OSError):  # a failed write was reported to its flush
                await host.drain()  # acknowledged writes land before the file closes
            host.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def read(self, offset: int, length: int) -> bytes:
        return await self.io.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        self._write_gen += 1
        await self.io.write(offset, data)
        if offset + len(data) > self.size:
            self.size = offset + len(data)

    async def flush(self) -> None:
        gen = self._write_gen
        if gen == self._flushed_gen:
            return
        if self.options.get("cache.no-flush"):
            await self.io.drain()  # in the page cache, so a crash of the daemon loses nothing
            return
        # One fdatasync at a time: a flush queued behind a running one still
        # syncs, because that one may have started before its writes landed.
        async with self._flush_limiter:
            if gen <= self._flushed_gen:
                return
            await self.io.fdatasync()
            self._flushed_gen = max(self._flushed_gen, gen)

    async def _grow_to(self, end: int) -> None:
        if end > self.size:
            if self.is_block_device:
                raise NotSupported(f"node '{self.name}': cannot grow a block device")
            await self.io.ftruncate(end)
            self.size = max(self.size, end)

    async def discard(self, offset: int, length: int) -> None:
        self._write_gen += 1
        try:
            await self.io.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._write_gen += 1
        await self._grow_to(offset + length)
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if unmap:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                await self.io.fallocate(mode, offset, length)
                return
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
        await self.io.write_zero_bytes(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        extents = None
        if not self.is_block_device:
            extents = await self.io.call(_extents, offset, length, read_only=True)
        return extents or [Extent(offset, length, Status.DATA | Status.ALLOCATED)]

    async def truncate(self, size: int) -> None:
        if self.is_block_device:
            raise NotSupported(f"node '{self.name}': a block device cannot be resized")
        self._write_gen += 1
        await self.io.ftruncate(size)
        self.size = size

    def driver_stats(self) -> dict[str, Any]:
        return {
            "request_alignment": self.request_alignment,
            **(self.host.statistics() if self.host is not None else {}),
        }
