"""One io_uring instance through ctypes: set up, fill entries, submit, reap; no policy.

Why by hand: the one Python binding on PyPI (`liburing` 2026.3) accepts only
`bytearray` buffers, which are not page-aligned, and cannot pass a command
(`IORING_OP_URING_CMD`, which FUSE over io_uring needs) at all; the kernel
interface is three system calls and two shared rings.

Two users: hostio/uring.py (host reads, writes and fdatasync of one file) and
fuse/kernel/ring.py (FUSE requests, which need 128-byte entries: SETUP_SQE128).

Ordering: `push` writes an entry and the shared submission tail; the kernel
reads them only in the io_uring_enter of `submit` (a system call orders memory
on every architecture).  `reap` reads completions up to the shared tail and
publishes the new head at once.  No SQPOLL.

References: io_uring(7), io_uring_setup(2), io_uring_enter(2),
include/uapi/linux/io_uring.h.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
SYS_SETUP, SYS_ENTER, SYS_REGISTER = 425, 426, 427
REGISTER_EVENTFD = 4
ENTER_GETEVENTS = 1
SETUP_SQE128 = 1 << 10
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP = 1

OP_FSYNC, OP_READ, OP_WRITE, OP_URING_CMD = 3, 22, 23, 46
FSYNC_DATASYNC = 1

# opcode flags ioprio fd off addr len op_flags user_data (40 bytes), then
# buf_index personality splice_fd_in (48), then addr3 + pad or the command (to 64 or 128)
_SQE64 = struct.Struct("<BBHiQQIIQHHi16x")
_SQE128 = struct.Struct("<BBHiQQIIQHHi80s")
_CQE = struct.Struct("<QiI")  # user_data res flags
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


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


def syscall(number: int, *args: Any) -> int:
    result = int(_libc.syscall(number, *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class RingFull(OSError):
    """Every submission entry is filled and not yet submitted."""


class RawRing:
    """An io_uring: `push` entries, `submit` them in one system call, `reap` completions."""

    def __init__(self, entries: int, flags: int = 0) -> None:
        params = _Params()
        params.flags = flags
        self.fd = syscall(SYS_SETUP, entries, ctypes.byref(params))
        try:
            self._map(params)
        except BaseException:
            os.close(self.fd)
            raise
        self.entries = params.sq_entries
        self._sqe = _SQE128 if flags & SETUP_SQE128 else _SQE64
        self._tail = 0  # our copy of the submission tail
        self._unsubmitted = 0
        self.efd = -1
        self.enters = 0

    def _map(self, p: _Params) -> None:
        sq, cq = p.sq_off, p.cq_off
        sq_size = sq.array + p.sq_entries * 4
        cq_size = cq.cqes + p.cq_entries * _CQE.size
        sqe_size = 128 if p.flags & SETUP_SQE128 else 64
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if p.features & _FEAT_SINGLE_MMAP:
            self._sq = self._cq = mmap.mmap(
                self.fd, max(sq_size, cq_size), mmap.MAP_SHARED, prot, offset=_OFF_SQ_RING
            )
        else:
            self._sq = mmap.mmap(self.fd, sq_size, mmap.MAP_SHARED, prot, offset=_OFF_SQ_RING)
            self._cq = mmap.mmap(self.fd, cq_size, mmap.MAP_SHARED, prot, offset=_OFF_CQ_RING)
        self._sqes = mmap.mmap(
            self.fd, p.sq_entries * sqe_size, mmap.MAP_SHARED, prot, offset=_OFF_SQES
        )
        self._sq_head_at, self._sq_tail_at, self._sq_array_at = sq.head, sq.tail, sq.array
        self._sq_mask = _U32.unpack_from(self._sq, sq.ring_mask)[0]
        self._cq_head_at, self._cq_tail_at, self._cqes_at = cq.head, cq.tail, cq.cqes
        self._cq_mask = _U32.unpack_from(self._cq, cq.ring_mask)[0]
        self._tail = _U32.unpack_from(self._sq, sq.tail)[0]
        self._head = _U32.unpack_from(self._sq, sq.head)[0]  # the kernel's, when last read

    def register_eventfd(self) -> int:
        """An eventfd the kernel signals at each completion (what a loop waits on)."""
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        efd = ctypes.c_int32(self.efd)
        syscall(SYS_REGISTER, self.fd, REGISTER_EVENTFD, ctypes.byref(efd), 1)
        return self.efd

    @property
    def pending(self) -> int:
        """Entries pushed and not yet submitted."""
        return self._unsubmitted

    def push(
        self, opcode: int, fd: int, offset: int, addr: int, length: int, op_flags: int,
        user_data: int, cmd: bytes = b"",
    ) -> None:  # fmt: skip
        """Fill the next submission entry (`cmd`: a URING_CMD's 80 bytes, SQE128 only)."""
        tail = self._tail
        if (tail - self._head) & 0xFFFFFFFF >= self.entries:  # full when we last looked
            self._head = _U32.unpack_from(self._sq, self._sq_head_at)[0]
            if (tail - self._head) & 0xFFFFFFFF >= self.entries:
                raise RingFull(f"io_uring submission queue full ({self.entries} entries)")
        index = tail & self._sq_mask
        fields = (opcode, 0, 0, fd, offset, addr, length, op_flags, user_data, 0, 0, 0)
        if self._sqe is _SQE128:
            self._sqe.pack_into(self._sqes, index * 128, *fields, cmd)
        else:
            self._sqe.pack_into(self._sqes, index * 64, *fields)
        _U32.pack_into(self._sq, self._sq_array_at + index * 4, index)
        self._tail = (tail + 1) & 0xFFFFFFFF
        _U32.pack_into(self._sq, self._sq_tail_at, self._tail)
        self._unsubmitted += 1

    def encode(
        self, opcode: int, fd: int, offset: int, addr: int, length: int, op_flags: int,
        user_data: int, cmd: bytes = b"",
    ) -> bytes:  # fmt: skip
        """A submission entry as bytes, for `push_encoded` (entries sent again and again)."""
        fields = (opcode, 0, 0, fd, offset, addr, length, op_flags, user_data, 0, 0, 0)
        return self._sqe.pack(*fields, cmd) if self._sqe is _SQE128 else self._sqe.pack(*fields)

    def push_encoded(self, sqe: bytes, patch_at: int = 0, value: int = 0) -> None:
        """Queue an entry made by `encode`, with the 8 bytes at `patch_at` set to `value`
        (a command's commit id): a copy and one field instead of thirteen."""
        tail = self._tail
        if (tail - self._head) & 0xFFFFFFFF >= self.entries:
            self._head = _U32.unpack_from(self._sq, self._sq_head_at)[0]
            if (tail - self._head) & 0xFFFFFFFF >= self.entries:
                raise RingFull(f"io_uring submission queue full ({self.entries} entries)")
        index = tail & self._sq_mask
        at = index * len(sqe)
        self._sqes[at : at + len(sqe)] = sqe
        if patch_at:
            _U64.pack_into(self._sqes, at + patch_at, value)
        _U32.pack_into(self._sq, self._sq_array_at + index * 4, index)
        self._tail = (tail + 1) & 0xFFFFFFFF
        _U32.pack_into(self._sq, self._sq_tail_at, self._tail)
        self._unsubmitted += 1

    def submit(self, wait: int = 0, getevents: bool = False) -> int:
        """Hand every pushed entry to the kernel in one io_uring_enter; with `wait`,
        block until that many completions are there; `getevents` also moves
        completions the kernel held back (a full completion queue) into the queue.
        Returns the count submitted."""
        n = self._unsubmitted
        if n == 0 and wait == 0 and not getevents:
            return 0
        self.enters += 1
        flags = ENTER_GETEVENTS if wait or getevents else 0
        done = syscall(SYS_ENTER, self.fd, n, wait, flags, None, 0)
        self._unsubmitted -= done
        return done

    def ready(self) -> bool:
        """Completions are waiting to be reaped."""
        cq = self._cq
        head = _U32.unpack_from(cq, self._cq_head_at)[0]
        return bool(head != _U32.unpack_from(cq, self._cq_tail_at)[0])

    def reap(self) -> list[tuple[int, int]]:
        """Every completion posted so far, as (user_data, result), oldest first."""
        cq = self._cq
        head = _U32.unpack_from(cq, self._cq_head_at)[0]
        tail = _U32.unpack_from(cq, self._cq_tail_at)[0]
        out = []
        while head != tail:
            user_data, res, _ = _CQE.unpack_from(cq, self._cqes_at + (head & self._cq_mask) * 16)
            out.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        _U32.pack_into(cq, self._cq_head_at, head)
        return out

    def close(self) -> None:
        """Release the ring; the kernel cancels what is still in flight in it."""
        if self.fd < 0:
            return
        if self.efd >= 0:
            os.close(self.efd)
            self.efd = -1
        for m in {id(x): x for x in (self._sq, self._cq, self._sqes)}.values():
            m.close()
        os.close(self.fd)
        self.fd = -1


def available() -> str | None:
    """None if io_uring can be set up here, else why not (a sentence)."""
    try:
        params = _Params()
        fd = syscall(SYS_SETUP, 2, ctypes.byref(params))
    except OSError as e:
        return f"io_uring_setup fails: {e.strerror}"
    os.close(fd)
    return None
