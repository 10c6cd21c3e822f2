"""Blocking calls off the event loop, without a thread hand-off per call.

`trio.to_thread.run_sync` costs ~260 µs a call on these machines
(../shared/platform.md), which caps a disk near 4k requests a second.  A
`WorkerPool` keeps a few threads blocked on one queue; a call is queued (a
C-level `SimpleQueue.put`, under a microsecond), a worker runs it, and
completions are batched: the first completion of a batch asks trio to run
`_deliver` once (`TrioToken.run_sync_soon`, one write to trio's wake-up
socket), which reschedules every task whose call finished by then.  Under
load one wake-up serves many requests; the loop never waits for a thread.

Threads are started on demand up to `max_workers` and leave after
`idle_seconds` without work, so an idle pool costs nothing.

Cancellation (what happens when a trio task is cancelled while its call is
in the pool):

- a call still queued is withdrawn: it never runs, and `run` raises
  `trio.Cancelled` at once;
- a call already running is never interrupted (a thread cannot be).  If the
  caller said `abandon_on_cancel=True` (reads: their result is simply
  dropped) `run` raises `Cancelled` at once and the worker discards the
  result when the call returns.  Otherwise (writes, flushes, fallocate: they
  change the file, and a later request must not be overtaken by them) the
  task keeps waiting until the call has returned, gets its result, and sees
  `Cancelled` at its next checkpoint.  A write on a hung device therefore
  delays its own task's cancellation, never anyone else's requests.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_QUEUED, _RUNNING, _DONE, _ABANDONED = range(4)


class PoolClosed(RuntimeError):
    """A call was made on a pool that was closed."""


class _Call:
    __slots__ = ("abandon", "args", "fn", "result", "state", "task")

    def __init__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], task: Any, abandon: bool
    ) -> None:
        self.fn = fn
        self.args = args
        self.task = task
        self.abandon = abandon
        self.state = _QUEUED
        self.result: outcome.Outcome[Any] | None = None


class WorkerPool:
    """A few worker threads fed by one queue; trio woken once per batch of completions.

    Make it inside a trio run (it keeps that run's token).  `run(fn, *args)`
    awaits `fn(*args)` on a worker.  See the module doc for cancellation.
    """

    def __init__(self, name: str, max_workers: int = 4, idle_seconds: float = 10.0) -> None:
        self.name = name
        self.max_workers = max_workers
        self.idle_seconds = idle_seconds
        self._token = trio.lowlevel.current_trio_token()
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: list[_Call] = []
        self._workers = 0
        self._idle = 0
        self._pending = 0
        self._closed = False
        #: counters for `stats`
        self.calls = 0
        self.wakeups = 0

    # -- the trio side ---------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
        """`fn(*args)` on a worker thread; its result or exception."""
        if self._closed:
            raise PoolClosed(f"{self.name}: the worker pool is closed")
        call = _Call(fn, args, trio.lowlevel.current_task(), abandon_on_cancel)
        self.calls += 1
        with self._lock:
            self._pending += 1
            spawn = self._pending > self._idle and self._workers < self.max_workers
            if spawn:
                self._workers += 1
        self._queue.put(call)
        if spawn:
            threading.Thread(target=self._work, name=f"{self.name}-worker", daemon=True).start()

        def abort(_: Any) -> trio.lowlevel.Abort:
            with self._lock:
                if call.state == _QUEUED or (call.abandon and call.state != _ABANDONED):
                    call.state = _ABANDONED
                    return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def _deliver(self) -> None:
        """Runs in the trio thread, once per batch: wake every finished caller."""
        with self._lock:
            done, self._done = self._done, []
        self.wakeups += 1
        for call in done:
            if call.state == _DONE:  # not abandoned meanwhile
                assert call.result is not None
                trio.lowlevel.reschedule(call.task, call.result)

    def close(self) -> None:
        """No more calls; workers leave once the queue is empty.

        Calls already queued still run.  Workers are daemon threads, so a call
        stuck on a hung device does not keep the process from exiting.
        """
        if self._closed:
            return
        self._closed = True
        with self._lock:
            workers = self._workers
        for _ in range(workers):
            self._queue.put(None)

    def statistics(self) -> dict[str, int]:
        return {
            "workers": self._workers,
            "calls": self.calls,
            "wakeups": self.wakeups,
            "queued": self._pending,
        }

    # -- the worker side ---------------------------------------------------------------

    def _work(self) -> None:
        q = self._queue
        while True:
            with self._lock:
                self._idle += 1
            try:
                call = q.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._pending == 0:  # nothing arrived meanwhile: leave
                        self._idle -= 1
                        self._workers -= 1
                        return
                    self._idle -= 1
                continue
            with self._lock:
                self._idle -= 1
                if call is None:
                    self._workers -= 1
                    return
                self._pending -= 1
                if call.state == _ABANDONED:
                    continue
                call.state = _RUNNING
            result = outcome.capture(call.fn, *call.args)
            with self._lock:
                if call.state == _ABANDONED:
                    continue
                call.state = _DONE
                call.result = result
                self._done.append(call)
                wake = len(self._done) == 1
            if wake:
                try:
                    self._token.run_sync_soon(self._deliver)
                except trio.RunFinishedError:
                    return
