"""The in-memory dirty bitmap (fusedisk/graph/bitmaps.py) against a set-of-granules model,
and its marking by edges: every write, write-zeroes and discard that reaches a node."""

from __future__ import annotations

import random

import pytest
import trio

from fusedisk.errors import ControlError
from fusedisk.graph.bitmaps import BitmapSet, DirtyBitmap, check_granularity, check_name
from fusedisk.graph.edge import Edge
from tests.memory_node import MemoryNode

G = 4096


def model_ranges(dirty: set[int], size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for g in sorted(dirty):
        start, end = g * G, min(size, (g + 1) * G)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + end - start)
        else:
            out.append((start, end - start))
    return out


def test_random_operations_match_a_model() -> None:
    rng = random.Random(7)
    size = 1_000_000  # not a multiple of the granularity: the last granule is short
    b = DirtyBitmap("b", size, G)
    dirty: set[int] = set()
    for _ in range(400):
        off = rng.randrange(size)
        n = rng.randrange(1, 40_000)
        if rng.random() < 0.7:
            b.set(off, n)
            dirty.update(range(off // G, (min(off + n, size) - 1) // G + 1))
        else:
            b.reset(off, n)
            end = off + n
            last = -(-size // G) if end >= size else end // G
            dirty.difference_update(range(-(-off // G), last))
        assert b.dirty_ranges() == model_ranges(dirty, size)
    assert b.count() == sum(n for _, n in model_ranges(dirty, size))
    extents = b.extents()
    assert sum(n for _, n, _ in extents) == size
    assert [(o, n) for o, n, d in extents if d] == b.dirty_ranges()


def test_bytes_round_trip_in_qcow2_bit_order() -> None:
    b = DirtyBitmap("b", 64 * G, G)
    b.set(0, 1)  # bit 0
    b.set(9 * G, 1)  # bit 9: byte 1, bit 1
    assert b.to_bytes() == bytes([0x01, 0x02]) + bytes(6)
    c = DirtyBitmap("c", 64 * G, G)
    c.load_bytes(b.to_bytes())
    assert c.dirty_ranges() == b.dirty_ranges()


def test_merge_across_granularities_and_resize() -> None:
    a = DirtyBitmap("a", 1 << 20, 4096)
    b = DirtyBitmap("b", 1 << 20, 65536)
    a.set(70_000, 10)
    b.merge(a)
    assert b.dirty_ranges() == [(65536, 65536)]
    b.resize(2 << 20)
    assert b.dirty_ranges() == [(65536, 65536)] and b.size == 2 << 20
    b.resize(65536)
    assert b.dirty_ranges() == []


@pytest.mark.parametrize("name", ["", "a/b", "x\n", ".", "..", "é" * 600])
def test_bad_names_are_refused_with_a_sentence(name: str) -> None:
    with pytest.raises(ControlError, match="node 'n'"):
        check_name(name, "node 'n'")


@pytest.mark.parametrize("granularity", [256, 1000, 1 << 32])
def test_bad_granularities_are_refused(granularity: int) -> None:
    with pytest.raises(ControlError, match="power of two"):
        check_granularity(granularity, "node 'n'")


def test_a_bitmap_too_fine_for_memory_is_refused() -> None:
    check_granularity(65536, "node 'n'", 1 << 40)
    with pytest.raises(ControlError, match="choose a larger granularity"):
        check_granularity(512, "node 'n'", 1 << 40)


def test_a_set_refuses_duplicates_and_tracks_enabled() -> None:
    s = BitmapSet("n")
    s.add(DirtyBitmap("a", 1 << 20))
    with pytest.raises(ControlError, match="exists"):
        s.add(DirtyBitmap("a", 1 << 20))
    s.add(DirtyBitmap("off", 1 << 20, enabled=False))
    s.add(DirtyBitmap("bad", 1 << 20, inconsistent=True))
    assert [b.name for b in s.enabled] == ["a"]
    with pytest.raises(ControlError, match="no bitmap named 'zz'"):
        s.get("zz")


def test_edges_mark_writes_zeroes_and_discards() -> None:
    async def main() -> None:
        node = MemoryNode(1 << 20)
        await node.open()
        edge = Edge(None, "root", "root", node)
        on = DirtyBitmap("on", node.size, G)
        off = DirtyBitmap("off", node.size, G, enabled=False)
        node.bitmaps.add(on)
        node.bitmaps.add(off)
        await edge.write(10, b"x")
        await edge.write_zeroes(8 * G, 2 * G)
        await edge.discard(20 * G, G)
        await edge.read(0, 4096)
        assert on.dirty_ranges() == [(0, G), (8 * G, 2 * G), (20 * G, G)]
        assert off.count() == 0

    trio.run(main)
