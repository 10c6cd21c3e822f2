"""The luks node over LUKS2 against a model: random unaligned reads and writes on 512
and 4096-byte sectors (the edge's read-modify-write), a fixed-size segment, an IV tweak,
and reopening (what a reopened node reads is what was written)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from fusedisk.errors import NotSupported
from fusedisk.filters.luks import luks2_manage as lm
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec
from tests import luks2_craft as craft
from tests.luks2_battery import SPEC

MiB = 1 << 20


async def _graph(image: Path) -> Graph:
    key = image.parent / "key"
    key.write_bytes(craft.PASSPHRASE)
    return await Graph.open(parse_spec(SPEC.format(image=image, key=key), image.parent / "s.toml"))


async def _random_io(image: Path, seed: int, model: bytearray) -> None:
    rng = random.Random(seed)
    graph = await _graph(image)
    try:
        disk = graph.disks["vm0"]
        assert disk.size == len(model)
        for _ in range(60):
            offset = rng.randrange(len(model))
            length = rng.choice([1, 511, 512, 4095, 4096, 4097, 70001, 300000])
            length = min(length, len(model) - offset)
            if rng.random() < 0.5:
                data = rng.randbytes(length)
                await disk.write(offset, data)
                model[offset : offset + length] = data
            else:
                assert await disk.read(offset, length) == bytes(model[offset : offset + length])
        await disk.flush()
    finally:
        await graph.close()


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_random_unaligned_io_matches_a_model_and_survives_a_reopen(tmp_path, sector_size):
    image = craft.make_image(tmp_path / "l2.img", sector_size=sector_size)
    model = bytearray(MiB)

    async def initial() -> None:
        graph = await _graph(image)
        try:
            model[:] = await graph.disks["vm0"].read(0, MiB)
        finally:
            await graph.close()

    trio.run(initial)
    trio.run(_random_io, image, 1, model)
    trio.run(_random_io, image, 2, model)  # reopened: the first run's data reads back


def test_an_iv_tweak_shifts_the_ivs_and_a_fixed_size_is_kept(tmp_path):
    """iv_tweak adds to every IV: data written with tweak 0 reads as other bytes with
    tweak 8, and back with 0; a fixed segment size is the disk's size and cannot grow."""
    image = craft.make_image(tmp_path / "l2.img")
    data = random.Random(3).randbytes(8192)

    async def write_read(expect_same: bool, write: bool) -> None:
        graph = await _graph(image)
        try:
            disk = graph.disks["vm0"]
            if write:
                await disk.write(0, data)
            assert (await disk.read(0, 8192) == data) == expect_same
        finally:
            await graph.close()

    trio.run(write_read, True, True)
    craft.rewrite(image, lambda m: m["segments"]["0"].update(iv_tweak="8", size=str(MiB // 2)))
    trio.run(write_read, False, False)

    async def fixed() -> None:
        graph = await _graph(image)
        try:
            assert graph.disks["vm0"].size == MiB // 2
            with pytest.raises(NotSupported, match="fixed size"):
                await graph.nodes["crypt"].truncate(MiB)
        finally:
            await graph.close()

    trio.run(fixed)
    craft.rewrite(image, lambda m: m["segments"]["0"].update(iv_tweak="0", size="dynamic"))
    trio.run(write_read, True, False)
    assert lm.PAYLOAD_OFFSET + MiB == image.stat().st_size
