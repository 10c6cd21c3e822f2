"""The batched worker pool: results, errors, batching, and what cancellation does."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from fusedisk.hostio.workers import PoolClosed, WorkerPool

pytestmark = pytest.mark.timeout(30)


async def test_results_and_exceptions_come_back():
    pool = WorkerPool("t")
    assert await pool.run(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await pool.run(lambda: 1 // 0)
    pool.close()
    with pytest.raises(PoolClosed):
        await pool.run(sum, [])


async def test_many_concurrent_calls_share_wakeups_and_threads():
    pool = WorkerPool("t", max_workers=4)
    results: list[int] = []

    async def one(i: int) -> None:
        results.append(await pool.run(lambda: (time.sleep(0.001), i)[1]))

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    assert sorted(results) == list(range(200))
    stats = pool.statistics()
    assert stats["calls"] == 200
    assert stats["wakeups"] < 200  # completions were batched
    assert 1 <= stats["workers"] <= 4
    pool.close()


async def test_a_blocked_call_does_not_block_the_loop():
    pool = WorkerPool("t", max_workers=2)
    release = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run, release.wait)
        await trio.sleep(0.05)
        # the loop still runs other work, and the pool serves other calls
        assert await pool.run(lambda: 7) == 7
        release.set()
    pool.close()


async def test_cancelling_a_queued_call_withdraws_it():
    pool = WorkerPool("t", max_workers=1)
    release = threading.Event()
    ran: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run, release.wait)
        await trio.sleep(0.05)
        with trio.move_on_after(0.05) as scope:
            await pool.run(ran.append, "queued")
        assert scope.cancelled_caught
        release.set()
    assert await pool.run(lambda: 1) == 1  # the worker skipped the withdrawn call
    assert ran == []
    pool.close()


async def test_cancelling_a_running_read_returns_at_once():
    pool = WorkerPool("t", max_workers=1)
    release = threading.Event()
    start = time.monotonic()
    with trio.move_on_after(0.1):
        await pool.run(release.wait, abandon_on_cancel=True)
    assert time.monotonic() - start < 5
    release.set()
    assert await pool.run(lambda: 2) == 2
    pool.close()


async def test_cancelling_a_running_write_waits_for_it_to_finish():
    pool = WorkerPool("t", max_workers=1)
    done = threading.Event()

    def slow_write() -> str:
        time.sleep(0.3)
        done.set()
        return "written"

    with trio.move_on_after(0.05) as scope:
        # the write is never abandoned half-way: run() returns its result...
        assert await pool.run(slow_write) == "written"
        assert done.is_set()
        await trio.lowlevel.checkpoint()  # ...and the cancellation comes at the next checkpoint
    assert scope.cancelled_caught
    pool.close()
