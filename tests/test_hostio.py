"""Host I/O: page-cache hits inline, everything else off the loop (pool or io_uring);
O_DIRECT; file options."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from fusedisk.errors import SpecError
from fusedisk.formats.file.node import FileNode
from fusedisk.graph.graph import Graph
from fusedisk.hostio.host_file import HostFile, direct_io_alignment
from fusedisk.spec import parse_spec

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
DATA = os.urandom(4 * MiB)


def image(tmp_path, data: bytes = DATA):
    path = tmp_path / "d0.img"
    path.write_bytes(data)
    return path


def evict(path) -> None:
    """Drop one file's pages from the page cache (no global drop_caches in tests)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


AIO = ["threads", "io_uring"]


@pytest.fixture(params=AIO)
async def host(tmp_path, request) -> AsyncIterator[HostFile]:
    """A HostFile on tmp_path/d0.img, which holds DATA, on each engine."""
    fd = os.open(image(tmp_path), os.O_RDWR)
    host = HostFile(fd, "t", aio=request.param)
    try:
        yield host
    finally:
        host.close()
        os.close(fd)


async def test_cached_reads_are_inline_and_cold_ones_leave_the_loop(tmp_path, host):
    assert await host.read(0, 4096) == DATA[:4096]
    if not host.statistics()["nowait_reads"]:
        pytest.skip("this file system has no RWF_NOWAIT reads")
    assert host.inline_reads == 1
    evict(tmp_path / "d0.img")
    assert await host.read(2 * MiB, 65536) == DATA[2 * MiB : 2 * MiB + 65536]
    stats = host.statistics()
    assert stats.get("uring_submitted", stats["pool_calls"]) == 1  # EAGAIN: the slow path
    assert await host.read(4 * MiB - 10, 20) == DATA[-10:] + bytes(10)  # past the end


async def test_writes_flush_and_fallocate_through_the_engine(host):
    await host.write(4096, b"w" * 8192)
    await host.fdatasync()
    await host.ftruncate(8 * MiB)
    await host.write_zero_bytes(0, 4096)
    assert await host.read(0, 3 * 4096) == bytes(4096) + b"w" * 8192
    assert os.fstat(host.fd).st_size == 8 * MiB


async def open_graph(tmp_path, file_options: str) -> Graph:
    text = f"""
[nodes.d0]
driver = "raw"
file = {{ driver = "file", filename = "d0.img", {file_options} }}

[disks.vm0]
node = "d0"
"""
    return await Graph.open(parse_spec(text, tmp_path / "spec.toml"))


@pytest.mark.parametrize("aio", AIO)
async def test_cache_direct_discovers_the_alignment_and_pads_unaligned_requests(tmp_path, aio):
    path = image(tmp_path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        align = direct_io_alignment(fd)
    finally:
        os.close(fd)
    graph = await open_graph(tmp_path, f'cache.direct = true, aio = "{aio}"')
    try:
        node = graph.nodes["d0.file"]
        assert isinstance(node, FileNode)
        assert node.request_alignment == align >= 512
        with open(f"/proc/self/fdinfo/{node.fd}") as f:
            flags = int(f.read().split("flags:")[1].split()[0], 8)
        assert flags & os.O_DIRECT
        disk = graph.disks["vm0"]
        assert await disk.read(1000, 5000) == DATA[1000:6000]
        await disk.write(MiB + 3, b"abc")
        await disk.flush()
        expected = bytearray(DATA)
        expected[MiB + 3 : MiB + 6] = b"abc"
        assert await disk.read(MiB - 7, 20) == bytes(expected[MiB - 7 : MiB + 13])
        assert node.driver_stats()["inline_reads"] == 0  # O_DIRECT always waits for the device
    finally:
        await graph.close()
    assert path.read_bytes() == bytes(expected)


async def test_cache_no_flush_skips_fdatasync(tmp_path):
    image(tmp_path)
    graph = await open_graph(tmp_path, '"cache.no-flush" = true, aio = "threads"')
    try:
        disk = graph.disks["vm0"]
        await disk.write(0, b"x" * 4096)
        await disk.flush()
        node = graph.nodes["d0.file"]
        assert isinstance(node, FileNode)
        assert node.host is not None and node.host.behind is not None
        assert node.host.behind.queued == 1  # the write went to the writer thread
        assert node.host.pool.calls == 0  # and no fdatasync ran
    finally:
        await graph.close()


@pytest.mark.parametrize(
    "options, message",
    [
        ('aio = "native"', "option 'aio': expected one of 'threads', 'io_uring'"),
        ('cache = { direct = "maybe" }', "option 'cache.direct': expected true or false"),
        ("cache = { writeback = true }", "unknown option 'cache.writeback'"),
    ],
)
async def test_bad_file_options_are_refused_by_name(tmp_path, options, message):
    image(tmp_path)
    with pytest.raises(SpecError, match=message):
        await open_graph(tmp_path, options)


@pytest.mark.parametrize("aio", AIO)
async def test_cache_direct_on_a_file_of_unaligned_size_reads_and_writes_its_tail(tmp_path, aio):
    tail = os.urandom(8192 + 1000)
    path = image(tmp_path, tail)
    graph = await open_graph(tmp_path, f'cache.direct = true, aio = "{aio}"')
    try:
        disk = graph.disks["vm0"]
        assert await disk.read(9000, 1000) == tail[9000:]  # short at the end, like a file
        await disk.write(9100, b"z" * 10)
        assert await disk.read(9090, 30) == tail[9090:9100] + b"z" * 10 + tail[9110:9120]
    finally:
        await graph.close()
    # the last partial block was written whole: the file grew to the alignment
    assert path.read_bytes()[: len(tail)] == tail[:9100] + b"z" * 10 + tail[9110:]
