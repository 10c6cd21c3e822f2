"""Serving the FUSE protocol on a /dev/fuse descriptor, in trio, without libfuse.

One reader drains the descriptor (several requests per wake-up), answers the
requests that need no waiting (lookups, attributes, directories, opens) at
once, and starts a task for each one that may wait (reads, writes, fsync,
truncate, fallocate, lseek, control-file writes), so a request held by a
throttle, a flush or a slow child never holds the others.  Replies are one
writev each: a 16-byte header, then the payload; error replies are the header
alone (a payload makes the kernel refuse them).

Robustness: a malformed or unknown request, a handler that raises, an
interrupted request never end the mount; the client gets an errno (ENOSYS for
what we do not serve, EIO for a request we cannot parse) and the log a line.
INTERRUPT is accepted and ignored: requests run to completion, as the kernel
permits, because a disk request stopped half way helps nobody.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from fusedisk.errors import FuseDiskError
from fusedisk.fuse.filesystem import Attributes, FsError, MountFilesystem, log_failure
from fusedisk.fuse.kernel import protocol as p

log = logging.getLogger("fusedisk")

MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
MAX_BACKGROUND = 256
#: requests read per wake-up before other tasks get a turn
BATCH = 64
#: how long requests in flight may finish after the session was told to stop
STOP_GRACE = 10.0

#: Not ATOMIC_O_TRUNC: with it the kernel sets the file's size to 0 after an O_TRUNC
#: OPEN, and clips every reader's async direct I/O (and places appends) at that size
#: until its next GETATTR.  Without it, O_TRUNC is a SETATTR to size 0 whose reply
#: (the disk's real size) is the size the kernel keeps; see `_setattr`.
WANTED_FLAGS = p.ASYNC_READ | p.BIG_WRITES | p.ASYNC_DIO | p.PARALLEL_DIROPS | p.MAX_PAGES
#: threads remembered between a disk's OPEN for writing and their next request
MAX_OPENERS = 4096
#: what the kernel may ask between an O_TRUNC OPEN and its SETATTR (the file's
#: security.capability, before it drops privileges of a truncated file)
BETWEEN_OPEN_AND_TRUNCATE = frozenset({p.Op.GETXATTR, p.Op.GETATTR})


class ProtocolError(FuseDiskError):
    """The kernel and fusedisk could not agree on the protocol."""


class KernelSession:
    """One FUSE connection: INIT, then requests until the mount goes away."""

    def __init__(self, fs: MountFilesystem, fd: int) -> None:
        self.fs = fs
        self.fd = fd
        self.minor = p.OUR_MINOR
        self.buffer = bytearray(MAX_WRITE + p.HEADROOM)
        self.requests = 0
        self._stop = trio.Event()
        # O_TRUNC: thread id -> disk inode it just opened for writing; the request being
        # dispatched: its thread, and whether it came straight after such an OPEN
        self._openers: dict[int, int] = {}
        self._pid = 0
        self._after_open = False
        self._sync: dict[int, Callable[[memoryview, int, int, int], bytes]] = {
            p.Op.LOOKUP: self._lookup,
            p.Op.GETATTR: self._getattr,
            p.Op.READLINK: self._readlink,
            p.Op.OPEN: self._open,
            p.Op.STATFS: self._statfs,
            p.Op.RELEASE: self._release,
            p.Op.OPENDIR: self._opendir,
            p.Op.READDIR: self._readdir,
            p.Op.READDIRPLUS: self._readdirplus,
            p.Op.RELEASEDIR: self._empty,
            p.Op.DESTROY: self._destroy,
        }
        self._async: dict[int, Callable[[memoryview, int, int, int], Awaitable[bytes]]] = {
            p.Op.READ: self._read,
            p.Op.WRITE: self._write,
            p.Op.SETATTR: self._setattr,
            p.Op.FSYNC: self._fsync,
            p.Op.FLUSH: self._flush,
            p.Op.FALLOCATE: self._fallocate,
            p.Op.LSEEK: self._lseek,
        }

    # -- the loop ---------------------------------------------------------------------

    def negotiate(self) -> None:
        """Answer INIT, the first request, before any other (blocking read)."""
        view = memoryview(self.buffer)
        n = os.readv(self.fd, [self.buffer])
        opcode, unique, _, _, body = p.parse_header(view, n)
        if opcode != p.Op.INIT:
            raise ProtocolError(f"the kernel's first request was {opcode}, not INIT")
        major, minor, max_readahead, flags = p.unpack(p.INIT_IN, view, body, n)
        if major != p.KERNEL_MAJOR or minor < p.MIN_MINOR:
            self._reply_error(unique, errno.EPROTO)
            raise ProtocolError(
                f"the kernel speaks FUSE {major}.{minor}; fusedisk needs 7.{p.MIN_MINOR} or newer"
            )
        self.minor = min(minor, p.OUR_MINOR)
        out_flags = flags & (WANTED_FLAGS | p.INIT_EXT)
        if not flags & p.ASYNC_DIO:
            log.warning("the kernel offers no ASYNC_DIO: O_DIRECT requests will arrive one by one")
        reply = p.INIT_OUT.pack(
            p.KERNEL_MAJOR, self.minor, max_readahead, out_flags,
            MAX_BACKGROUND, MAX_BACKGROUND * 3 // 4, MAX_WRITE, 1, MAX_PAGES, 0, 0,
        )  # fmt: skip
        self._reply(unique, reply)
        log.info("FUSE 7.%d negotiated (kernel 7.%d), max_write %d", self.minor, minor, MAX_WRITE)

    def stop(self) -> None:
        """Stop reading requests; those in flight get STOP_GRACE seconds to finish."""
        self._stop.set()

    async def serve(self) -> None:
        """Serve until the mount goes away (ENODEV) or stop() is called."""
        os.set_blocking(self.fd, False)
        async with trio.open_nursery() as requests:
            async with trio.open_nursery() as reader:
                reader.start_soon(self._read_loop, requests, reader.cancel_scope)
                await self._stop.wait()
                reader.cancel_scope.cancel()
            requests.cancel_scope.deadline = trio.current_time() + STOP_GRACE

    async def _read_loop(self, requests: trio.Nursery, done: trio.CancelScope) -> None:
        view = memoryview(self.buffer)
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            for _ in range(BATCH):
                try:
                    n = os.readv(self.fd, [self.buffer])
                except BlockingIOError:
                    break  # wait_readable lets the requests just started run
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno == errno.ENOENT:  # the request was interrupted before we read it
                        continue
                    if e.errno != errno.ENODEV:
                        log.error("reading /dev/fuse: %s", e)
                    self._stop.set()
                    done.cancel()
                    return
                if n == 0:  # end of file: the connection is gone
                    self._stop.set()
                    done.cancel()
                    return
                self.requests += 1
                self._dispatch(view, n, requests)
            else:
                await trio.lowlevel.checkpoint()  # a full batch: let the others run first

    def _dispatch(self, view: memoryview, n: int, requests: trio.Nursery) -> None:
        try:
            opcode, unique, nodeid, pid, body = p.parse_header(view, n)
        except p.RequestError as e:
            log.error("malformed FUSE request ignored: %s", e)
            return
        self._pid = pid
        self._after_open = False
        if self._openers and opcode not in BETWEEN_OPEN_AND_TRUNCATE:
            self._after_open = self._openers.pop(pid, None) == nodeid
        handler = self._sync.get(opcode)
        if handler is not None:
            try:
                self._reply(unique, handler(view, body, n, nodeid))
            except Exception as e:
                self._reply_error(unique, log_failure(e, self._what(opcode, nodeid)))
            return
        waiting = self._async.get(opcode)
        if waiting is not None:
            # The body is parsed now: the buffer is reused by the next read.
            try:
                call = waiting(view, body, n, nodeid)
            except Exception as e:
                self._reply_error(unique, log_failure(e, self._what(opcode, nodeid)))
                return
            requests.start_soon(self._finish, unique, call, opcode, nodeid)
            return
        if opcode in (p.Op.FORGET, p.Op.BATCH_FORGET, p.Op.INTERRUPT):
            return  # no reply: inode numbers live as long as the mount; see the module doc
        self._reply_error(unique, errno.ENOSYS)

    async def _finish(self, unique: int, call: Awaitable[bytes], opcode: int, nodeid: int) -> None:
        try:
            payload = await call
        except Exception as e:
            self._reply_error(unique, log_failure(e, self._what(opcode, nodeid)))
            return
        self._reply(unique, payload)

    def _what(self, opcode: int, nodeid: int) -> str:
        try:
            name = p.Op(opcode).name.lower()
        except ValueError:
            name = f"opcode {opcode}"
        try:
            return f"{name} {'/'.join(self.fs.inodes.path(nodeid)) or '/'}"
        except FsError:
            return f"{name} inode {nodeid}"

    # -- replies ----------------------------------------------------------------------

    def _reply(self, unique: int, payload: bytes) -> None:
        header = p.OUT_HEADER.pack(p.OUT_HEADER.size + len(payload), 0, unique)
        self._send([header, payload] if payload else [header])

    def _reply_error(self, unique: int, code: int) -> None:
        self._send([p.OUT_HEADER.pack(p.OUT_HEADER.size, -code, unique)])

    def _send(self, parts: list[bytes]) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as e:
            # ENOENT: the request was interrupted and is gone; ENODEV: unmounted.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("replying to the kernel: %s", e)

    # -- attributes ---------------------------------------------------------------------

    @staticmethod
    def _attr(a: Attributes) -> bytes:
        seconds = a.time_ns // 1_000_000_000
        return p.pack_attr(
            a.ino, a.size, a.blocks, seconds, a.time_ns % 1_000_000_000, a.mode, a.nlink,
            a.uid, a.gid,
        )  # fmt: skip

    def _entry_out(self, a: Attributes) -> bytes:
        sec, nsec = p.split_timeout(a.timeout)
        return p.ENTRY_OUT.pack(a.ino, 0, sec, sec, nsec, nsec) + self._attr(a)

    def _attr_out(self, a: Attributes) -> bytes:
        sec, nsec = p.split_timeout(a.timeout)
        return p.ATTR_OUT.pack(sec, nsec, 0) + self._attr(a)

    def _lookup(self, view: memoryview, body: int, end: int, nodeid: int) -> bytes:
        return self._entry_out(self.fs.lookup(nodeid, p.name_at(view, body, end)))

    def _getattr(self, view: memoryview, body: int, end: int, nodeid: int) -> bytes:
        return self._attr_out(self.fs.getattr(nodeid))

    def _setattr(self, view: memoryview, body: int, end: int, nodeid: int) -> Awaitable[bytes]:
        """truncate, chmod, chown; and O_TRUNC, which the kernel sends as a SETATTR to
        size 0 by path (no file handle) from the thread that has just opened the file."""
        fields = p.unpack(p.SETATTR_IN, view, body, end)
        valid, size = fields[0], fields[3]
        owner_or_mode = bool(valid & (p.FATTR_MODE | p.FATTR_UID | p.FATTR_GID))
        new_size = size if valid & p.FATTR_SIZE else None
        o_trunc = self._after_open and new_size == 0 and not valid & p.FATTR_FH

        async def run() -> bytes:
            a = await self.fs.setattr(nodeid, new_size, owner_or_mode, o_trunc=o_trunc)
            return self._attr_out(a)

        return run()

    def _readlink(self, view: memoryview, body: int, end: int, nodeid: int) -> bytes:
        return os.fsencode(self.fs.readlink(nodeid))

    def _statfs(self, view: memoryview, body: int, end: int, nodeid: int) -> bytes:
        blocks = self.fs.total_blocks(4096)
        return p.STATFS_OUT.pack(blocks, 0, 0, 0, 0, 4096, 255, 4096, 0)

    # -- directories --------------------------------------------------------------------

    def _opendir(self, view: memoryview, body: int, end: int, nodeid: int) -> bytes:
        self.fs.opendir(nodeid)
        return p.OPEN_OUT.pack(nodeid, 0, 0)

    def _listing(self, view: memoryview, body: int, end: int, nodeid: int, plus: bool) -> bytes:
        """READDIR(PLUS): entries from the request's offset on, as many as its buffer holds;
        each entry's offset is the index of the next one."""
        _fh, start, size, *_ = p.unpack(p.READ_IN, view, body, end)
        out = bytearray()
        for index, (name, a) in enumerate(self.fs.readdir(nodeid, start), start + 1):
            record = p.pack_dirent(a.ino, index, os.fsencode(name), stat.S_IFMT(a.mode) >> 12)
            if plus:
                record = self._entry_out(a) + record
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)

    def _readdir(self, view: memoryview, body: int, end: int, nodeid: int) -> bytes:
        return self._listing(view, body, end, nodeid, plus=False)

    def _readdirplus(self, view: memoryview, body: int, end: int, nodeid: int) -> bytes:
        return self._listing(view, body, end, nodeid, plus=True)

    # -- files ------------------------------------------------------------------------

    def _open(self, view: memoryview, body: int, end: int, nodeid: int) -> bytes:
        flags, _ = p.unpack(p.OPEN_IN, view, body, end)
        opened = self.fs.open(nodeid, flags)
        open_flags = p.FOPEN_DIRECT_IO
        if opened.is_disk:
            open_flags |= p.FOPEN_PARALLEL_DIRECT_WRITES
            if flags & os.O_ACCMODE != os.O_RDONLY:
                if len(self._openers) >= MAX_OPENERS:
                    self._openers.clear()  # threads that opened and went quiet
                self._openers[self._pid] = nodeid
        return p.OPEN_OUT.pack(opened.fh, open_flags, 0)

    def _release(self, view: memoryview, body: int, end: int, nodeid: int) -> bytes:
        fh, *_ = p.unpack(p.RELEASE_IN, view, body, end)
        self.fs.release(fh)
        return b""

    def _empty(self, view: memoryview, body: int, end: int, nodeid: int) -> bytes:
        return b""

    def _destroy(self, view: memoryview, body: int, end: int, nodeid: int) -> bytes:
        self._stop.set()
        return b""

    def _read(self, view: memoryview, body: int, end: int, nodeid: int) -> Awaitable[bytes]:
        fh, offset, size, *_ = p.unpack(p.READ_IN, view, body, end)
        return self.fs.read(fh, offset, size)

    def _write(self, view: memoryview, body: int, end: int, nodeid: int) -> Awaitable[bytes]:
        fh, offset, size, *_ = p.unpack(p.WRITE_IN, view, body, end)
        start = body + p.WRITE_IN.size
        if start + size > end:
            raise p.RequestError(f"write of {size} bytes with {end - start} bytes of data")
        data = bytes(view[start : start + size])

        async def run() -> bytes:
            written = await self.fs.write(fh, offset, data)
            return p.WRITE_OUT.pack(written, 0)

        return run()

    def _fsync(self, view: memoryview, body: int, end: int, nodeid: int) -> Awaitable[bytes]:
        fh, *_ = p.unpack(p.FSYNC_IN, view, body, end)
        return _then_empty(self.fs.fsync(fh))

    def _flush(self, view: memoryview, body: int, end: int, nodeid: int) -> Awaitable[bytes]:
        fh, *_ = p.unpack(p.FLUSH_IN, view, body, end)
        return _then_empty(self.fs.flush(fh))

    def _fallocate(self, view: memoryview, body: int, end: int, nodeid: int) -> Awaitable[bytes]:
        fh, offset, length, mode, _ = p.unpack(p.FALLOCATE_IN, view, body, end)
        return _then_empty(self.fs.fallocate(fh, mode, offset, length))

    def _lseek(self, view: memoryview, body: int, end: int, nodeid: int) -> Awaitable[bytes]:
        fh, offset, whence, _ = p.unpack(p.LSEEK_IN, view, body, end)

        async def run() -> bytes:
            return p.LSEEK_OUT.pack(await self.fs.lseek(fh, offset, whence))

        return run()


async def _then_empty(call: Awaitable[Any]) -> bytes:
    await call
    return b""
