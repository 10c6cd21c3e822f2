"""io_uring for host reads, writes and fdatasync, spoken through ctypes.

Why by hand: the one Python binding on PyPI (`liburing` 2026.3) accepts only
`bytearray` buffers, which are not page-aligned, so it cannot serve O_DIRECT
files; the kernel interface is three system calls and two shared rings.

How: one ring per file.  A request fills one submission entry and calls
io_uring_enter (one system call, no thread); the kernel does the I/O (O_DIRECT
reads and writes asynchronously, buffered ones by its own means) and posts a
completion, which signals an eventfd; one trio system task waits on it and
reschedules every finished request at once.  No worker thread, no GIL
hand-off per request.

Ordering: the submission tail is published by the io_uring_enter that follows
it (a system call orders memory on every architecture); completions are read
after the eventfd read.  No SQPOLL.

Cancellation: as workers.py -- a cancelled read is abandoned (its buffer kept
until the kernel completes it), a cancelled write or flush waits for its
completion.

References: io_uring(7), io_uring_setup(2), io_uring_enter(2),
include/uapi/linux/io_uring.h.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable
from typing import Any

import outcome
import trio

from fusedisk.hostio.uring_core import (
    FSYNC_DATASYNC,
    OP_FSYNC,
    OP_READ,
    OP_WRITE,
    RawRing,
    available,
)

__all__ = ["Ring", "available", "share", "shared"]

#: the FUSE ring's host-I/O side while a mount serves over io_uring (see `share`)
_shared: Ring | None = None


def share(ring: Ring | None) -> None:
    """Let every file whose engine is io_uring put its host I/O in `ring` (the FUSE
    ring of the mount being served): its completions then arrive in the same loop
    pass as the requests, with no reaper task of their own.  None: back to their own."""
    global _shared
    _shared = ring


def shared(own: Ring) -> Ring:
    """The ring a file's operation goes to: the shared one while there is one."""
    return _shared if _shared is not None else own


def _address(buf: Any) -> tuple[int, Any]:
    """The address of a buffer's memory, and the object that keeps it alive and pinned."""
    if isinstance(buf, bytes):
        keep = ctypes.c_char_p(buf)
        return ctypes.cast(keep, ctypes.c_void_p).value or 0, (buf, keep)
    view = memoryview(buf)
    if view.readonly:  # read-only memoryview of something: copy once
        copy = bytearray(view)
        return _address(copy)
    array = (ctypes.c_char * view.nbytes).from_buffer(view)
    return ctypes.addressof(array), (view, array)


#: buffers of requests still in the kernel when their ring closed (see Ring.close)
_IN_FLIGHT_AT_CLOSE: list[dict[int, Any]] = []


class _Request:
    __slots__ = ("abandon", "keep", "result", "task")

    def __init__(self, task: Any, keep: Any, abandon: bool) -> None:
        self.task = task
        self.keep = keep
        self.abandon = abandon
        self.result: int | None = None


class Ring:
    """One io_uring instance and its completion reaper (a trio system task).

    Or, made by `Ring.within`, host I/O in another loop's ring (the FUSE ring): that
    loop reaps the completions and hands ours to `complete`, and `submit` is its
    way to send what we pushed (at the end of its pass, or at once).
    """

    def __init__(
        self, entries: int = 64, raw: RawRing | None = None,
        submit: Callable[[], Any] | None = None,
    ) -> None:  # fmt: skip
        self.shared = raw is not None
        self._shared_closed = False
        self.raw = raw if raw is not None else RawRing(entries)
        self._go: Callable[[], Any] = submit or self.raw.submit
        self.efd = -1
        if not self.shared:
            try:
                self.efd = self.raw.register_eventfd()
            except BaseException:
                self.raw.close()
                raise
        self._waiting: dict[int, _Request] = {}
        # never more in flight than the rings hold; a counter, not a trio.Semaphore,
        # whose acquire costs a pass of the scheduler per request even when free
        self._entries = entries if self.shared else self.raw.entries
        self._room = trio.lowlevel.ParkingLot()
        self._next = 0
        self._closed = trio.CancelScope()
        if not self.shared:
            trio.lowlevel.spawn_system_task(self._reap, name="io_uring reaper")
        self.submitted = 0
        self.wakeups = 0

    @classmethod
    def within(cls, raw: RawRing, submit: Callable[[], Any], limit: int) -> Ring:
        """Host I/O in `raw`, another loop's ring, at most `limit` operations at once."""
        return cls(limit, raw, submit)

    @property
    def busy(self) -> bool:
        """Operations are in flight (their completions still to come)."""
        return bool(self._waiting)

    @property
    def fd(self) -> int:
        return -1 if self._shared_closed else self.raw.fd

    async def _reap(self) -> None:
        with self._closed, contextlib.suppress(trio.ClosedResourceError):
            while self.fd >= 0:  # closed before this task first ran: nothing to wait for
                await trio.lowlevel.wait_readable(self.efd)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.efd)
                self._complete()

    def _complete(self) -> None:
        self.wakeups += 1
        for user_data, res in self.raw.reap():
            self.complete(user_data, res)

    def complete(self, user_data: int, res: int) -> None:
        """One of our operations finished (called by whoever reaps the ring)."""
        request = self._waiting.pop(user_data, None)
        if request is not None and request.task is not None:
            trio.lowlevel.reschedule(request.task, outcome.Value(res))
        if self._room:  # room freed, abandoned reads included: waiters look again
            self._room.unpark_all()

    async def _submit(
        self, opcode: int, fd: int, offset: int, buf: Any, length: int, flags: int, abandon: bool
    ) -> int:
        """One operation; its result (a byte count or 0), or OSError."""
        if self.fd < 0:
            raise OSError(errno.EBADF, "the io_uring is closed")
        addr, keep = _address(buf) if buf is not None else (0, None)
        while len(self._waiting) >= self._entries:
            await self._room.park()
            if self.fd < 0:
                raise OSError(errno.EBADF, "the io_uring is closed")
        return await self._run(opcode, fd, offset, addr, keep, length, flags, abandon)

    async def _run(
        self, opcode: int, fd: int, offset: int, addr: int, keep: Any, length: int, flags: int,
        abandon: bool,
    ) -> int:  # fmt: skip
        self._next += 1
        user_data = self._next
        self.raw.push(opcode, fd, offset, addr, length, flags, user_data)
        request = _Request(trio.lowlevel.current_task(), keep, abandon)
        self._waiting[user_data] = request
        try:
            self._go()
        except BaseException:
            del self._waiting[user_data]
            raise
        self.submitted += 1

        def abort(_: Any) -> trio.lowlevel.Abort:
            if request.abandon:
                request.task = None  # the kernel still owns `keep` until it completes
                return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        res: int = await trio.lowlevel.wait_task_rescheduled(abort)
        if res < 0:
            raise OSError(-res, os.strerror(-res))
        return res

    async def read_into(self, fd: int, buf: Any, offset: int) -> int:
        view = memoryview(buf)
        return await self._submit(OP_READ, fd, offset, view, view.nbytes, 0, True)

    async def write(self, fd: int, data: Any, offset: int) -> int:
        view = memoryview(data)
        return await self._submit(OP_WRITE, fd, offset, data, view.nbytes, 0, False)

    async def fdatasync(self, fd: int) -> None:
        await self._submit(OP_FSYNC, fd, 0, None, 0, FSYNC_DATASYNC, False)

    def close(self) -> None:
        """Stop reaping and release the ring.

        Reads abandoned by cancelled callers may still be in flight (on a hung
        device, for ever): the kernel finishes or cancels them after the ring is
        closed, so their buffers are kept alive for the life of the process.  In a
        shared ring (its owner closes it) the operations still waiting fail with
        ECANCELED: no completion will come for them.
        """
        if self.fd < 0:
            return
        waiting, self._waiting = self._waiting, {}
        if waiting:
            _IN_FLIGHT_AT_CLOSE.append(waiting)
        if self.shared:
            self._shared_closed = True
            self._room.unpark_all()  # those waiting for room find it closed
            for request in waiting.values():
                if request.task is not None:
                    error = OSError(errno.ECANCELED, "the io_uring it was in closed")
                    trio.lowlevel.reschedule(request.task, outcome.Error(error))
                    request.task = None
            return
        self._closed.cancel()
        trio.lowlevel.notify_closing(self.efd)
        self.raw.close()
