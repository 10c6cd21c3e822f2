"""Crash safety of the dedup format.

1. Simulated crashes, many and fast: both children are in-memory disks with a
   volatile write cache.  A write is durable only once a flush has returned;
   at the crash any subset of the writes since the last flush survives, each
   torn at 512-byte sectors.  The crash comes after a random number of child
   requests, so it lands anywhere: inside a data write, a journal append, the
   home writes, a checkpoint, or the replay after an earlier crash.
2. A real SIGKILL of a process writing through a Graph on host files.

After each: every write acknowledged by a flush reads back (or a later
write does), and the check finds no refcount, map, or hash error.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fusedisk.errors import IOFailure
from fusedisk.formats.dedup import DedupNode
from fusedisk.graph.edge import Edge
from fusedisk.graph.extents import Extent, Status
from fusedisk.graph.node import Node, Role
from tests.memory_node import Context
from tests.test_dedup_io import BS, open_dedup, pattern_block

pytestmark = pytest.mark.timeout(90)

SECTOR = 512
BLOCKS = 48


class World:
    """What both disks share: the request budget before the crash."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.crashed = False

    def tick(self) -> None:
        if self.crashed:
            raise IOFailure("the machine has crashed")
        self.budget -= 1
        if self.budget < 0:
            self.crashed = True
            raise IOFailure("the machine has crashed")


class CrashDisk(Node):
    """A disk with a volatile write cache: only what a flush covered is sure to survive."""

    grows_on_write = True

    def __init__(self, name: str, world: World, durable: bytes = b"") -> None:
        super().__init__(name, {}, {}, Context())
        self.world = world
        self.durable = bytearray(durable)
        self.current = bytearray(durable)
        self.pending: list[tuple[int, bytes]] = []
        self.size = len(durable)

    async def read(self, offset: int, length: int) -> bytes:
        self.world.tick()
        return bytes(self.current[offset : offset + length])

    def _put(self, offset: int, data: bytes) -> None:
        self.world.tick()
        end = offset + len(data)
        if end > len(self.current):
            self.current.extend(bytes(end - len(self.current)))
        self.current[offset:end] = data
        self.pending.append((offset, data))
        self.size = len(self.current)

    async def write(self, offset: int, data: bytes) -> None:
        self._put(offset, bytes(data))

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._put(offset, bytes(length))

    async def discard(self, offset: int, length: int) -> None:
        self._put(offset, bytes(length))

    async def flush(self) -> None:
        self.world.tick()
        self.durable = bytearray(self.current)
        self.pending = []

    async def truncate(self, size: int) -> None:
        self.world.tick()
        self.current = self.current[:size] + bytes(max(0, size - len(self.current)))
        self.durable = self.durable[:size] + bytes(max(0, size - len(self.durable)))
        self.size = size

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length, Status.DATA | Status.ALLOCATED)]

    def after_crash(self, rng: random.Random) -> bytes:
        """The disk's content after power is back: the durable bytes plus a random
        subset of the sectors written since the last flush, in order."""
        image = bytearray(self.durable)
        size = len(self.current)
        image.extend(bytes(size - len(image)))
        for offset, data in self.pending:
            for at in range(0, len(data), SECTOR):
                if rng.random() < 0.5:
                    image[offset + at : offset + at + SECTOR] = data[at : at + SECTOR]
        return bytes(image)


def dedup_node(
    world: World, meta: bytes, data: bytes, disk: type[CrashDisk] | None = None, **options: object
) -> DedupNode:
    values = {k: o.default for k, o in DedupNode.all_options().items()}
    values.update({"format": True, "size": BLOCKS * BS, "journal-size": 256 * 1024})
    values.update(options)
    disk = disk or CrashDisk
    children: dict[str, Node | list[Node]] = {
        "metadata": disk("meta", world, meta),
        "data": disk("data", world, data),
    }
    return DedupNode("dd", values, children, Context())


def images(node: DedupNode, rng: random.Random) -> tuple[bytes, bytes]:
    meta = node.children["metadata"].node
    data = node.children["data"].node
    assert isinstance(meta, CrashDisk) and isinstance(data, CrashDisk)
    return meta.after_crash(rng), data.after_crash(rng)


async def recover(meta: bytes, data: bytes, rng: random.Random) -> DedupNode:
    """Open after a crash; sometimes crash again during the recovery first."""
    while rng.random() < 0.3:
        world = World(rng.randrange(1, 40))
        node = dedup_node(world, meta, data)
        try:
            await node.open()
            await node.close()
        except IOFailure:
            pass
        meta, data = images(node, rng)
    node = dedup_node(World(10**9), meta, data)
    await node.open()
    return node


async def run_until_crash(
    node: DedupNode, rng: random.Random, possible: dict[int, set[int]], ops: int = 60
) -> None:
    """Random writes, discards and flushes; `possible[b]` keeps every key block b may
    hold after a crash: its key at the last completed flush and every one since."""
    root = Edge(None, "root", Role.ROOT, node)
    current = {b: max(possible[b]) if len(possible[b]) == 1 else None for b in possible}
    try:
        await node.open()
        for _ in range(ops):
            r = rng.random()
            first = rng.randrange(BLOCKS - 4)
            if r < 0.65:
                keys = [rng.choice([0, 1, 2, 3, 4, rng.randrange(5, 10**6)]) for _ in range(4)]
                for i, key in enumerate(keys):
                    possible[first + i].add(key)
                    current[first + i] = key
                await root.write(first * BS, b"".join(pattern_block(k) for k in keys))
            elif r < 0.8:
                for i in range(3):
                    possible[first + i].add(0)
                    current[first + i] = 0
                await root.discard(first * BS, 3 * BS)
            else:
                await root.flush()
                for b, key in current.items():
                    assert key is not None
                    possible[b] = {key}
    except IOFailure:
        return


@pytest.mark.parametrize("seed", range(24))
async def test_a_crash_anywhere_loses_no_flushed_write(seed):
    rng = random.Random(seed)
    world = World(10**9)
    node = dedup_node(world, b"", b"")
    await node.open()
    await node.close()
    meta, data = images(node, rng)
    possible = {b: {0} for b in range(BLOCKS)}
    for _round in range(3):
        node = dedup_node(World(rng.randrange(20, 600)), meta, data)
        await run_until_crash(node, rng, possible)
        meta, data = images(node, rng)
        node = await recover(meta, data, rng)
        root = Edge(None, "root", Role.ROOT, node)
        for b in range(BLOCKS):
            got = await root.read(b * BS, BS)
            keys = [k for k in possible[b] if pattern_block(k) == got]
            assert keys, f"round {_round}: block {b} holds none of the keys {possible[b]}"
            possible[b] = {keys[0]}
        report = await node.check()
        assert report.status == "clean", report.lines()
        await node.close()
        meta, data = images(node, rng)  # closed cleanly: all durable


WRITER = """
import random, sys, trio
from pathlib import Path
from tests.test_dedup_io import BS, open_dedup, pattern_block

async def main():
    graph = await open_dedup(Path(sys.argv[1]), size={blocks} * BS)
    disk = graph.disks["vm0"]
    i = 0
    while True:
        block = (i * 7) % {blocks}
        key = i if i % 2 else i % 5    # half of the writes are duplicates
        await disk.write(block * BS, pattern_block(key))
        if i % 16 == 15:
            await disk.flush()
            print(i, flush=True)
        i += 1

trio.run(main)
"""


def writes_key(i: int) -> int:
    return i if i % 2 else i % 5


@pytest.mark.timeout(60)
async def test_sigkill_during_a_write_storm_loses_no_flushed_write(tmp_path):
    blocks = 512
    (tmp_path / "meta.img").touch()
    (tmp_path / "data.img").touch()
    root = Path(__file__).parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(blocks=blocks), str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    try:
        assert proc.stdout is not None
        flushed = -1
        for line in proc.stdout:
            flushed = int(line)
            if flushed > 3000:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert flushed > 3000, "the writer made no progress"
    # What may be in each block: its last write up to the flush, or any later one.
    last_i = flushed + 10_000
    possible: dict[int, set[int]] = {b: set() for b in range(blocks)}
    for i in range(last_i):
        block = (i * 7) % blocks
        if i <= flushed:
            possible[block] = {writes_key(i)}
        else:
            possible[block].add(writes_key(i))
    graph = await open_dedup(tmp_path, size=blocks * BS)
    try:
        disk = graph.disks["vm0"]
        for b in range(blocks):
            got = await disk.read(b * BS, BS)
            assert any(got == pattern_block(k) for k in possible[b]), f"block {b}"
        node = graph.nodes["dd"]
        assert isinstance(node, DedupNode)
        report = await node.check()
        assert report.status == "clean", report.lines()
    finally:
        await graph.close()
