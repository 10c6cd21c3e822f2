"""The pyfuse3 adapter: FUSE requests onto the control tree and the disks.

Every handler turns any exception into a FUSEError through `errors.to_errno`
(one place), because any other exception ends pyfuse3.main() and kills the
mount.  Disk files and control files are opened with direct_io: disk data is
not cached twice (the host page cache already holds it) and control files are
read fresh every time, whatever size getattr reported.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

import pyfuse3

from fusedisk.errors import FuseDiskError, to_errno
from fusedisk.fuse.tree import ControlTree, DirEntry, DiskEntry, Entry, FileEntry, LinkEntry
from fusedisk.graph.disk import Disk
from fusedisk.graph.graph import Graph

log = logging.getLogger("fusedisk")

#: control-tree entries may appear and vanish with graph changes: no kernel caching
CONTROL_TIMEOUT = 0.0
DISK_TIMEOUT = 1.0


def fuse_error(exc: BaseException, what: str) -> pyfuse3.FUSEError:
    """Log `exc` once and give the errno the client will see."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, FuseDiskError | OSError):
        log.error("%s: %s", what, exc)
    else:
        log.exception("%s: unexpected error", what)
    return pyfuse3.FUSEError(to_errno(exc))


@dataclass
class ControlHandle:
    entry: FileEntry
    content: bytes
    path: str


class InodeTable:
    """Stable inode numbers for paths; a path keeps its number for the mount's life."""

    def __init__(self) -> None:
        self._by_path: dict[tuple[str, ...], int] = {(): pyfuse3.ROOT_INODE}
        self._by_ino: dict[int, tuple[str, ...]] = {pyfuse3.ROOT_INODE: ()}

    def ino(self, path: tuple[str, ...]) -> int:
        number = self._by_path.get(path)
        if number is None:
            number = len(self._by_ino) + 1
            self._by_path[path] = number
            self._by_ino[number] = path
        return number

    def path(self, ino: int) -> tuple[str, ...]:
        try:
            return self._by_ino[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None


class DiskOperations(pyfuse3.Operations):
    """FUSE operations of one mount."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = graph
        self.tree = ControlTree(graph)
        self.inodes = InodeTable()
        self._handles: dict[int, Disk | ControlHandle] = {}
        self._next_fh = 1
        self._mounted_at = time.time_ns()

    # -- attributes -------------------------------------------------------------

    def _entry(self, path: tuple[str, ...]) -> Entry:
        entry = self.tree.resolve(path)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def _attrs(self, ino: int, entry: Entry) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_nlink = 1
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._mounted_at
        a.st_blksize = 4096
        a.entry_timeout = a.attr_timeout = CONTROL_TIMEOUT
        if isinstance(entry, DiskEntry):
            disk = entry.disk
            mode = disk.spec.mode & ~0o222 if disk.read_only else disk.spec.mode
            a.st_mode = stat.S_IFREG | mode
            a.st_uid, a.st_gid = disk.spec.uid, disk.spec.gid
            a.st_size = disk.size
            a.st_blocks = (disk.size + 511) // 512
            a.entry_timeout = a.attr_timeout = DISK_TIMEOUT
        elif isinstance(entry, DirEntry):
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        elif isinstance(entry, LinkEntry):
            a.st_mode = stat.S_IFLNK | 0o777
            a.st_size = len(entry.target)
        elif isinstance(entry, FileEntry):
            a.st_mode = stat.S_IFREG | (0o644 if entry.write is not None else 0o444)
            a.st_size = len(entry.read().encode())
        return a

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            path = (*self.inodes.path(parent_inode), os.fsdecode(name))
            entry = self._entry(path)
            return self._attrs(self.inodes.ino(path), entry)
        except Exception as e:
            raise fuse_error(e, "lookup") from None

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            return self._attrs(inode, self._entry(self.inodes.path(inode)))
        except Exception as e:
            raise fuse_error(e, "getattr") from None

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        try:
            path = self.inodes.path(inode)
            entry = self._entry(path)
            if fields.update_size:
                if isinstance(entry, DiskEntry):
                    await entry.disk.resize(attr.st_size)
                elif not (isinstance(entry, FileEntry) and entry.write is not None):
                    raise pyfuse3.FUSEError(errno.EACCES)
                # A control file accepts the O_TRUNC of `echo x > file`.
            if fields.update_mode or fields.update_uid or fields.update_gid:
                raise pyfuse3.FUSEError(errno.EPERM)
            return self._attrs(inode, entry)
        except Exception as e:
            raise fuse_error(e, "/".join(self.inodes.path(inode)) or "setattr") from None

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            entry = self._entry(self.inodes.path(inode))
            if not isinstance(entry, LinkEntry):
                raise pyfuse3.FUSEError(errno.EINVAL)
            return os.fsencode(entry.target)
        except Exception as e:
            raise fuse_error(e, "readlink") from None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(d.size for d in self.graph.disks.values()) // 4096
        s.f_namemax = 255
        return s

    # -- directories --------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        try:
            if not isinstance(self._entry(self.inodes.path(inode)), DirEntry):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode
        except Exception as e:
            raise fuse_error(e, "opendir") from None

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        try:
            path = self.inodes.path(fh)
            entry = self._entry(path)
            assert isinstance(entry, DirEntry)
            names = sorted(entry.list().items())
            for index in range(start_id, len(names)):
                name, child = names[index]
                child_path = (*path, name)
                attrs = self._attrs(self.inodes.ino(child_path), child)
                if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, index + 1):
                    break
        except Exception as e:
            raise fuse_error(e, "readdir") from None

    async def releasedir(self, fh: int) -> None:
        return None

    async def forget(self, inode_list: Any) -> None:
        return None  # inode numbers are kept for the mount's life

    # -- files ------------------------------------------------------------------

    def _new_handle(self, handle: Disk | ControlHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            path = self.inodes.path(inode)
            entry = self._entry(path)
            writing = flags & os.O_ACCMODE != os.O_RDONLY
            if isinstance(entry, DiskEntry):
                if writing and entry.disk.read_only:
                    raise pyfuse3.FUSEError(errno.EROFS)
                return pyfuse3.FileInfo(fh=self._new_handle(entry.disk), direct_io=True)
            if isinstance(entry, FileEntry):
                if writing and entry.write is None:
                    raise pyfuse3.FUSEError(errno.EACCES)
                content = b"" if writing else entry.read().encode()
                handle = ControlHandle(entry, content, "/".join(path))
                return pyfuse3.FileInfo(fh=self._new_handle(handle), direct_io=True)
            raise pyfuse3.FUSEError(errno.EISDIR)
        except Exception as e:
            raise fuse_error(e, "open") from None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            handle = self._handles[fh]
            if isinstance(handle, Disk):
                return await handle.read(off, size)
            return handle.content[off : off + size]
        except Exception as e:
            raise fuse_error(e, f"read {off}+{size}") from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        try:
            if isinstance(handle, Disk):
                await handle.write(off, buf)
                return len(buf)
            assert handle.entry.write is not None
            await handle.entry.write(buf.decode(errors="replace").rstrip("\n"))
            return len(buf)
        except Exception as e:
            if isinstance(handle, Disk):
                raise fuse_error(e, f"write to {handle.name}") from None
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self.tree.last_error = f"{stamp} {handle.path}: {e}\n"
            raise fuse_error(e, f"write to {handle.path}") from None

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            handle = self._handles[fh]
            if isinstance(handle, Disk):
                await handle.flush()
        except Exception as e:
            raise fuse_error(e, "fsync") from None

    async def flush(self, fh: int) -> None:
        return None  # close(2) does not imply durability; fsync does

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)
