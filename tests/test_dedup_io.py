"""The dedup format at node level: sharing, zero blocks, freeing, reuse, collisions,
concurrency, bounded memory, stats and the online check.

The helpers here (spec, open, patterns) are shared by the other test_dedup_* files.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from fusedisk.formats.dedup import DedupNode
from fusedisk.formats.dedup.index import ContentIndex
from fusedisk.graph.disk import Disk
from fusedisk.graph.extents import Status
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec

pytestmark = pytest.mark.timeout(60)

KiB = 1 << 10
MiB = 1 << 20
BS = 4096

SPEC = """
[nodes.dd]
driver = "dedup"
format = true
size = {size}
block-size = {bs}
journal-size = {journal}
{options}
metadata = {{ driver = "file", filename = "meta.img" }}
data = {{ driver = "file", filename = "data.img" }}

[disks.vm0]
node = "dd"
"""


def spec_text(size: int = 16 * MiB, bs: int = BS, journal: int = MiB, options: str = "") -> str:
    return SPEC.format(size=size, bs=bs, journal=journal, options=options)


def make_children(folder: Path) -> None:
    for name in ("meta.img", "data.img"):
        (folder / name).touch()


async def open_dedup(folder: Path, **kw: object) -> Graph:
    if not (folder / "meta.img").exists():
        make_children(folder)
    return await Graph.open(parse_spec(spec_text(**kw), folder / "spec.toml"))  # type: ignore[arg-type]


@asynccontextmanager
async def dedup_disk(folder: Path, **kw: object) -> AsyncIterator[tuple[Disk, DedupNode]]:
    graph = await open_dedup(folder, **kw)
    try:
        node = graph.nodes["dd"]
        assert isinstance(node, DedupNode)
        yield graph.disks["vm0"], node
    finally:
        await graph.close()


async def abandon(graph: Graph) -> None:
    """Drop a graph as a crash would: close the host files, flush and close nothing else."""
    for node in graph.nodes.values():
        if node.driver == "file":
            await node.close()
    graph.nodes.clear()


def pattern_block(key: int, bs: int = BS) -> bytes:
    """A block's content by key: 0 is zeroes, equal keys give equal blocks."""
    if key == 0:
        return bytes(bs)
    return random.Random(key).randbytes(bs)


def data_size(folder: Path) -> int:
    return os.path.getsize(folder / "data.img")


# -- sharing ---------------------------------------------------------------------------


async def test_same_data_at_four_offsets_is_stored_once(tmp_path):
    blob = random.Random(1).randbytes(8 * MiB)
    offsets = [0, 16 * MiB, 32 * MiB + 4 * KiB, 56 * MiB]
    async with dedup_disk(tmp_path, size=64 * MiB) as (disk, node):
        for off in offsets:
            for i in range(0, len(blob), MiB):
                await disk.write(off + i, blob[i : i + MiB])
        await disk.flush()
        assert data_size(tmp_path) <= len(blob) + 64 * KiB  # not 4x
        stats = node.driver_stats()
        assert stats["logical_bytes_used"] == 4 * len(blob)
        assert stats["physical_bytes_used"] == len(blob)
        assert stats["dedup_ratio"] == 4.0
        assert stats["index_hits"] >= 3 * len(blob) // BS
        for off in offsets:
            assert await disk.read(off, len(blob)) == blob
    async with dedup_disk(tmp_path, size=64 * MiB) as (disk, node):
        for off in offsets:
            assert await disk.read(off, len(blob)) == blob
        assert node.driver_stats()["dedup_ratio"] == 4.0
        assert (await node.check()).status == "clean"
    assert data_size(tmp_path) <= len(blob) + 64 * KiB


async def test_duplicates_inside_one_request_are_shared(tmp_path):
    a, b = pattern_block(1), pattern_block(2)
    async with dedup_disk(tmp_path) as (disk, node):
        await disk.write(0, (a + b) * 64)
        await disk.flush()
        assert node.driver_stats()["physical_bytes_used"] == 2 * BS
        assert await disk.read(0, 128 * BS) == (a + b) * 64


async def test_all_zero_blocks_are_never_stored(tmp_path):
    x = pattern_block(7)
    async with dedup_disk(tmp_path) as (disk, node):
        await disk.write(0, bytes(2 * MiB) + x + bytes(MiB))
        await disk.root.write_zeroes(4 * MiB, MiB)
        await disk.flush()
        assert data_size(tmp_path) == BS
        assert node.driver_stats()["logical_bytes_used"] == BS
        extents = await disk.root.block_status(0, 4 * MiB)
        data = [(e.offset, e.length) for e in extents if e.status & Status.DATA]
        assert data == [(2 * MiB, BS)]
        assert all(e.status & Status.ZERO for e in extents if not e.status & Status.DATA)
        assert await disk.read(2 * MiB - 10, BS + 20) == bytes(10) + x + bytes(10)


async def test_overwriting_a_shared_block_leaves_the_other_copies(tmp_path):
    blob = random.Random(3).randbytes(MiB)
    async with dedup_disk(tmp_path) as (disk, node):
        for off in (0, MiB, 2 * MiB):
            await disk.write(off, blob)
        await disk.write(MiB + 5 * BS, pattern_block(9))
        await disk.write(2 * MiB + 17, b"hello")  # read-modify-write of a shared block
        await disk.root.discard(0, 8 * BS)
        await disk.flush()
        assert await disk.read(0, 8 * BS) == bytes(8 * BS)
        assert await disk.read(8 * BS, MiB - 8 * BS) == blob[8 * BS :]
        expect1 = blob[: 5 * BS] + pattern_block(9) + blob[6 * BS :]
        assert await disk.read(MiB, MiB) == expect1
        expect2 = bytearray(blob)
        expect2[17:22] = b"hello"
        assert await disk.read(2 * MiB, MiB) == expect2
        assert (await node.check()).status == "clean"


async def test_discard_and_write_zeroes_free_blocks_that_are_then_reused(tmp_path):
    rng = random.Random(4)
    async with dedup_disk(tmp_path) as (disk, node):
        await disk.write(0, rng.randbytes(4 * MiB))
        await disk.flush()
        assert node.driver_stats()["physical_bytes_used"] == 4 * MiB
        await disk.root.discard(0, 2 * MiB)
        await disk.root.write_zeroes(2 * MiB, MiB)
        await disk.flush()  # the frees are committed: the blocks may be reused
        assert node.driver_stats()["physical_bytes_used"] == MiB
        grown = data_size(tmp_path)
        fresh = rng.randbytes(3 * MiB)
        await disk.write(8 * MiB, fresh)
        await disk.flush()
        assert data_size(tmp_path) == grown  # written into the freed blocks
        assert node.driver_stats()["physical_high_water_bytes"] == 4 * MiB
        assert await disk.read(8 * MiB, 3 * MiB) == fresh
        assert await disk.read(0, 3 * MiB) == bytes(3 * MiB)
        assert (await node.check()).status == "clean"


async def test_an_overwritten_block_is_not_reused_before_the_commit(tmp_path):
    """Until the map change that freed it is durable, a block keeps its bytes."""
    async with dedup_disk(tmp_path) as (disk, node):
        await disk.write(0, pattern_block(1))
        await disk.flush()
        await disk.write(0, pattern_block(2))  # block 0 is freed, not committed
        await disk.write(BS, pattern_block(3))
        assert node.driver_stats()["physical_high_water_bytes"] == 3 * BS
        await disk.flush()
        await disk.write(2 * BS, pattern_block(4))  # now block 0 is reused
        assert node.driver_stats()["physical_high_water_bytes"] == 3 * BS
        assert await disk.read(0, 3 * BS) == pattern_block(2) + pattern_block(3) + pattern_block(4)


# -- collisions --------------------------------------------------------------------------


def constant_hash(block: bytes | memoryview) -> bytes:
    return b"\x42" * 16


async def test_a_forced_collision_never_merges_different_data(tmp_path, monkeypatch):
    monkeypatch.setattr(ContentIndex, "hash", staticmethod(constant_hash))
    blocks = [pattern_block(k) for k in (1, 2, 3, 1, 2)]
    async with dedup_disk(tmp_path) as (disk, node):
        for i, block in enumerate(blocks):
            await disk.write(i * BS, block)
        await disk.write(8 * BS, b"".join(blocks))
        await disk.flush()
        assert await disk.read(0, 5 * BS) == b"".join(blocks)
        assert await disk.read(8 * BS, 5 * BS) == b"".join(blocks)
        stats = node.driver_stats()
        assert stats["verified_collisions"] > 0
        assert stats["physical_bytes_used"] == 3 * BS  # equal blocks are still shared
        assert (await node.check()).status == "clean"


async def test_without_verify_a_collision_merges_data(tmp_path, monkeypatch):
    """What `verify = false` risks: blocks with equal hashes are shared unread."""
    monkeypatch.setattr(ContentIndex, "hash", staticmethod(constant_hash))
    async with dedup_disk(tmp_path, options="verify = false") as (disk, _):
        await disk.write(0, pattern_block(1))
        await disk.write(BS, pattern_block(2))
        assert await disk.read(BS, BS) == pattern_block(1)


async def test_verify_can_change_at_run_time(tmp_path):
    async with dedup_disk(tmp_path) as (disk, node):
        assert "verify" in node.runtime_options()
        await node.set_option("verify", "false")
        await disk.write(0, pattern_block(1) * 2)
        assert node.driver_stats()["physical_bytes_used"] == BS
        assert node.option_values()["verify"] == "false"


# -- concurrency --------------------------------------------------------------------------


async def test_concurrent_writes_keep_refcounts_and_data_right(tmp_path):
    rng = random.Random(5)
    blocks = 64
    written: dict[int, set[int]] = {b: set() for b in range(blocks)}
    async with dedup_disk(tmp_path, size=blocks * BS) as (disk, node):

        async def writer(seed: int) -> None:
            r = random.Random(seed)
            for _ in range(30):
                first = r.randrange(blocks - 4)
                keys = [r.choice([0, 1, 2, 3, seed + 100]) for _ in range(r.randint(1, 4))]
                for i, key in enumerate(keys):
                    written[first + i].add(key)
                await disk.write(first * BS, b"".join(pattern_block(k) for k in keys))
                if r.random() < 0.1:
                    await disk.flush()
                if r.random() < 0.1:
                    await disk.root.discard(first * BS, BS)
                    written[first].add(0)

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(writer, rng.randrange(1000))
        await disk.flush()
        for b in range(blocks):
            got = await disk.read(b * BS, BS)
            keys = written[b] | {0}
            assert any(got == pattern_block(k) for k in keys), f"block {b}"
        report = await node.check()
        assert report.status == "clean", report.lines()


# -- bounded memory, opening --------------------------------------------------------------


async def test_memory_stays_bounded_and_commits_happen_without_flushes(tmp_path):
    async with dedup_disk(tmp_path, journal=256 * KiB, options='cache-size = "64K"') as (
        disk,
        node,
    ):
        rng = random.Random(6)
        peak = 0
        for i in range(16):
            await disk.write(i * MiB, rng.randbytes(MiB))
            peak = max(peak, len(node.volume.cache))
        assert node.volume.journal.commits > 1  # the budget forced commits; no flush was asked
        limit = node.volume.cache.capacity + node.volume._txn_budget + 3 * node.volume._chunk + 8
        assert peak <= limit
        await disk.flush()
        assert len(node.volume.cache) <= node.volume.cache.capacity


async def test_opening_reads_only_the_superblock_and_the_journal(tmp_path):
    async with dedup_disk(tmp_path, size=256 * MiB) as (disk, _):
        await disk.write(0, random.Random(7).randbytes(4 * MiB))
    graph = await open_dedup(tmp_path, size=256 * MiB)
    try:
        meta = graph.nodes["dd.metadata"]
        assert meta.stats.read.bytes <= 4 * 4096
    finally:
        await graph.close()


# -- stats and the online check ------------------------------------------------------------


async def test_stats_and_the_online_check_control(tmp_path):
    async with dedup_disk(tmp_path) as (disk, node):
        await disk.write(0, pattern_block(1) * 4)
        controls = node.controls()
        assert json.loads(controls["check"].read())["status"] == "not run"
        write = controls["check"].write
        assert write is not None
        await write("1\n")
        result = json.loads(controls["check"].read())
        assert result["status"] == "clean"
        assert result["blocks_hashed"] == 1
        await write("quick")
        assert json.loads(controls["check"].read())["blocks_hashed"] == 0
        stats = node.driver_stats()
        for key in ("logical_bytes_used", "physical_bytes_used", "dedup_ratio", "index_hits",
                    "verified_collisions"):  # fmt: skip
            assert key in stats
        assert stats["dedup_ratio"] == 4.0


async def test_rewriting_a_full_disk_reuses_blocks_without_flushes(tmp_path):
    rng = random.Random(8)
    size = 2 * MiB
    async with dedup_disk(tmp_path, size=size) as (disk, node):
        last = b""
        for _ in range(4):  # the disk is full of unique data each time; no flush asked
            last = rng.randbytes(size)
            await disk.write(0, last)
        assert await disk.read(0, size) == last
        assert data_size(tmp_path) <= node.volume.sb.physical_blocks * BS
        assert (await node.check()).status == "clean"
