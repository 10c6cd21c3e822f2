"""FUSE over io_uring: the kernel writes requests into buffers we registered, and one
io_uring_enter commits replies and fetches the next requests.

Why: on /dev/fuse each request costs a read, a write and a trip through epoll
(platform.md, "Per-request cost").  Over the ring, a loop pass reaps every
request the kernel delivered, answers those that need no waiting at once (see
session.py: eager start) and commits all the replies in one system call.

How (the kernel's Documentation/filesystems/fuse/fuse-io-uring.rst):

- INIT still goes over /dev/fuse; its reply sets FUSE_OVER_IO_URING (flags2
  bit 9) when the kernel offered it.  Then every entry is registered
  (FUSE_IO_URING_CMD_REGISTER): an IORING_OP_URING_CMD on the /dev/fuse
  descriptor with 128-byte submission entries (SETUP_SQE128), whose command
  area names the queue, and whose two iovecs give the entry's header buffer
  (fuse_uring_req_header: the in/out header, the per-opcode struct, the
  entry's commit id and payload size) and its payload buffer (max_write).
  The kernel serves requests only when every possible CPU has a queue, and
  routes each to the queue of the CPU its caller ran on: one loop here
  serves all queues.
- A request arrives as the completion of its entry's command.  The reply goes
  into the same buffers and FUSE_IO_URING_CMD_COMMIT_AND_FETCH (the commit id:
  the request's unique) hands it back and re-arms the entry.
- /dev/fuse stays served beside the ring: the kernel sends FORGET and
  INTERRUPT there, and everything if registration fails (it then turns the
  ring off for the connection).
- Teardown: at unmount the kernel completes every armed entry with ENOTCONN
  (the loop then stops) and ends requests still in our hands; closing the ring
  cancels what is left.  Buffers the kernel may still write are kept for the
  life of the process.

The ring's own descriptor (readable while completions wait) is the loop's
only wake-up: no eventfd to signal and read per wake-up.  trio runs the
requests that wait, as on /dev/fuse.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import struct
from typing import Any

import trio

from fusedisk.fuse.filesystem import MountFilesystem
from fusedisk.fuse.kernel import protocol as p
from fusedisk.fuse.kernel.eager import Waiting
from fusedisk.fuse.kernel.ring_support import (  # noqa: F401 (ring.unavailable etc.)
    HOW_TO,
    PARAMETER,
    possible_cpus,
    turn_on,
    unavailable,
)
from fusedisk.fuse.kernel.session import MAX_WRITE, KernelSession
from fusedisk.hostio import uring
from fusedisk.hostio.uring_core import OP_URING_CMD, SETUP_SQE128, RawRing

log = logging.getLogger("fusedisk")

#: INIT flags2 bit (FUSE_OVER_IO_URING, bit 41 of the 64-bit flags)
OVER_IO_URING = 1 << 9
CMD_REGISTER, CMD_COMMIT_AND_FETCH = 1, 2
#: entries per queue (per possible CPU): requests in flight per CPU before the kernel queues
DEPTH = 16
#: fuse_uring_req_header: in_out[128], op_in[128], fuse_uring_ent_in_out (32 bytes)
HEADER_SIZE = 288
HEADER_STRIDE = 512
OP_IN_AT, ENT_AT = 128, 256
ENT_IN_OUT = struct.Struct("<QQIIQ")  # flags commit_id payload_sz padding reserved
CMD_REQ = struct.Struct("<QQH70x")  # flags commit_id qid, in the SQE's 80-byte command area
#: where the commit id lies in a 128-byte submission entry (the command area starts at 48)
COMMIT_ID_AT = 48 + 8
#: the payload buffer: the kernel wants max(8 KiB, max_write, max_pages pages)
PAYLOAD = MAX_WRITE
#: user_data of a FUSE entry's command (others are free for host I/O in the same ring)
ENTRY_TAG = 1 << 62
#: loop passes served back to back before the loop lets other trio tasks run
PASSES_PER_TURN = 16
#: host operations (cold reads, O_DIRECT writes, fdatasync) in the ring at once
HOST_OPS = 64
#: how often an idle loop looks at the ring without a wake-up (a lost one costs no
#: more): every 5 ms within a second of the last request, else four times a second.
#: Lost wake-ups were seen under load (3 in 32 fio runs; docs/design-notes.md)
BUSY_SWEEP = 0.005
SWEEP = 0.25
#: completions that mean the connection is gone
GONE = (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED, errno.ENODEV)

#: buffers of rings closed while the kernel could still write into them
_RETIRED: list[Any] = []


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _address(buf: Any) -> tuple[int, Any]:
    anchor = ctypes.c_char.from_buffer(buf)
    return ctypes.addressof(anchor), anchor


class RingSession(KernelSession):
    """A FUSE connection served over io_uring (after INIT) and /dev/fuse (the rest)."""

    def __init__(self, fs: MountFilesystem, fd: int, depth: int = DEPTH) -> None:
        super().__init__(fs, fd)
        self.queues = possible_cpus()
        self.entries = self.queues * depth
        self.depth = depth
        self.ring: RawRing | None = None
        self._owner: dict[int, int] = {}  # unique of a request in our hands -> its entry
        self.host: uring.Ring | None = None  # host I/O in this ring (hostio/uring.py)
        self._backlog: collections.deque[tuple[int, int]] = collections.deque()
        self._in_pass = False
        self._deferred = False  # replies of tasks woken by the last pass: sent together
        self._woke_tasks = False
        self._busy_until = 0.0  # a short sweep until then (see BUSY_SWEEP)
        self.commits = 0
        self.passes = 0
        self.lost_wakeups = 0  # work the sweep found that no wake-up had announced
        self._enters = 0

    # -- set-up -----------------------------------------------------------------------

    def prepare(self) -> None:
        """The ring and its buffers, before INIT is answered (raises OSError): once the
        reply agrees on the ring, the kernel holds every request until it is armed."""
        # room for every entry's commit and every host operation, twice over
        entries = 1 << max(6, ((self.entries + HOST_OPS) * 2 - 1).bit_length())
        self.ring = ring = RawRing(entries, SETUP_SQE128)
        self.headers = mmap.mmap(-1, self.entries * HEADER_STRIDE)
        self.payloads = mmap.mmap(-1, self.entries * PAYLOAD)  # untouched pages cost nothing
        self.hview = memoryview(self.headers)
        self.pview = memoryview(self.payloads)
        head_at, self._anchors = _address(self.headers)
        body_at, anchor = _address(self.payloads)
        self._anchors = (self._anchors, anchor)
        self._iovecs = (_Iovec * (2 * self.entries))()
        for i in range(self.entries):
            self._iovecs[2 * i] = _Iovec(head_at + i * HEADER_STRIDE, HEADER_SIZE)
            self._iovecs[2 * i + 1] = _Iovec(body_at + i * PAYLOAD, PAYLOAD)
        # each entry's COMMIT_AND_FETCH, all but the commit id (patched in per reply)
        self._commit_sqe = [
            ring.encode(
                OP_URING_CMD,
                self.fd,
                CMD_COMMIT_AND_FETCH,
                0,
                0,
                0,
                ENTRY_TAG | i,
                CMD_REQ.pack(0, 0, i // self.depth),
            )
            for i in range(self.entries)
        ]

    def register(self) -> str | None:
        """Arm every entry; None, or why the kernel refused (it then uses /dev/fuse)."""
        ring = self.ring
        assert ring is not None
        base = ctypes.addressof(self._iovecs)
        size = ctypes.sizeof(_Iovec)
        for i in range(self.entries):
            cmd = CMD_REQ.pack(0, 0, i // self.depth)
            addr = base + 2 * i * size
            ring.push(OP_URING_CMD, self.fd, CMD_REGISTER, addr, 2, 0, ENTRY_TAG | i, cmd)
        try:
            ring.submit()
        except OSError as e:
            return f"io_uring_enter: {e.strerror}"
        for user_data, res in ring.reap():  # an armed entry completes only with a request
            if res < 0:
                self.close_ring()
                return f"registering entry {user_data & ~ENTRY_TAG}: {os.strerror(-res)}"
            self._backlog.append((user_data, res))
        self.host = uring.Ring.within(ring, self._submit_unless_in_pass, HOST_OPS)
        uring.share(self.host)
        return None

    def close_ring(self) -> None:
        """Release the ring; the kernel cancels the entries still armed."""
        ring, self.ring = self.ring, None
        if ring is None:
            return
        if self.host is not None:
            uring.share(None)
            self.host.close()
        trio.lowlevel.notify_closing(ring.fd)
        self._enters = ring.enters
        ring.close()
        _RETIRED.append((self.headers, self.payloads, self.hview, self.pview, self._anchors))
        self._owner.clear()

    # -- the loop ---------------------------------------------------------------------

    def _start_loops(self, requests: trio.Nursery) -> None:
        super()._start_loops(requests)  # FORGET, INTERRUPT, and all if the ring is refused
        if self.ring is not None:
            requests.start_soon(self._ring_loop, requests)

    async def _ring_loop(self, requests: trio.Nursery) -> None:
        """Passes back to back while requests keep coming (a trio checkpoint every
        PASSES_PER_TURN of them, for the tasks that wait), then wait for the ring."""
        ring = self.ring
        passes = 0
        while ring is not None and not self.stopping:
            if not self._backlog:
                self._backlog.extend(ring.reap())
            if not self._backlog and passes:
                self._kick()  # a request on its way lands now: no trip through epoll
                self._backlog.extend(ring.reap())
            if not self._backlog:
                now = trio.current_time()
                if passes:
                    self._busy_until = now + 1.0
                passes = 0
                timeout = BUSY_SWEEP if now < self._busy_until else SWEEP
                woken = await self.wait_for_work(ring.fd, timeout)  # readable: completions
                if self.stopping:
                    break
                if not woken:
                    self._sweep()
                continue
            if passes >= PASSES_PER_TURN:
                passes = 0
                await trio.lowlevel.checkpoint()  # let the tasks that wait have a turn
                continue
            passes += 1
            waiting = self._pass()
            if waiting is not None:
                requests.start_soon(self._ring_loop, requests)  # a new loop serves on
                await self.see_through(waiting)
                return
            if self._woke_tasks:
                await self._gather_replies()
        await self._finish_host_io()

    def stop(self) -> None:
        """As KernelSession.stop; host I/O started from now on goes to the files' own
        rings, since this loop will not be there to reap it."""
        uring.share(None)
        super().stop()

    async def _finish_host_io(self) -> None:
        """After stop(): reap the host I/O still in this ring (requests finishing in
        their grace period wait for it); requests arriving now are left to the
        kernel, which ends them when the connection closes."""
        ring, host = self.ring, self.host
        while ring is not None and host is not None and host.busy:
            with trio.move_on_after(BUSY_SWEEP):
                await trio.lowlevel.wait_readable(ring.fd)
            with contextlib.suppress(OSError):
                ring.submit(getevents=True)
            for user_data, res in ring.reap():
                if not user_data & ENTRY_TAG:
                    host.complete(user_data, res)
        if host is not None:
            host.close()  # nobody reaps this ring any more: later operations fail at once

    async def _gather_replies(self) -> None:
        """The pass handed host completions to waiting requests: let them run now and
        send all their replies in one io_uring_enter, not one each."""
        self._woke_tasks = False
        self._deferred = True
        try:
            await trio.lowlevel.checkpoint()
        finally:
            self._deferred = False
        self._submit()

    def _kick(self) -> None:
        """Enter the kernel once: the task work that delivers a request into an entry
        runs in this thread, so a request the kernel is handing over shows up in
        the completion queue when this returns (measured: 89% of the time at QD1 on
        /dev/fuse the next request was already there after a reply)."""
        ring = self.ring
        if ring is not None:
            with contextlib.suppress(OSError):
                ring.submit(getevents=True)

    def _pass(self) -> Waiting | None:
        """Serve the completions reaped; commit every reply in one io_uring_enter.
        Stops at the first request that waits, for its task to see it through."""
        self.passes += 1
        self._in_pass = True
        waiting = None
        try:
            while self._backlog and waiting is None:
                user_data, res = self._backlog.popleft()
                waiting = self._completed(user_data, res)
        finally:
            self._in_pass = False
            self._submit()
        return waiting

    def _completed(self, user_data: int, res: int) -> Waiting | None:
        entry = user_data & ~ENTRY_TAG
        if not user_data & ENTRY_TAG and self.host is not None:
            self.host.complete(user_data, res)  # a host read or write: its task goes on
            self._woke_tasks = True
            return None
        if not user_data & ENTRY_TAG or entry >= self.entries:
            log.error("FUSE over io_uring: a completion nobody asked for (%#x)", user_data)
            return None
        if res < 0:
            if -res in GONE:
                self.stop()  # unmounted: the kernel hands the entries back
            else:
                log.error("FUSE over io_uring: entry %d: %s", entry, os.strerror(-res))
            return None
        return self._request(entry)

    def _request(self, entry: int) -> Waiting | None:
        """Serve the request the kernel wrote into `entry`'s buffers."""
        self.requests += 1
        h = entry * HEADER_STRIDE
        hview = self.hview
        _, commit_id, size, _, _ = ENT_IN_OUT.unpack_from(hview, h + ENT_AT)
        _, opcode, unique, nodeid, _uid, _gid, pid, *_ = p.IN_HEADER.unpack_from(hview, h)
        self._owner[commit_id] = entry
        if size > PAYLOAD or unique != commit_id:
            log.error("malformed FUSE request over io_uring (payload %d, id %d)", size, unique)
            self._reply_error(commit_id, errno.EIO)
            return None
        start = entry * PAYLOAD
        args = p.Args(hview, h + OP_IN_AT, h + ENT_AT, self.pview[start : start + size])
        waiting = self.handle(opcode, unique, nodeid, pid, args)
        if waiting is None and commit_id in self._owner:  # no reply (FORGET): re-arm anyway
            self._reply_error(commit_id, errno.ENOSYS)
        return waiting

    # -- replies ----------------------------------------------------------------------

    def _reply(self, unique: int, payload: bytes) -> None:
        entry = self._owner.pop(unique, None)
        if entry is None:
            super()._reply(unique, payload)  # a request read from /dev/fuse
        else:
            self._commit(entry, unique, 0, payload)

    def _reply_error(self, unique: int, code: int) -> None:
        entry = self._owner.pop(unique, None)
        if entry is None:
            super()._reply_error(unique, code)
        else:
            self._commit(entry, unique, -code, b"")

    def _commit(self, entry: int, unique: int, error: int, payload: bytes) -> None:
        """Put the reply in the entry's buffers and queue its COMMIT_AND_FETCH."""
        ring = self.ring
        if ring is None:
            return  # the connection is being torn down: the kernel ends the request
        n = len(payload)
        if n > PAYLOAD:
            log.error("FUSE reply of %d bytes does not fit the ring's buffer", n)
            error, n = -errno.EIO, 0
        h = entry * HEADER_STRIDE
        p.OUT_HEADER.pack_into(self.hview, h, p.OUT_HEADER.size + n, error, unique)
        if n:
            start = entry * PAYLOAD
            self.pview[start : start + n] = payload
        ENT_IN_OUT.pack_into(self.hview, h + ENT_AT, 0, unique, n, 0, 0)
        ring.push_encoded(self._commit_sqe[entry], COMMIT_ID_AT, unique)
        self.commits += 1
        if not (self._in_pass or self._deferred):
            self._submit()  # a request that waited: its reply goes now

    def _submit(self) -> None:
        """Hand every queued commit to the kernel (it may take fewer than asked at once)."""
        ring = self.ring
        while ring is not None and ring.pending:
            try:
                if ring.submit() == 0:
                    return  # nothing taken: the next pass or sweep tries again
            except OSError as e:
                log.error("FUSE over io_uring: io_uring_enter: %s", e.strerror)
                return

    def _submit_unless_in_pass(self) -> None:
        """Host I/O pushed by a request's first step goes with the pass's replies."""
        if not (self._in_pass or self._deferred):
            self._submit()

    def _sweep(self) -> None:
        """A quiet SWEEP: submit what is still queued and let the kernel post any
        completion it held back, so no lost wake-up can strand a request."""
        ring = self.ring
        if ring is None:
            return
        queued = ring.pending
        with contextlib.suppress(OSError):
            ring.submit(getevents=True)
        if queued or ring.ready():
            self.lost_wakeups += 1
            log.debug(
                "FUSE over io_uring: the idle sweep found %d queued replies%s (no wake-up)",
                queued, " and completions" if ring.ready() else "",
            )  # fmt: skip

    def summary(self) -> str:
        enters = self.ring.enters if self.ring is not None else self._enters
        host = self.host.submitted if self.host is not None else 0
        return (
            f"{super().summary()}; over io_uring: {self.commits} replies and {host} host "
            f"operations in {self.passes} passes, {enters} io_uring_enter calls, "
            f"{self.lost_wakeups} found by the sweep"
        )
