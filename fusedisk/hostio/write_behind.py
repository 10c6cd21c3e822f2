"""Buffered host writes answered at once and written, in order, by one thread.

Why: a buffered `pwrite` on ext4 can block (dirty-page throttling, a full
journal, a page to read in), and ext4 refuses RWF_NOWAIT for it, so a write
may not run on the event loop.  Waiting for a thread (or io_uring's kernel
worker) to finish it costs two cross-thread wake-ups per request, which on
these VMs doubled the CPU of a 4 KiB write and halved QD1 write IOPS
(docs/benchmarks.md).  But the page cache a buffered write lands in is a
volatile write cache already: data written there is lost on a host crash
until fdatasync.  So the write is *acknowledged when it is queued*, and the
copy into the page cache happens on the writer thread beside the loop -- the
disk has a volatile write cache, as a real one announces with WCE, and a
flush empties it.

What keeps that safe:

- **Order.**  One thread per file writes in the order requests were queued,
  so a later write to the same bytes always lands last.
- **Reads see writes.**  A read that overlaps a queued write waits for it.
- **Flush.**  `drain` waits for every queued write; fdatasync, fallocate,
  ftruncate and lseek walks run only after it (hostio.py).
- **Errors are not lost.**  A write that fails after it was acknowledged
  (EIO, ENOSPC) fails the file: that write and every later one are dropped,
  and every later write, flush and drain raises the error, naming the offset,
  until the file is reopened.  The guest learns of it at its next flush, as
  it would from a disk whose cache could not be written.
- **No stale reads.**  A read that overlaps a dropped write fails with that
  error too: it must see the acknowledged data or fail, never return the old
  bytes silently.  Reads of other ranges go on.
- **Bounded.**  At most `max_bytes` are queued per file; a write beyond that
  waits for the oldest (backpressure, as dirty-page throttling would give).
- **Write-through where a reply must mean more.**  A front whose clients take
  a write's reply to mean the data has left the daemon sets `WRITE_THROUGH`
  in the task that writes: the write then returns once it is in the file.
  The NBD export does (an NBD client may exit without a word, and the daemon
  be killed, before the daemon has even read the end of its stream); a FUSE
  close(2) waits for a flush instead.
- **Data not copied twice.**  `bytes` are kept as they are; a mutable buffer
  (luks reuses its output buffers) is copied first.

The writer thread starts at the first write (a backing file never written
costs none) with its own duplicate of the file descriptor, so a file closed
while writes are still queued (a hung device) cannot make the thread write
into whatever file next gets that descriptor number.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import errno
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio

Buffer = bytes | bytearray | memoryview

#: queued bytes per file before a write waits for the oldest one
DEFAULT_MAX_BYTES = 16 << 20
#: reads find the queued writes they may overlap through the 64 KiB chunks those
#: writes touch (a dict lookup per chunk, then an exact check of the few writes there),
#: not by scanning a queue that may hold thousands of writes
CHUNK_BITS = 16

#: writes done before the writer thread wakes the loop for those waiting on them,
#: unless the queue empties first (a wake-up per write cost ~30 % of NBD write IOPS)
WAKE_EVERY = 8

#: set to True in a task whose writes must be in the file (page cache) when they
#: return, not just queued: its caller's reply promises the data outlives the daemon
WRITE_THROUGH: contextvars.ContextVar[bool] = contextvars.ContextVar("write_through", default=False)


def _chunks(offset: int, length: int) -> range:
    return range(offset >> CHUNK_BITS, ((offset + max(length, 1) - 1) >> CHUNK_BITS) + 1)


class _Write:
    __slots__ = ("data", "offset", "seq")

    def __init__(self, seq: int, offset: int, data: Buffer) -> None:
        self.seq = seq
        self.offset = offset
        self.data = data


def _immutable(data: Buffer) -> Buffer:
    """`data` itself if nobody can change it before it is written, else a copy."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, memoryview) and data.readonly and isinstance(data.obj, bytes):
        return data
    return bytes(data)


class WriteBehind:
    """The write queue of one host file and the thread that empties it.

    Made inside a trio run; `write_all(fd, data, offset)` is the blocking
    write the thread calls.  See the module doc for the guarantees.
    """

    def __init__(
        self,
        fd: int,
        name: str,
        write_all: Callable[[int, Buffer, int], None],
        max_bytes: int = DEFAULT_MAX_BYTES,
        where: str = "",
    ) -> None:
        self.name = name
        self.where = where or name  # how errors name the file
        self.max_bytes = max_bytes
        self._write_all = write_all
        self._source_fd = fd
        self._fd = -1  # the writer's own duplicate, made with the thread at the first write
        self._token = trio.lowlevel.current_trio_token()
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # trio side: writes queued and not yet seen done, oldest first
        self._pending: collections.deque[_Write] = collections.deque()
        self._in_chunk: dict[int, list[_Write]] = {}  # chunk -> queued writes touching it
        self._bytes = 0
        self._seq = 0
        # shared with the thread, under _lock
        self._done = 0  # every write with seq <= _done has been written (or dropped)
        self._failure: OSError | None = None
        self._lost: list[tuple[int, int]] = []  # (offset, end) of writes dropped
        self._waiters: list[tuple[int, Any]] = []  # (seq, trio task)
        self._closed = False
        #: counters for `stats`
        self.queued = 0
        self.waits = 0

    # -- the trio side ---------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while writes may still be queued (cheap: no lock)."""
        return self._done < self._seq

    @property
    def failed(self) -> bool:
        """True once an acknowledged write has failed (see the module doc)."""
        return self._failure is not None

    def check(self) -> None:
        """Raise the file's failure, if any (for a write that bypasses the queue)."""
        self._raise_failure()

    async def write(self, offset: int, data: Buffer) -> None:
        """Queue a write; returns at once unless `max_bytes` are already queued
        (or the task asked for WRITE_THROUGH: then once it is written)."""
        self._raise_failure()
        if self._closed:
            raise OSError(errno.EBADF, f"{self.where}: the file is closed")
        if self._bytes + len(data) > self.max_bytes and self._pending:
            await self._wait_for(self._half_drained())
            self._raise_failure()
        if self._fd < 0:  # a file never written (a backing file) costs no thread
            self._fd = os.dup(self._source_fd)
            threading.Thread(target=self._run, name=f"{self.name}-writer", daemon=True).start()
        self._seq += 1
        w = _Write(self._seq, offset, _immutable(data))
        self._pending.append(w)
        in_chunk = self._in_chunk
        for chunk in _chunks(offset, len(w.data)):
            in_chunk.setdefault(chunk, []).append(w)
        self._bytes += len(w.data)
        self.queued += 1
        self._queue.put(w)
        if WRITE_THROUGH.get():
            await self._wait_for(w.seq)
            self._raise_failure()

    def _half_drained(self) -> int:
        """The write after which at most half of `max_bytes` is queued.

        A full queue admits new writes once it is half empty, not one per
        write done: the writer then runs on without a wake-up of the event
        loop per write (measured: one per write cost ~130 µs of CPU a write).
        """
        self._forget_done()
        queued = self._bytes
        target = self._done  # nothing queued (all written meanwhile): no wait
        for w in self._pending:
            if queued <= self.max_bytes // 2:
                break
            queued -= len(w.data)
            target = w.seq
        return target

    async def drain(self) -> None:
        """Wait until every queued write is in the file; raises the file's failure."""
        if self.busy:
            await self._wait_for(self._seq)
        self._raise_failure()

    async def before_read(self, offset: int, length: int) -> None:
        """Wait for the queued writes that overlap [offset, offset+length); raise the
        file's failure if one of them, or any earlier write there, was dropped."""
        self._forget_done()
        in_chunk = self._in_chunk
        end = offset + length
        last = 0
        for chunk in _chunks(offset, length):
            for w in in_chunk.get(chunk, ()):
                if w.seq > last and w.offset < end and offset < w.offset + len(w.data):
                    last = w.seq
        if last:
            await self._wait_for(last)
        if self._failure is not None:
            self._check_lost(offset, end)

    def _check_lost(self, offset: int, end: int) -> None:
        with self._lock:
            lost = next(((a, b) for a, b in self._lost if a < end and offset < b), None)
        if lost is not None:
            failure = self._failure
            assert failure is not None
            raise OSError(
                failure.errno,
                f"{self.where}: a read of {end - offset} bytes at offset {offset} "
                f"overlaps data that was acknowledged but never written ({failure.strerror})",
            )

    def close(self) -> None:
        """No more writes; the thread writes what is queued, then closes its descriptor."""
        if not self._closed:
            self._closed = True
            if self._fd >= 0:
                self._queue.put(None)

    def statistics(self) -> dict[str, int]:
        self._forget_done()
        return {"queued": self.queued, "waits": self.waits, "queued_bytes": self._bytes}

    def _raise_failure(self) -> None:
        failure = self._failure
        if failure is not None:
            raise OSError(failure.errno, failure.strerror)

    def _forget_done(self) -> None:
        done = self._done
        pending = self._pending
        in_chunk = self._in_chunk
        while pending and pending[0].seq <= done:
            w = pending.popleft()
            self._bytes -= len(w.data)
            for chunk in _chunks(w.offset, len(w.data)):
                writes = in_chunk[chunk]
                del writes[0]  # the oldest of its chunk: writes are done in order
                if not writes:
                    del in_chunk[chunk]

    async def _wait_for(self, seq: int) -> None:
        """Until the write numbered `seq` (and so every earlier one) is done."""
        task = trio.lowlevel.current_task()
        with self._lock:
            done = self._done >= seq
            if not done:
                entry = (seq, task)
                self._waiters.append(entry)
        if done:
            await trio.lowlevel.checkpoint()
        else:
            self.waits += 1

            def abort(_: Any) -> trio.lowlevel.Abort:
                with self._lock:
                    if entry in self._waiters:
                        self._waiters.remove(entry)
                        return trio.lowlevel.Abort.SUCCEEDED
                return trio.lowlevel.Abort.FAILED  # being woken: let it arrive

            await trio.lowlevel.wait_task_rescheduled(abort)
        self._forget_done()

    def _wake(self) -> None:
        """Runs in the trio thread: reschedule every waiter whose write is done."""
        with self._lock:
            ready = [task for seq, task in self._waiters if seq <= self._done]
            self._waiters = [(s, t) for s, t in self._waiters if s > self._done]
        for task in ready:
            trio.lowlevel.reschedule(task, outcome.Value(None))

    # -- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        owed = False  # writers are due a wake-up not yet sent
        woken_at = 0
        try:
            while True:
                w = self._queue.get()
                if w is None:
                    if owed:
                        with contextlib.suppress(trio.RunFinishedError):
                            self._token.run_sync_soon(self._wake)
                    return
                if self._failure is None:
                    try:
                        self._write_all(self._fd, w.data, w.offset)
                    except Exception as e:  # the thread must live on: writers wait on it
                        code = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
                        why = e.strerror if isinstance(e, OSError) and e.strerror else repr(e)
                        self._failure = OSError(
                            code,
                            f"{self.where}: a write of {len(w.data)} bytes at offset {w.offset}, "
                            f"already acknowledged, failed: {why}; the file takes no "
                            "more writes until it is reopened",
                        )
                with self._lock:
                    if self._failure is not None:
                        self._lost.append((w.offset, w.offset + len(w.data)))
                    self._done = w.seq
                    wake = any(seq <= w.seq for seq, _ in self._waiters)
                # one wake-up of the loop for a run of writes, not one per write: sent
                # when the queue is empty (the next get would block) or every WAKE_EVERY
                if wake and (self._queue.empty() or w.seq - woken_at >= WAKE_EVERY):
                    owed, woken_at = False, w.seq
                    try:
                        self._token.run_sync_soon(self._wake)
                    except trio.RunFinishedError:
                        return
                elif wake:
                    owed = True
        finally:
            os.close(self._fd)
