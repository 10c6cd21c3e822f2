"""Edges pad requests to the child's alignment, check bounds, and keep unaligned
writes to the same block from losing each other's bytes."""

from __future__ import annotations

import random

import pytest
import trio

from fusedisk.errors import OutOfRange, ReadOnly
from fusedisk.graph.edge import Edge
from fusedisk.graph.node import Role
from tests.memory_node import MemoryNode


def edge_to(node: MemoryNode) -> Edge:
    return Edge(None, "root", Role.ROOT, node)


@pytest.mark.parametrize("align", [1, 512, 4096])
async def test_unaligned_requests_reach_the_node_aligned_and_keep_neighbours(align):
    node = MemoryNode(64 * 1024, align)
    node.buf[:] = random.Random(1).randbytes(len(node.buf))
    model = bytearray(node.buf)
    edge = edge_to(node)
    rng = random.Random(2)
    for _ in range(200):
        offset = rng.randrange(0, len(model) - 1)
        length = rng.randrange(1, min(9000, len(model) - offset) + 1)
        if rng.random() < 0.5:
            data = rng.randbytes(length)
            await edge.write(offset, data)
            model[offset : offset + length] = data
        else:
            assert await edge.read(offset, length) == bytes(model[offset : offset + length])
    assert node.buf == model


async def test_concurrent_unaligned_writes_to_one_sector_both_land():
    node = MemoryNode(4096, 512)
    edge = edge_to(node)
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(edge.write, i * 10, bytes([i + 1]) * 10)
    assert bytes(node.buf[:80]) == b"".join(bytes([i + 1]) * 10 for i in range(8))


async def test_unaligned_write_zeroes_zeroes_exactly_the_range():
    node = MemoryNode(8192, 512)
    node.buf[:] = b"\xff" * 8192
    await edge_to(node).write_zeroes(100, 3000)
    assert node.buf[:100] == b"\xff" * 100
    assert node.buf[100:3100] == bytes(3000)
    assert node.buf[3100:] == b"\xff" * (8192 - 3100)
    assert ("write_zeroes", 512, 2560) in node.requests


async def test_discard_keeps_unaligned_ends_and_drops_tiny_ranges():
    node = MemoryNode(8192, 512)
    edge = edge_to(node)
    await edge.discard(100, 3000)
    await edge.discard(10, 20)
    assert [r for r in node.requests if r[0] == "discard"] == [("discard", 512, 2560)]


async def test_requests_past_the_end_are_refused():
    edge = edge_to(MemoryNode(4096))
    with pytest.raises(OutOfRange, match=r"node 'mem'.*past its end"):
        await edge.read(4000, 100)
    with pytest.raises(OutOfRange):
        await edge.write(4096, b"x")


async def test_writes_to_a_read_only_node_are_refused():
    node = MemoryNode(4096)
    node.read_only = True
    with pytest.raises(ReadOnly, match="node 'mem' is read-only"):
        await edge_to(node).write(0, b"x")


async def test_stats_count_per_kind():
    node = MemoryNode(8192)
    edge = edge_to(node)
    await edge.write(0, b"a" * 100)
    await edge.read(0, 50)
    await edge.flush()
    assert (node.stats.write.ops, node.stats.write.bytes) == (1, 100)
    assert (node.stats.read.ops, node.stats.read.bytes) == (1, 50)
    assert node.stats.flush.ops == 1
    assert node.stats.in_flight == 0
