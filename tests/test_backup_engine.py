"""The backup job without FUSE: many concurrent writers of random, granule-straddling
ranges race the copy loop and the copy-before-write hook; each backup chain must equal
the disk as it was when the backup started (qemu-img reads the chain)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from fusedisk.graph.backup import start_backup
from tests.qcow2_helpers import KiB, MiB, create, needs_qemu, opened, qemu_io, raw_of

pytestmark = [pytest.mark.timeout(120), needs_qemu]

SIZE = 4 * MiB


async def writers(disk, seed: int, count: int = 8, each: int = 40) -> None:
    async def one(rng: random.Random) -> None:
        for _ in range(each):
            length = rng.randrange(1, 200 * KiB)
            offset = rng.randrange(SIZE - length)
            kind = rng.random()
            if kind < 0.8:
                await disk.write(offset, rng.randbytes(length))
            elif kind < 0.9:
                await disk.write_zeroes(offset, length, False)
            else:
                await disk.discard(offset, length)
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, random.Random(seed * 100 + i))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chains_keep_their_instant_under_racing_writers(tmp_path: Path, seed: int) -> None:
    image = create(tmp_path / "d.qcow2", SIZE)
    qemu_io(image, f"write -P 0x5a 0 {SIZE}")
    expected: list[bytes] = []

    async def main() -> None:
        async with opened(image) as (graph, disk, _):
            for i, extra in enumerate(["bitmap=b0", "bitmap=b0 incremental",
                                       "bitmap=b0 incremental"]):  # fmt: skip
                expected.append(await disk.read(0, SIZE))
                job = await start_backup(graph, disk, f"{tmp_path}/b{i}.qcow2 {extra}")
                await writers(disk, seed * 10 + i)
                await graph.jobs.wait(job)
                assert job.detail["copied_before_write_bytes"] > 0 or i > 0

    trio.run(main)
    for i, want in enumerate(expected):
        assert raw_of(tmp_path / f"b{i}.qcow2") == want, f"backup {i}"
