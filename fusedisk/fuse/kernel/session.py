"""Serving the FUSE protocol on a /dev/fuse descriptor, in trio, without libfuse.

One reader drains the descriptor (several requests per wake-up) and answers
every request in the pass that read it when it can: lookups, attributes,
directories and opens always, and a read or write whose first step completes
without waiting (a page-cache hit, a write that write-behind queued) -- the
reader runs the handler's coroutine one step itself ("eager start").  A request
that does wait keeps the task that started it (trio binds what it waits on to
that task), and a new reader task takes over the descriptor: a task is started
only for a request that really waits, and a request held by a throttle, a flush
or a slow child never holds the others.  Replies are one writev each: a 16-byte
header, then the payload; error replies are the header alone (a payload makes
the kernel refuse them).  ring.py serves the same handlers over io_uring.

Robustness: a malformed or unknown request, a handler that raises, an
interrupted request never end the mount; the client gets an errno (ENOSYS for
what we do not serve, EIO for a request we cannot parse) and the log a line.
INTERRUPT is accepted and ignored: requests run to completion, as the kernel
permits, because a disk request stopped half way helps nobody.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Callable, Coroutine
from typing import Any

import trio

from fusedisk.errors import FuseDiskError
from fusedisk.fuse.filesystem import FsError, MountFilesystem, log_failure
from fusedisk.fuse.kernel import protocol as p
from fusedisk.fuse.kernel.eager import Reply, Waiting, resume
from fusedisk.fuse.kernel.handlers import NodeHandlers

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


SyncHandler = Callable[[p.Args, int], bytes]
AsyncHandler = Callable[[p.Args, int], Reply]


class KernelSession(NodeHandlers):
    """One FUSE connection: INIT, then requests until the mount goes away."""

    def __init__(self, fs: MountFilesystem, fd: int) -> None:
        self.fs = fs
        self.fd = fd
        self.minor = p.OUR_MINOR
        self.buffer = bytearray(MAX_WRITE + p.HEADROOM)
        self.requests = 0
        #: requests answered in the loop pass that read them / that waited in a task
        self.eager = 0
        self.waited = 0
        #: what the kernel's INIT offered besides what we asked (flags2 bits: FUSE over io_uring)
        self.offered_flags2 = 0
        self._stop = trio.Event()
        self._idle: set[trio.CancelScope] = set()  # loops waiting for work; stop() wakes them
        # O_TRUNC: thread id -> disk inode it just opened for writing; the request being
        # dispatched: its thread, and whether it came straight after such an OPEN
        self._openers: dict[int, int] = {}
        self._pid = 0
        self._after_open = False
        self._sync: dict[int, SyncHandler] = {
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
        self._async: dict[int, AsyncHandler] = {
            p.Op.READ: self._read,
            p.Op.WRITE: self._write,
            p.Op.SETATTR: self._setattr,
            p.Op.FSYNC: self._fsync,
            p.Op.FLUSH: self._flush,
            p.Op.FALLOCATE: self._fallocate,
            p.Op.LSEEK: self._lseek,
        }

    # -- the loop ---------------------------------------------------------------------

    def negotiate(self, flags2: int = 0) -> int:
        """Answer INIT, the first request, before any other (blocking read).

        `flags2`: the INIT bits above 31 we would like (FUSE_OVER_IO_URING); returns
        those the kernel offered too, which the reply then sets.
        """
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
        if flags & p.INIT_EXT and body + p.INIT_IN.size + p.INIT_IN_FLAGS2.size <= n:
            (self.offered_flags2,) = p.INIT_IN_FLAGS2.unpack_from(view, body + p.INIT_IN.size)
        agreed = flags2 & self.offered_flags2 if flags & p.INIT_EXT else 0
        self.minor = min(minor, p.OUR_MINOR)
        out_flags = flags & (WANTED_FLAGS | p.INIT_EXT)
        if not flags & p.ASYNC_DIO:
            log.warning("the kernel offers no ASYNC_DIO: O_DIRECT requests will arrive one by one")
        reply = p.INIT_OUT.pack(
            p.KERNEL_MAJOR, self.minor, max_readahead, out_flags,
            MAX_BACKGROUND, MAX_BACKGROUND * 3 // 4, MAX_WRITE, 1, MAX_PAGES, 0, agreed,
        )  # fmt: skip
        self._reply(unique, reply)
        log.info("FUSE 7.%d negotiated (kernel 7.%d), max_write %d", self.minor, minor, MAX_WRITE)
        return agreed

    def stop(self) -> None:
        """Stop reading requests; those in flight get STOP_GRACE seconds to finish."""
        self._stop.set()
        for scope in self._idle:
            scope.cancel()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def serve(self) -> None:
        """Serve until the mount goes away (ENODEV) or stop() is called."""
        os.set_blocking(self.fd, False)
        async with trio.open_nursery() as requests:
            self._start_loops(requests)
            await self._stop.wait()
            requests.cancel_scope.deadline = trio.current_time() + STOP_GRACE
        log.info("FUSE session ended: %s", self.summary())

    def summary(self) -> str:
        return (
            f"{self.requests} requests, {self.eager} answered in the loop, "
            f"{self.waited} waited in a task"
        )

    def _start_loops(self, requests: trio.Nursery) -> None:
        requests.start_soon(self._read_loop, requests)

    async def wait_for_work(self, fd: int, timeout: float = math.inf) -> bool:
        """Wait until `fd` is readable (True), the session stops or `timeout` passes."""
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            self._idle.add(scope)
            try:
                if not self.stopping:
                    await trio.lowlevel.wait_readable(fd)
                    return True
            finally:
                self._idle.discard(scope)
        return False

    async def _read_loop(self, requests: trio.Nursery) -> None:
        view = memoryview(self.buffer)
        while not self.stopping:
            await self.wait_for_work(self.fd)
            for _ in range(BATCH):
                if self.stopping:
                    return
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
                    self.stop()
                    return
                if n == 0:  # end of file: the connection is gone
                    self.stop()
                    return
                waiting = self._dispatch(view, n)
                if waiting is not None:
                    requests.start_soon(self._read_loop, requests)  # a new reader reads on
                    await self.see_through(waiting)
                    return
            else:
                await trio.lowlevel.checkpoint()  # a full batch: let the others run first

    def _dispatch(self, view: memoryview, n: int) -> Waiting | None:
        """Serve one request read from /dev/fuse; a Waiting if it must wait."""
        self.requests += 1
        try:
            opcode, unique, nodeid, pid, body = p.parse_header(view, n)
        except p.RequestError as e:
            log.error("malformed FUSE request ignored: %s", e)
            return None
        return self.handle(opcode, unique, nodeid, pid, p.Args(view, body, n))

    def handle(
        self, opcode: int, unique: int, nodeid: int, pid: int, args: p.Args
    ) -> Waiting | None:
        """Answer a request now if it needs no waiting; else a Waiting for `see_through`.

        Everything the handler needs from the request's buffer is taken before it
        returns (the buffer is reused by the next read), waiting or not.  `pid`: the
        calling thread, for the O_TRUNC bookkeeping (see `_setattr`).
        """
        self._pid = pid
        self._after_open = False
        if self._openers and opcode not in BETWEEN_OPEN_AND_TRUNCATE:
            self._after_open = self._openers.pop(pid, None) == nodeid
        handler = self._sync.get(opcode)
        if handler is not None:
            try:
                payload = handler(args, nodeid)
            except Exception as e:
                self._reply_error(unique, log_failure(e, self._what(opcode, nodeid)))
                return None
            self._reply(unique, payload)
            return None
        waiting = self._async.get(opcode)
        if waiting is not None:
            try:
                call = waiting(args, nodeid)
                trap = call.send(None)  # the first step, in this loop's task
            except StopIteration as done:
                self.eager += 1
                self._reply(unique, done.value)
                return None
            except Exception as e:
                self._reply_error(unique, log_failure(e, self._what(opcode, nodeid)))
                return None
            self.waited += 1
            return Waiting(unique, call, trap, opcode, nodeid)
        if opcode in (p.Op.FORGET, p.Op.BATCH_FORGET, p.Op.INTERRUPT):
            return None  # no reply: inode numbers live as long as the mount; see the module doc
        self._reply_error(unique, errno.ENOSYS)
        return None

    async def see_through(self, w: Waiting) -> None:
        """Finish a request that waits, in the task that started it, and answer it."""
        try:
            payload = await resume(w.call, w.trap)
        except Exception as e:
            self._reply_error(w.unique, log_failure(e, self._what(w.opcode, w.nodeid)))
            return
        self._reply(w.unique, payload)

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

    def _setattr(self, a: p.Args, nodeid: int) -> Reply:
        """truncate, chmod, chown; and O_TRUNC, which the kernel sends as a SETATTR to
        size 0 by path (no file handle) from the thread that has just opened the file."""
        fields = a.struct(p.SETATTR_IN)
        valid, size = fields[0], fields[3]
        owner_or_mode = bool(valid & (p.FATTR_MODE | p.FATTR_UID | p.FATTR_GID))
        new_size = size if valid & p.FATTR_SIZE else None
        o_trunc = self._after_open and new_size == 0 and not valid & p.FATTR_FH

        async def run() -> bytes:
            a = await self.fs.setattr(nodeid, new_size, owner_or_mode, o_trunc=o_trunc)
            return self._attr_out(a)

        return run()

    # -- files ------------------------------------------------------------------------

    def _open(self, a: p.Args, nodeid: int) -> bytes:
        flags, _ = a.struct(p.OPEN_IN)
        opened = self.fs.open(nodeid, flags)
        open_flags = p.FOPEN_DIRECT_IO
        if opened.is_disk:
            open_flags |= p.FOPEN_PARALLEL_DIRECT_WRITES
            if flags & os.O_ACCMODE != os.O_RDONLY:
                if len(self._openers) >= MAX_OPENERS:
                    self._openers.clear()  # threads that opened and went quiet
                self._openers[self._pid] = nodeid
        return p.OPEN_OUT.pack(opened.fh, open_flags, 0)

    def _release(self, a: p.Args, nodeid: int) -> bytes:
        fh, *_ = a.struct(p.RELEASE_IN)
        self.fs.release(fh)
        return b""

    def _empty(self, a: p.Args, nodeid: int) -> bytes:
        return b""

    def _destroy(self, a: p.Args, nodeid: int) -> bytes:
        self.stop()
        return b""

    def _read(self, a: p.Args, nodeid: int) -> Reply:
        fh, offset, size, *_ = a.struct(p.READ_IN)
        return self.fs.read(fh, offset, size)

    def _write(self, a: p.Args, nodeid: int) -> Reply:
        fh, offset, size, *_ = a.struct(p.WRITE_IN)
        rest = a.after(p.WRITE_IN.size)
        if size > len(rest):
            raise p.RequestError(f"write of {size} bytes with {len(rest)} bytes of data")
        data = bytes(rest[:size])

        async def run() -> bytes:
            written = await self.fs.write(fh, offset, data)
            return p.WRITE_OUT.pack(written, 0)

        return run()

    def _fsync(self, a: p.Args, nodeid: int) -> Reply:
        fh, *_ = a.struct(p.FSYNC_IN)
        return _then_empty(self.fs.fsync(fh))

    def _flush(self, a: p.Args, nodeid: int) -> Reply:
        fh, *_ = a.struct(p.FLUSH_IN)
        return _then_empty(self.fs.flush(fh))

    def _fallocate(self, a: p.Args, nodeid: int) -> Reply:
        fh, offset, length, mode, _ = a.struct(p.FALLOCATE_IN)
        return _then_empty(self.fs.fallocate(fh, mode, offset, length))

    def _lseek(self, a: p.Args, nodeid: int) -> Reply:
        fh, offset, whence, _ = a.struct(p.LSEEK_IN)

        async def run() -> bytes:
            return p.LSEEK_OUT.pack(await self.fs.lseek(fh, offset, whence))

        return run()


async def _then_empty(call: Coroutine[Any, Any, Any]) -> bytes:
    await call
    return b""
