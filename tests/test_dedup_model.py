"""The dedup disk against a reference model (a bytearray), with hypothesis.

Writes (aligned or not, from a few contents so blocks repeat), discards,
write-zeroes, flushes and reopenings in any order: the disk always reads as
the model, sharing never lets a write show through another copy, the check
stays clean, and the disk stores each distinct content once.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedisk.formats.dedup import DedupNode
from fusedisk.graph.graph import Graph
from tests.test_dedup_io import BS, open_dedup, pattern_block

pytestmark = pytest.mark.timeout(120)

BLOCKS = 64
SIZE = BLOCKS * BS
LENGTHS = [1, 511, 512, 4095, 4096, 4097, 3 * BS, 8 * BS + 1]

block_index = st.integers(0, BLOCKS - 1)
key = st.integers(0, 5)
ops = st.one_of(
    st.tuples(
        st.just("write"), block_index, st.integers(1, 8), st.lists(key, min_size=2, max_size=2)
    ),
    st.tuples(st.just("bytes"), st.integers(0, SIZE - 1), st.sampled_from(LENGTHS), key),
    st.tuples(st.just("discard"), st.integers(0, SIZE - 1), st.sampled_from(LENGTHS)),
    st.tuples(st.just("zeroes"), st.integers(0, SIZE - 1), st.sampled_from(LENGTHS)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("reopen")),
)


def bytes_for(k: int, length: int) -> bytes:
    return random.Random(1000 + k).randbytes(length) if k else bytes(length)


async def run_ops(folder: Path, operations: list[tuple]) -> None:
    model = bytearray(SIZE)
    graph: Graph = await open_dedup(folder, size=SIZE, journal=256 * 1024)
    try:
        for op in operations:
            disk = graph.disks["vm0"]
            kind = op[0]
            if kind == "write":
                _, first, count, keys = op
                count = min(count, BLOCKS - first)
                data = b"".join(pattern_block(keys[i % 2]) for i in range(count))
                await disk.write(first * BS, data)
                model[first * BS : first * BS + len(data)] = data
            elif kind == "bytes":
                _, offset, length, k = op
                data = bytes_for(k, min(length, SIZE - offset))
                await disk.write(offset, data)
                model[offset : offset + len(data)] = data
            elif kind == "discard":
                _, offset, length = op
                length = min(length, SIZE - offset)
                await disk.root.discard(offset, length)
                start = -(-offset // BS) * BS  # discard drops the unaligned ends
                end = (offset + length) // BS * BS
                if end > start:
                    model[start:end] = bytes(end - start)
            elif kind == "zeroes":
                _, offset, length = op
                length = min(length, SIZE - offset)
                await disk.root.write_zeroes(offset, length)
                model[offset : offset + length] = bytes(length)
            elif kind == "flush":
                await disk.flush()
            else:
                await graph.close()
                graph = await open_dedup(folder, size=SIZE, journal=256 * 1024)
            disk = graph.disks["vm0"]
            assert await disk.read(0, SIZE) == model
        node = graph.nodes["dd"]
        assert isinstance(node, DedupNode)
        report = await node.check()
        assert report.status == "clean", report.lines()
        blocks = {bytes(model[i : i + BS]) for i in range(0, SIZE, BS)} - {bytes(BS)}
        assert node.volume.counters.used_physical == len(blocks)
    finally:
        await graph.close()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(ops, min_size=1, max_size=25))
def test_the_disk_always_reads_as_the_model(operations):
    with tempfile.TemporaryDirectory(prefix="dedup-model-") as folder:
        trio.run(run_ops, Path(folder), operations)
