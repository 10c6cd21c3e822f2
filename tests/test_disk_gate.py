"""The disk's gate: a drain waits for requests in flight, holds new ones, flushes."""

from __future__ import annotations

import pytest
import trio

from fusedisk.errors import OutOfRange, ReadOnly
from fusedisk.graph.disk import Disk, is_zero
from fusedisk.spec import DiskSpec
from tests.memory_node import MemoryNode


async def test_drain_waits_for_in_flight_requests_and_holds_new_ones():
    node = MemoryNode(1 << 20)
    disk = Disk(DiskSpec("vm0", "mem"), node)
    node.gate = trio.Event()
    events: list[str] = []

    async def slow_write() -> None:
        await disk.write(0, b"a" * 512)
        events.append("slow write done")

    async def drain() -> None:
        async with disk.drained():
            events.append(f"drained, flushes={node.flushes}")
            await trio.sleep(0.01)
            events.append("graph changed")

    async def late_write() -> None:
        await disk.write(512, b"b" * 512)
        events.append("late write done")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_write)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(late_write)
        await trio.testing.wait_all_tasks_blocked()
        assert events == []  # the drain waits for the slow write; the late one waits too
        node.gate.set()
    assert events == ["slow write done", "drained, flushes=1", "graph changed", "late write done"]
    assert disk.drains == 1


async def test_reads_are_short_at_the_end_like_a_file():
    disk = Disk(DiskSpec("vm0", "mem"), MemoryNode(1000))
    assert len(await disk.read(900, 500)) == 100
    assert await disk.read(1000, 10) == b""


async def test_detect_zeroes_turns_zero_writes_into_write_zeroes():
    node = MemoryNode(1 << 16)
    disk = Disk(DiskSpec("vm0", "mem", detect_zeroes="unmap"), node)
    await disk.write(0, bytes(4096))
    await disk.write(4096, b"\0" * 4095 + b"\1")
    kinds = [r[0] for r in node.requests]
    assert kinds == ["write_zeroes", "write"]
    assert disk.zero_writes_detected == 1


def test_is_zero_sees_a_late_nonzero_byte():
    assert is_zero(bytes(3 << 20))
    assert not is_zero(bytes(3 << 20) + b"\1")
    assert is_zero(b"")


async def test_drain_tells_every_node_so_held_requests_can_be_released():
    node = MemoryNode(4096)
    seen: list[str] = []
    node.begin_drain = lambda: seen.append("begin")  # type: ignore[method-assign]
    node.end_drain = lambda: seen.append("end")  # type: ignore[method-assign]
    disk = Disk(DiskSpec("vm0", "mem"), node)
    async with disk.drained():
        assert seen == ["begin"]
    assert seen == ["begin", "end"]


async def test_write_zeroes_and_block_status_go_through_the_gate_with_bounds():
    node = MemoryNode(1 << 16)
    disk = Disk(DiskSpec("vm0", "mem"), node)
    await disk.write(0, b"x" * 8192)
    await disk.write_zeroes(0, 4096, unmap=True)
    assert await disk.read(0, 4096) == bytes(4096)
    assert ("write_zeroes", 0, 4096) in node.requests
    assert disk.stats.write_zeroes.ops == 1
    extents = await disk.block_status(60000, 1 << 20)  # clipped to the disk
    assert sum(e.length for e in extents) == (1 << 16) - 60000
    assert await disk.block_status(1 << 16, 10) == []
    with pytest.raises(OutOfRange):
        await disk.write_zeroes((1 << 16) - 10, 20, unmap=False)
    ro = Disk(DiskSpec("vm1", "mem", read_only=True), MemoryNode(4096))
    with pytest.raises(ReadOnly):
        await ro.discard(0, 4096)
