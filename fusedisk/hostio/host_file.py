"""Host I/O for the leaf drivers: never a blocking system call on the event loop.

Every host read, write, fdatasync, fallocate, ftruncate and lseek that can
wait for a device goes through a `HostFile`:

- **Fast path, inline.**  A read first tries `preadv(..., RWF_NOWAIT)`: the
  kernel answers it from the page cache (about a microsecond) or fails with
  EAGAIN instead of waiting for the device.  Writes try `pwritev(...,
  RWF_NOWAIT)` where the file system honours it; ext4 and tmpfs refuse it for
  buffered writes (EOPNOTSUPP, measured on kernel 6.18), so there every write
  takes the slow path.  A file opened with O_DIRECT has no fast path: its
  requests always wait for the device.  Reads of ONE_COPY_MIN bytes and more
  land directly in the `bytes` object returned (made unfilled, as C code makes
  them, and filled by preadv2 through ctypes): one copy instead of a copy into
  a scratch buffer and a second into bytes -- 34 against 59 µs per cached
  1 MiB read here, which a quorum pays once per child.
- **Buffered writes behind**: acknowledged when queued, written in order by
  the file's writer thread (write_behind.py, which says why that is safe);
  everything that must see them (reads of those bytes, fdatasync, fallocate,
  ftruncate, lseek walks) waits for them first.
- **Slow path, off the loop**: reads, writes and fdatasync in the file's
  io_uring (uring.py: no thread at all) with `aio = "io_uring"`, or in a
  worker pool (fusedisk/hostio/workers.py: a few threads fed by a queue, completions
  batched so trio is woken once per batch, never a thread hand-off per
  request); fallocate, ftruncate and lseek always in the pool.

The system calls themselves (fallocate through ctypes, reads and writes that
loop until complete, O_DIRECT through page-aligned buffers, one-copy reads)
are in syscalls.py.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable
from typing import Any

from fusedisk.hostio.syscalls import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    ONE_COPY_MIN,
    Buffer,
    direct_io_alignment,
    direct_pread,
    direct_pwrite,
    fallocate,
    new_bytes,
    pread_full,
    preadv_nowait_into,
    pwrite_full,
    write_zero_bytes,
)
from fusedisk.hostio.uring import Ring
from fusedisk.hostio.workers import WorkerPool
from fusedisk.hostio.write_behind import WriteBehind

#: the largest read answered from the page cache inline (FUSE sends at most 1 MiB)
FAST_READ_MAX = 1 << 20
#: worker threads per host file (started on demand): enough for a queue depth of 16
DEFAULT_WORKERS = 16

#: the calls' names, importable from here as before the split (syscalls.py)
__all__ = [
    "DEFAULT_WORKERS",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "FAST_READ_MAX",
    "ONE_COPY_MIN",
    "Buffer",
    "HostFile",
    "direct_io_alignment",
    "fallocate",
    "pread_full",
    "pwrite_full",
    "write_zero_bytes",
]


# -- the file -------------------------------------------------------------------------


class HostFile:
    """One open host file descriptor and the way its requests reach the host.

    The caller owns `fd` (it opens and closes it); `HostFile` owns the worker
    pool and the io_uring (`aio`), which `close` ends.  Must be made inside a
    trio run; raises OSError if io_uring is asked for and the kernel refuses it.
    """

    def __init__(
        self,
        fd: int,
        name: str,
        direct: bool = False,
        workers: int = DEFAULT_WORKERS,
        aio: str = "threads",
        where: str = "",
    ):
        self.fd = fd
        self.direct = direct
        self.pool = WorkerPool(name, max_workers=workers)
        self.ring = Ring() if aio == "io_uring" else None
        self._free: list[mmap.mmap] = []  # page-aligned buffers for io_uring and O_DIRECT
        self._nowait_reads = not direct
        self._nowait_writes = not direct
        # where inline reads land before their one copy into bytes; grown on demand
        self._view = memoryview(bytearray(0))
        self._pread: Callable[[int, int, int], bytes] = direct_pread if direct else pread_full
        self._pwrite: Callable[[int, Buffer, int], None] = direct_pwrite if direct else pwrite_full
        # buffered writes: acknowledged when queued, written by one thread (write_behind.py)
        self.behind = None if direct else WriteBehind(fd, name, pwrite_full, where=where)
        self.inline_reads = 0
        self.inline_writes = 0

    def close(self) -> None:
        """Stop taking requests.  Queued writes still land (the writer has its own fd);
        callers that need them in the file first await `drain`."""
        self.pool.close()
        if self.ring is not None:
            self.ring.close()
        if self.behind is not None:
            self.behind.close()

    async def drain(self) -> None:
        """Every acknowledged write is in the file (not yet synced); raises a failed write."""
        if self.behind is not None:
            await self.behind.drain()

    async def read(self, offset: int, length: int) -> bytes:
        if self.behind is not None and (self.behind.busy or self.behind.failed):
            await self.behind.before_read(offset, length)
        if self._nowait_reads and length <= FAST_READ_MAX:
            data = self._read_cached(offset, length)
            if data is not None:
                self.inline_reads += 1
                return data
            # EAGAIN, part of it cached, or the end of the file: the slow path does it all.
        if self.ring is not None:
            return await self._ring_read(self.ring, offset, length)
        return await self.pool.run(self._pread, self.fd, length, offset, abandon_on_cancel=True)

    def _read_cached(self, offset: int, length: int) -> bytes | None:
        """The range if the page cache holds all of it (preadv2 RWF_NOWAIT), else None.

        Large reads land directly in the bytes object returned (one copy); small
        ones in a scratch buffer, then into bytes (cheaper than the ctypes call).
        """
        try:
            if length >= ONE_COPY_MIN:
                data = new_bytes(length)
                n = preadv_nowait_into(self.fd, data, offset)
                return data if n == length else None
            if len(self._view) < length:
                self._view = memoryview(bytearray(max(length, 64 << 10)))
            view = self._view[:length]
            n = os.preadv(self.fd, [view], offset, os.RWF_NOWAIT)
            return bytes(view) if n == length else None
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait_reads = False  # the file system has no non-blocking reads
            return None

    async def write(self, offset: int, data: Buffer) -> None:
        if self.behind is not None and self.behind.failed:
            self.behind.check()  # a failed file takes no write, even one that could go inline
        if self._nowait_writes and not (self.behind is not None and self.behind.busy):
            try:
                n = os.pwritev(self.fd, [data], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                n = 0
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait_writes = False  # measured: ext4 and tmpfs buffered writes
                n = 0
            if n == len(data):
                self.inline_writes += 1
                return
            if n:
                data = memoryview(data)[n:]
                offset += n
        if self.behind is not None:
            await self.behind.write(offset, data)
        elif self.ring is not None:
            await self._ring_write(self.ring, offset, data)
        else:
            await self.pool.run(self._pwrite, self.fd, data, offset)

    async def fdatasync(self) -> None:
        await self.drain()
        if self.ring is not None:
            await self.ring.fdatasync(self.fd)
            return
        await self.pool.run(os.fdatasync, self.fd)

    # -- io_uring (aio = "io_uring") ------------------------------------------------------

    def _aligned(self, size: int) -> mmap.mmap:
        """A page-aligned buffer of at least `size` bytes; 1 MiB ones are reused."""
        if size <= FAST_READ_MAX and self._free:
            return self._free.pop()
        return mmap.mmap(-1, max(size, FAST_READ_MAX))

    def _release(self, buf: mmap.mmap) -> None:
        if len(buf) == FAST_READ_MAX and len(self._free) < 64:
            self._free.append(buf)

    async def _ring_read(self, ring: Ring, offset: int, length: int) -> bytes:
        buf = self._aligned(length)
        view = memoryview(buf)
        got = 0
        while got < length:
            n = await ring.read_into(self.fd, view[got:length], offset + got)
            got += n
            if n == 0 or (self.direct and got % mmap.PAGESIZE):
                break  # the end of the file
        data = bytes(view[:got]) + bytes(length - got) if got < length else bytes(view[:length])
        view.release()
        self._release(buf)  # not on cancellation: the kernel may still write into it
        return data

    async def _ring_write(self, ring: Ring, offset: int, data: Buffer) -> None:
        buf = None
        if self.direct:
            buf = self._aligned(len(data))
            buf[: len(data)] = data
            data = memoryview(buf)[: len(data)]
        done = await ring.write(self.fd, data, offset)
        while done < len(data):  # a short write: the rest
            done += await ring.write(self.fd, memoryview(data)[done:], offset + done)
        if buf is not None:
            if isinstance(data, memoryview):
                data.release()
            self._release(buf)

    async def fallocate(self, mode: int, offset: int, length: int) -> None:
        await self.drain()
        await self.pool.run(fallocate, self.fd, mode, offset, length)

    async def ftruncate(self, size: int) -> None:
        await self.drain()
        await self.pool.run(os.ftruncate, self.fd, size)

    async def write_zero_bytes(self, offset: int, length: int) -> None:
        await self.drain()
        await self.pool.run(write_zero_bytes, self.fd, offset, length, self._pwrite)

    async def call(self, fn: Callable[..., Any], *args: Any, read_only: bool = False) -> Any:
        """Any other blocking call on this file (an lseek walk): `fn(fd, *args)` in the pool."""
        await self.drain()
        return await self.pool.run(fn, self.fd, *args, abandon_on_cancel=read_only)

    def statistics(self) -> dict[str, Any]:
        return {
            "inline_reads": self.inline_reads,
            "inline_writes": self.inline_writes,
            "nowait_reads": self._nowait_reads,
            "nowait_writes": self._nowait_writes,
            **{f"pool_{k}": v for k, v in self.pool.statistics().items()},
            **(
                {f"write_behind_{k}": v for k, v in self.behind.statistics().items()}
                if self.behind is not None
                else {}
            ),
            **(
                {"uring_submitted": self.ring.submitted, "uring_wakeups": self.ring.wakeups}
                if self.ring is not None
                else {}
            ),
        }
