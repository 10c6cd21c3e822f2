"""The mount as a file system: inodes, handles and operations, for any transport.

Both transports (our own /dev/fuse loop and pyfuse3) speak to this class in
inode numbers, file handles and bytes; it answers with `Attributes` or raises
`FsError` (an errno), and any other exception is mapped by the transport with
`errors.to_errno`.  It holds no block logic: disk requests go to the Disk,
control files to the control tree.

Disk files and control files are opened with direct I/O: disk data is not
cached twice (the host page cache already holds it) and control files are read
fresh every time, whatever size getattr reported.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass

from fusedisk.errors import FuseDiskError, OutOfRange, ReadOnly, describe, to_errno
from fusedisk.fuse.tree import ControlTree, DirEntry, DiskEntry, Entry, FileEntry, LinkEntry
from fusedisk.graph.disk import Disk
from fusedisk.graph.extents import Status
from fusedisk.graph.graph import Graph

log = logging.getLogger("fusedisk")

ROOT_INODE = 1

#: control-tree entries may appear and vanish with graph changes: no kernel caching
CONTROL_TIMEOUT = 0.0
DISK_TIMEOUT = 1.0

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

SEEK_DATA = 3
SEEK_HOLE = 4


class FsError(Exception):
    """An errno for the client, with no log line (the expected refusals)."""

    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.errno = code


def log_failure(exc: BaseException, what: str) -> int:
    """Log `exc` once (not the expected refusals) and give the errno the client will see."""
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, FuseDiskError | OSError):
        log.error("%s: %s", what, describe(exc))
    else:
        log.exception("%s: unexpected error", what)
    return to_errno(exc)


@dataclass(slots=True)
class Attributes:
    ino: int
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    time_ns: int = 0
    timeout: float = CONTROL_TIMEOUT

    @property
    def blocks(self) -> int:
        return (self.size + 511) // 512


@dataclass(slots=True)
class ControlHandle:
    entry: FileEntry
    content: bytes
    path: str


@dataclass(slots=True)
class Opened:
    """What open() gave: the handle, and whether it is a disk (the transport's open flags)."""

    fh: int
    is_disk: bool


class InodeTable:
    """Stable inode numbers for paths; a path keeps its number for the mount's life."""

    def __init__(self) -> None:
        self._by_path: dict[tuple[str, ...], int] = {(): ROOT_INODE}
        self._by_ino: dict[int, tuple[str, ...]] = {ROOT_INODE: ()}

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
            raise FsError(errno.ENOENT) from None


class MountFilesystem:
    """The operations of one mount, in transport-neutral terms."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.tree = ControlTree(graph)
        self.inodes = InodeTable()
        self.handles: dict[int, Disk | ControlHandle] = {}
        self._writers: set[int] = set()  # disk handles opened for writing
        self._appenders: set[int] = set()  # disk handles opened with O_APPEND
        self._next_fh = 1
        self._mounted_at = time.time_ns()

    # -- attributes -------------------------------------------------------------

    def _entry(self, path: tuple[str, ...]) -> Entry:
        entry = self.tree.resolve(path)
        if entry is None:
            raise FsError(errno.ENOENT)
        return entry

    def _attrs(self, ino: int, entry: Entry) -> Attributes:
        a = Attributes(ino, 0, time_ns=self._mounted_at)
        if isinstance(entry, DiskEntry):
            disk = entry.disk
            mode = disk.spec.mode & ~0o222 if disk.read_only else disk.spec.mode
            a.mode = stat.S_IFREG | mode
            a.uid, a.gid = disk.spec.uid, disk.spec.gid
            a.size = disk.size
            a.timeout = DISK_TIMEOUT
        elif isinstance(entry, DirEntry):
            a.mode = stat.S_IFDIR | 0o755
            a.nlink = 2
        elif isinstance(entry, LinkEntry):
            a.mode = stat.S_IFLNK | 0o777
            a.size = len(entry.target)
        elif isinstance(entry, FileEntry):
            a.mode = stat.S_IFREG | (0o644 if entry.write is not None else 0o444)
            a.size = len(entry.read().encode())
        return a

    def lookup(self, parent: int, name: str) -> Attributes:
        path = (*self.inodes.path(parent), name)
        entry = self._entry(path)
        return self._attrs(self.inodes.ino(path), entry)

    def getattr(self, ino: int) -> Attributes:
        return self._attrs(ino, self._entry(self.inodes.path(ino)))

    async def setattr(
        self, ino: int, size: int | None, owner_or_mode: bool, o_trunc: bool = False
    ) -> Attributes:
        """truncate(2) of a growable disk, O_TRUNC of a control file; chmod/chown refused.

        `o_trunc`: the size 0 comes from an open with O_TRUNC, which a disk ignores as a
        block device does; the reply's attributes (the disk's size) are what the kernel
        keeps as the file's size.
        """
        entry = self._entry(self.inodes.path(ino))
        if size is not None:
            if isinstance(entry, DiskEntry) and o_trunc:
                pass
            elif isinstance(entry, DiskEntry):
                try:
                    await entry.disk.resize(size)
                except Exception as e:
                    self._remember_refusal(f"{entry.disk.name}.img (truncate)", e)
                    raise
            elif not (isinstance(entry, FileEntry) and entry.write is not None):
                raise FsError(errno.EACCES)
            # A control file accepts the O_TRUNC of `echo x > file`.
        if owner_or_mode:
            raise FsError(errno.EPERM)
        return self._attrs(ino, entry)

    def _remember_refusal(self, what: str, e: Exception) -> None:
        """For `last-error`: a refused request's errno alone does not say why."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.tree.last_error = f"{stamp} {what}: {describe(e)}\n"

    def readlink(self, ino: int) -> str:
        entry = self._entry(self.inodes.path(ino))
        if not isinstance(entry, LinkEntry):
            raise FsError(errno.EINVAL)
        return entry.target

    def total_blocks(self, block_size: int) -> int:
        return sum(d.size for d in self.graph.disks.values()) // block_size

    # -- directories ------------------------------------------------------------

    def opendir(self, ino: int) -> None:
        if not isinstance(self._entry(self.inodes.path(ino)), DirEntry):
            raise FsError(errno.ENOTDIR)

    def readdir(self, ino: int, start: int) -> list[tuple[str, Attributes]]:
        """Entries from index `start` on, sorted by name; entry i's next offset is i + 1."""
        path = self.inodes.path(ino)
        entry = self._entry(path)
        if not isinstance(entry, DirEntry):
            raise FsError(errno.ENOTDIR)
        names = sorted(entry.list().items())
        out = []
        for name, child in names[start:]:
            child_path = (*path, name)
            out.append((name, self._attrs(self.inodes.ino(child_path), child)))
        return out

    # -- files ------------------------------------------------------------------

    def _new_handle(self, handle: Disk | ControlHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        return fh

    def open(self, ino: int, flags: int) -> Opened:
        path = self.inodes.path(ino)
        entry = self._entry(path)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if isinstance(entry, DiskEntry):
            if writing and entry.disk.read_only:
                raise FsError(errno.EROFS)
            fh = self._new_handle(entry.disk)
            if writing:
                self._writers.add(fh)
            if flags & os.O_APPEND:
                self._appenders.add(fh)
            return Opened(fh, True)
        if isinstance(entry, FileEntry):
            if writing and entry.write is None:
                raise FsError(errno.EACCES)
            content = b"" if writing else entry.read().encode()
            return Opened(self._new_handle(ControlHandle(entry, content, "/".join(path))), False)
        raise FsError(errno.EISDIR)

    def handle(self, fh: int) -> Disk | ControlHandle:
        try:
            return self.handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def disk(self, fh: int) -> Disk:
        handle = self.handle(fh)
        if not isinstance(handle, Disk):
            raise FsError(errno.EOPNOTSUPP)
        return handle

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handle(fh)
        if isinstance(handle, Disk):
            return await handle.read(offset, size)
        return handle.content[offset : offset + size]

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handle(fh)
        if isinstance(handle, Disk):
            if fh in self._appenders:
                # A block device appends at its end: ENOSPC, whatever offset the kernel
                # computed from a size it may hold stale.
                raise OutOfRange(
                    f"disk '{handle.name}': an append (O_APPEND) writes past its end "
                    f"({handle.size})"
                )
            await handle.write(offset, data)
            return len(data)
        assert handle.entry.write is not None
        try:
            await handle.entry.write(data.decode(errors="replace").rstrip("\n"))
        except Exception as e:
            self._remember_refusal(handle.path, e)
            raise
        return len(data)

    async def fsync(self, fh: int) -> None:
        """Flush the disk. Never ENOSYS: the kernel would stop sending fsync for good."""
        handle = self.handle(fh)
        if isinstance(handle, Disk):
            try:
                await handle.flush()
            except Exception as e:
                if to_errno(e) == errno.ENOSYS:
                    raise FsError(errno.EIO) from e
                raise

    async def flush(self, fh: int) -> None:
        """close(2) of a disk file opened for writing flushes the disk, as QEMU's FUSE
        export does: after `dd` or `cp` exits, its data is durable and in the host
        files (write-behind queues drained), where other programs see it."""
        if fh in self._writers:
            await self.fsync(fh)

    def release(self, fh: int) -> None:
        self._writers.discard(fh)
        self._appenders.discard(fh)
        self.handles.pop(fh, None)

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a disk file, as a file on a thin-provisioned device behaves.

        PUNCH_HOLE|KEEP_SIZE: the range reads as zeroes and space is released where
        the nodes can; ZERO_RANGE: zeroes; mode 0: the range is (made) allocated.
        """
        disk = self.disk(fh)
        if disk.read_only:
            raise ReadOnly(f"disk '{disk.name}' is read-only")
        if length <= 0 or offset < 0:
            raise FsError(errno.EINVAL)
        keep_size = bool(mode & FALLOC_FL_KEEP_SIZE)
        kind = mode & ~FALLOC_FL_KEEP_SIZE
        end = offset + length
        if end > disk.size:
            if kind == FALLOC_FL_PUNCH_HOLE or keep_size:
                end = disk.size  # nothing past the end to free or reserve
            elif disk.spec.growable:
                await disk.resize(end)  # as a file grows
            else:
                raise FsError(errno.EFBIG)
        if end <= offset:
            return
        if kind == FALLOC_FL_PUNCH_HOLE and keep_size:
            await disk.write_zeroes(offset, end - offset, unmap=True)
        elif kind == FALLOC_FL_ZERO_RANGE:
            await disk.write_zeroes(offset, end - offset, unmap=False)
        elif kind == 0:
            await self._check_allocated(disk, offset, end - offset)
        else:
            raise FsError(errno.EOPNOTSUPP)

    async def _check_allocated(self, disk: Disk, offset: int, length: int) -> None:
        """Mode 0 promises later writes will not fail for space: true only where data is."""
        for extent in await disk.block_status(offset, length):
            if not extent.status & Status.DATA:
                raise FsError(errno.EOPNOTSUPP)

    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE from the graph's block status; holes read as zeroes."""
        handle = self.handle(fh)
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise FsError(errno.EINVAL)
        if isinstance(handle, ControlHandle):
            size = len(handle.content)
            if offset >= size:
                raise FsError(errno.ENXIO)
            return offset if whence == SEEK_DATA else size
        size = handle.size
        if offset < 0 or offset >= size:
            raise FsError(errno.ENXIO)
        want_data = whence == SEEK_DATA
        pos = offset
        while pos < size:
            extents = await handle.block_status(pos, min(size - pos, 1 << 30))
            if not extents:
                break
            for extent in extents:
                is_hole = bool(extent.status & Status.ZERO) and not extent.status & Status.DATA
                if is_hole != want_data:
                    return max(extent.offset, offset)
            pos = extents[-1].end
        if want_data:
            raise FsError(errno.ENXIO)
        return size
