"""O_TRUNC under libfuse: put the kernel's idea of a disk file's size back.

libfuse always negotiates FUSE_ATOMIC_O_TRUNC and pyfuse3 cannot turn it off.  With
it, an open with O_TRUNC (`: > vm0.img`, `dd of=vm0.img` without conv=notrunc)
reaches the daemon as an OPEN, which a disk ignores as a block device does; but
the kernel then sets the file's size to 0 on its own.  Until something refreshes
it, every reader's asynchronous direct I/O (QEMU's aio=native, io_uring) is
clipped at that size and reads zeroes, and appends land at offset 0.

The kernel transport does not negotiate atomic O_TRUNC and has no such window.
Here the size is pushed back with a store notification of the disk's last byte
(a store past the cached size extends it): once when the truncating handle's
first request arrives (the kernel's open, truncation included, is over by then),
and on a few timers for a handle that stays idle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from fusedisk.graph.disk import Disk

log = logging.getLogger("fusedisk")

#: seconds after the open at which an idle truncating handle's size is pushed again
PUSH_DELAYS = (0.0, 0.005, 0.05, 0.5)

#: (inode, offset, data): pyfuse3.notify_store, or a stand-in in tests
Store = Callable[[int, int, bytes], None]


class SizeKeeper:
    """The disk handles opened with O_TRUNC whose size the kernel may hold as 0."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: dict[int, tuple[int, Disk]] = {}  # fh -> (inode, disk)

    def opened(self, nursery: trio.Nursery, fh: int, inode: int, disk: Disk) -> None:
        """A disk handle was opened with O_TRUNC (call before the open is answered)."""
        self._pending[fh] = (inode, disk)
        nursery.start_soon(self._push_later, fh)

    async def before_request(self, fh: int) -> None:
        """Any request on `fh`: the kernel's open of it is complete; push once."""
        if not self._pending:
            return
        entry = self._pending.pop(fh, None)
        if entry is not None:
            await self._push(*entry)

    def released(self, fh: int) -> None:
        self._pending.pop(fh, None)

    async def _push_later(self, fh: int) -> None:
        for delay in PUSH_DELAYS:
            await trio.sleep(delay)
            entry = self._pending.get(fh)
            if entry is None:
                return
            await self._push(*entry)

    async def _push(self, inode: int, disk: Disk) -> None:
        size = disk.size
        if size == 0:
            return
        try:
            last = await disk.read(size - 1, 1)
            await trio.to_thread.run_sync(self._store, inode, size - 1, last)
        except Exception as e:  # the mount must go on; the reader would see a short file
            log.error("disk '%s': restoring its size after O_TRUNC failed: %s", disk.name, e)
