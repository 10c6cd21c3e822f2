"""The pyfuse3 transport (`fusedisk mount --transport pyfuse3`): libfuse's view of the mount.

The design's original dependency, kept as a second opinion in tests.  It adapts
pyfuse3's handlers to the shared `MountFilesystem`; it has no fallocate or lseek
handler (pyfuse3 registers none), so punch-hole and SEEK_HOLE are not served
here, and it costs ~5x more per request than the kernel transport
(docs/design-notes.md).  Every handler turns any exception into a FUSEError,
because any other exception ends pyfuse3.main() and kills the mount.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from fusedisk.fuse.connection import raise_background_limit
from fusedisk.fuse.filesystem import Attributes, MountFilesystem, log_failure
from fusedisk.fuse.kernel.mounting import mount_options
from fusedisk.fuse.o_trunc import SizeKeeper

log = logging.getLogger("fusedisk")


def fuse_error(exc: BaseException, what: str) -> pyfuse3.FUSEError:
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    return pyfuse3.FUSEError(log_failure(exc, what))


def _entry(a: Attributes) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid, e.st_gid = a.uid, a.gid
    e.st_size = a.size
    e.st_blocks = a.blocks
    e.st_blksize = 4096
    e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = a.time_ns
    e.entry_timeout = e.attr_timeout = a.timeout
    return e


class DiskOperations(pyfuse3.Operations):
    """pyfuse3's handlers, each a line onto MountFilesystem."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: MountFilesystem) -> None:
        super().__init__()
        self.fs = fs
        self.sizes = SizeKeeper(pyfuse3.notify_store)
        self.nursery: trio.Nursery | None = None  # set while serving: SizeKeeper's timers

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        try:
            return _entry(self.fs.lookup(parent_inode, os.fsdecode(name)))
        except Exception as e:
            raise fuse_error(e, "lookup") from None

    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        try:
            return _entry(self.fs.getattr(inode))
        except Exception as e:
            raise fuse_error(e, "getattr") from None

    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        try:
            size = attr.st_size if fields.update_size else None
            owner = fields.update_mode or fields.update_uid or fields.update_gid
            return _entry(await self.fs.setattr(inode, size, owner))
        except Exception as e:
            raise fuse_error(e, "setattr") from None

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        try:
            return os.fsencode(self.fs.readlink(inode))
        except Exception as e:
            raise fuse_error(e, "readlink") from None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.fs.total_blocks(4096)
        s.f_namemax = 255
        return s

    async def opendir(self, inode: int, ctx: Any) -> int:
        try:
            self.fs.opendir(inode)
            return inode
        except Exception as e:
            raise fuse_error(e, "opendir") from None

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        try:
            for index, (name, a) in enumerate(self.fs.readdir(fh, start_id), start_id + 1):
                if not pyfuse3.readdir_reply(token, os.fsencode(name), _entry(a), index):
                    break
        except Exception as e:
            raise fuse_error(e, "readdir") from None

    async def releasedir(self, fh: int) -> None:
        return None

    async def forget(self, inode_list: Any) -> None:
        return None  # inode numbers are kept for the mount's life

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        try:
            opened = self.fs.open(inode, flags)
            if opened.is_disk and flags & os.O_TRUNC and self.nursery is not None:
                self.sizes.opened(self.nursery, opened.fh, inode, self.fs.disk(opened.fh))
            return pyfuse3.FileInfo(fh=opened.fh, direct_io=True)
        except Exception as e:
            raise fuse_error(e, "open") from None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            await self.sizes.before_request(fh)
            return await self.fs.read(fh, off, size)
        except Exception as e:
            raise fuse_error(e, f"read {off}+{size}") from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            await self.sizes.before_request(fh)
            return await self.fs.write(fh, off, buf)
        except Exception as e:
            raise fuse_error(e, f"write at {off}") from None

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            await self.sizes.before_request(fh)
            await self.fs.fsync(fh)
        except Exception as e:
            raise fuse_error(e, "fsync") from None

    async def flush(self, fh: int) -> None:
        try:
            await self.sizes.before_request(fh)
            await self.fs.flush(fh)
        except Exception as e:
            raise fuse_error(e, "flush") from None

    async def release(self, fh: int) -> None:
        self.sizes.released(fh)
        self.fs.release(fh)


async def serve_pyfuse3(
    fs: MountFilesystem,
    mountpoint: Path,
    fsname: str,
    allow_other: bool,
    ready: Callable[[], None],
    on_stop: Callable[[Callable[[], None]], Any],
) -> None:
    """Mount with libfuse and serve until unmounted or `on_stop` fires."""
    # auto_unmount: libfuse's helper unmounts if the daemon dies, no stale mount
    options = {*mount_options(fsname, "fusedisk", allow_other), "auto_unmount"}
    operations = DiskOperations(fs)
    pyfuse3.init(operations, str(mountpoint), options)
    try:
        raise_background_limit(mountpoint)
        ready()
        async with trio.open_nursery() as nursery:
            operations.nursery = nursery
            nursery.start_soon(on_stop, pyfuse3.terminate)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
