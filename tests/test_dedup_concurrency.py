"""Many requests in flight on one dedup node, its children yielding at every request,
so that writes, discards, reads, flushes, commits and checkpoints interleave at every
await.  Requests go to the node directly: no edge range lock serialises writes to
the same block, so the node's own locking is what keeps the metadata right."""

from __future__ import annotations

import random

import pytest
import trio

from tests.test_dedup_crash import BLOCKS, CrashDisk, World, dedup_node
from tests.test_dedup_io import BS, pattern_block

pytestmark = pytest.mark.timeout(60)


class YieldingDisk(CrashDisk):
    """An in-memory disk that lets other tasks run before and after each request."""

    rng = random.Random(0)

    async def _pause(self) -> None:
        for _ in range(self.rng.randrange(3)):
            await trio.lowlevel.checkpoint()

    async def read(self, offset: int, length: int) -> bytes:
        await self._pause()
        data = await super().read(offset, length)
        await self._pause()
        return data

    async def write(self, offset: int, data: bytes) -> None:
        await self._pause()
        await super().write(offset, data)
        await self._pause()

    async def flush(self) -> None:
        await self._pause()
        await super().flush()


@pytest.mark.parametrize("seed", range(6))
async def test_concurrent_requests_to_the_same_blocks_stay_consistent(seed):
    YieldingDisk.rng = random.Random(seed)
    node = dedup_node(World(10**9), b"", b"", YieldingDisk)
    await node.open()
    seen: dict[int, set[int]] = {b: {0} for b in range(BLOCKS)}
    hot = list(range(8))  # most requests hit these blocks

    async def writer(task: int) -> None:
        r = random.Random(seed * 1000 + task)
        for _ in range(25):
            first = r.choice(hot) if r.random() < 0.7 else r.randrange(BLOCKS - 3)
            action = r.random()
            if action < 0.6:
                keys = [r.choice([0, 1, 2, 3, 1000 + task]) for _ in range(r.randint(1, 3))]
                for i, key in enumerate(keys):
                    seen[first + i].add(key)
                await node.write(first * BS, b"".join(pattern_block(k) for k in keys))
            elif action < 0.75:
                await node.discard(first * BS, 2 * BS)
            elif action < 0.9:
                got = await node.read(first * BS, BS)
                assert any(got == pattern_block(k) for k in seen[first]), f"block {first}"
            else:
                await node.flush()

    async with trio.open_nursery() as nursery:
        for task in range(12):
            nursery.start_soon(writer, task)
    await node.flush()
    for b in range(BLOCKS):
        got = await node.read(b * BS, BS)
        assert any(got == pattern_block(k) for k in seen[b]), f"block {b}"
    report = await node.check()
    assert report.status == "clean", report.lines()
    assert node.volume.journal.commits > 1
    await node.close()


class GateDisk(CrashDisk):
    """Holds a read of one offset until the test opens the gate."""

    gate_offset = -1
    gate: trio.Event | None = None
    waiting: trio.Event | None = None

    async def read(self, offset: int, length: int) -> bytes:
        if offset == self.gate_offset and self.gate is not None:
            assert self.waiting is not None
            self.waiting.set()
            await self.gate.wait()
        return await super().read(offset, length)


async def test_a_block_being_read_is_not_reused_under_the_reader():
    node = dedup_node(World(10**9), b"", b"", GateDisk)
    await node.open()
    await node.write(0, pattern_block(1))
    await node.flush()
    data = node.children["data"].node
    assert isinstance(data, GateDisk)
    data.gate_offset, data.gate, data.waiting = 0, trio.Event(), trio.Event()
    result: list[bytes] = []

    async def reader() -> None:
        result.append(await node.read(0, BS))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await data.waiting.wait()  # the reader has mapped block 0 and waits for its data
        data.gate_offset = -1
        await node.write(0, pattern_block(2))  # physical block 0 is freed...
        await node.flush()  # ...and free for reuse once committed
        await node.write(BS, pattern_block(3))  # must not land on the block being read
        await node.flush()
        data.gate.set()
    assert result == [pattern_block(1)]
    assert await node.read(0, 2 * BS) == pattern_block(2) + pattern_block(3)
    assert (await node.check()).status == "clean"
    await node.close()
