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
import mmap
import os
import struct
from typing import Any

import outcome
import trio

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_SETUP, _SYS_ENTER, _SYS_REGISTER = 425, 426, 427
_REGISTER_EVENTFD = 4
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP = 1
_OP_FSYNC, _OP_READ, _OP_WRITE = 3, 22, 23
_FSYNC_DATASYNC = 1
_SQE = struct.Struct("<BBHiQQIIQ24x")  # opcode flags ioprio fd off addr len op_flags user_data
_CQE = struct.Struct("<QiI")  # user_data res flags
_U32 = struct.Struct("<I")


class _SqOffsets(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in (
        "head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array", "resv1"
    )] + [("user_addr", ctypes.c_uint64)]  # fmt: skip


class _CqOffsets(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in (
        "head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags", "resv1"
    )] + [("user_addr", ctypes.c_uint64)]  # fmt: skip


class _Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqOffsets),
        ("cq_off", _CqOffsets),
    ]


def _syscall(number: int, *args: Any) -> int:
    result = int(_libc.syscall(number, *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


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
    """One io_uring instance and its completion reaper (a trio system task)."""

    def __init__(self, entries: int = 64) -> None:
        params = _Params()
        self.fd = _syscall(_SYS_SETUP, entries, ctypes.byref(params))
        try:
            self._map(params)
            self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            efd = ctypes.c_int32(self.efd)
            _syscall(_SYS_REGISTER, self.fd, _REGISTER_EVENTFD, ctypes.byref(efd), 1)
        except BaseException:
            os.close(self.fd)
            raise
        self._waiting: dict[int, _Request] = {}
        # never more in flight than the rings hold; a counter, not a trio.Semaphore,
        # whose acquire costs a pass of the scheduler per request even when free
        self._entries = params.sq_entries
        self._room = trio.lowlevel.ParkingLot()
        self._next = 0
        self._closed = trio.CancelScope()
        trio.lowlevel.spawn_system_task(self._reap, name="io_uring reaper")
        self.submitted = 0
        self.wakeups = 0

    def _map(self, p: _Params) -> None:
        sq, cq = p.sq_off, p.cq_off
        sq_size = sq.array + p.sq_entries * 4
        cq_size = cq.cqes + p.cq_entries * _CQE.size
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if p.features & _FEAT_SINGLE_MMAP:
            self._sq = self._cq = mmap.mmap(
                self.fd, max(sq_size, cq_size), mmap.MAP_SHARED, prot, offset=_OFF_SQ_RING
            )
        else:
            self._sq = mmap.mmap(self.fd, sq_size, mmap.MAP_SHARED, prot, offset=_OFF_SQ_RING)
            self._cq = mmap.mmap(self.fd, cq_size, mmap.MAP_SHARED, prot, offset=_OFF_CQ_RING)
        self._sqes = mmap.mmap(
            self.fd, p.sq_entries * _SQE.size, mmap.MAP_SHARED, prot, offset=_OFF_SQES
        )
        self._sq_tail_at, self._sq_array_at = sq.tail, sq.array
        self._sq_mask = _U32.unpack_from(self._sq, sq.ring_mask)[0]
        self._cq_head_at, self._cq_tail_at, self._cqes_at = cq.head, cq.tail, cq.cqes
        self._cq_mask = _U32.unpack_from(self._cq, cq.ring_mask)[0]

    async def _reap(self) -> None:
        with self._closed, contextlib.suppress(trio.ClosedResourceError):
            while self.fd >= 0:  # closed before this task first ran: nothing to wait for
                await trio.lowlevel.wait_readable(self.efd)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.efd)
                self._complete()

    def _complete(self) -> None:
        self.wakeups += 1
        cq = self._cq
        head = _U32.unpack_from(cq, self._cq_head_at)[0]
        tail = _U32.unpack_from(cq, self._cq_tail_at)[0]
        while head != tail:
            user_data, res, _ = _CQE.unpack_from(cq, self._cqes_at + (head & self._cq_mask) * 16)
            head = (head + 1) & 0xFFFFFFFF
            request = self._waiting.pop(user_data, None)
            if request is not None and request.task is not None:
                trio.lowlevel.reschedule(request.task, outcome.Value(res))
        _U32.pack_into(cq, self._cq_head_at, head)
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
        return await self._run(opcode, fd, offset, addr, keep, length, flags, abandon)

    async def _run(
        self, opcode: int, fd: int, offset: int, addr: int, keep: Any, length: int, flags: int,
        abandon: bool,
    ) -> int:  # fmt: skip
        self._next += 1
        user_data = self._next
        tail = _U32.unpack_from(self._sq, self._sq_tail_at)[0]
        index = tail & self._sq_mask
        _SQE.pack_into(
            self._sqes, index * _SQE.size, opcode, 0, 0, fd, offset, addr, length, flags, user_data
        )
        _U32.pack_into(self._sq, self._sq_array_at + index * 4, index)
        _U32.pack_into(self._sq, self._sq_tail_at, (tail + 1) & 0xFFFFFFFF)
        request = _Request(trio.lowlevel.current_task(), keep, abandon)
        self._waiting[user_data] = request
        try:
            _syscall(_SYS_ENTER, self.fd, 1, 0, 0, None, 0)
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
        return await self._submit(_OP_READ, fd, offset, view, view.nbytes, 0, True)

    async def write(self, fd: int, data: Any, offset: int) -> int:
        view = memoryview(data)
        return await self._submit(_OP_WRITE, fd, offset, data, view.nbytes, 0, False)

    async def fdatasync(self, fd: int) -> None:
        await self._submit(_OP_FSYNC, fd, 0, None, 0, _FSYNC_DATASYNC, False)

    def close(self) -> None:
        """Stop reaping and release the ring.

        Reads abandoned by cancelled callers may still be in flight (on a hung
        device, for ever): the kernel finishes or cancels them after the ring is
        closed, so their buffers are kept alive for the life of the process.
        """
        if self.fd < 0:
            return
        if self._waiting:
            _IN_FLIGHT_AT_CLOSE.append(self._waiting)
        self._closed.cancel()
        trio.lowlevel.notify_closing(self.efd)
        os.close(self.efd)
        for m in {id(x): x for x in (self._sq, self._cq, self._sqes)}.values():
            m.close()
        os.close(self.fd)
        self.fd = -1


def available() -> str | None:
    """None if io_uring can be set up here, else why not (a sentence)."""
    try:
        params = _Params()
        fd = _syscall(_SYS_SETUP, 2, ctypes.byref(params))
    except OSError as e:
        return f"io_uring_setup fails: {e.strerror}"
    os.close(fd)
    return None
