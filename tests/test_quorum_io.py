"""How a quorum's reads reach its children: the children's I/O overlaps (slow or cold
children are waited for at once, not one after another), and large page-cache reads
land in the returned bytes in one copy.

Overlap is shown without timing: the quorum counts the child reads it has in
progress (`peak_child_reads_in_flight` in its `stats`), and with one guest request
at a time (dd with O_DIRECT) a peak of 3 means one request's three child reads
were in progress together.  Run one after another, the peak would stay 1.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fusedisk.hostio.host_file import ONE_COPY_MIN, HostFile
from tests.conftest import needs
from tests.mounting import Mount

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
SIZE = 8 * MiB


def mount_quorum(
    tmp_path: Path, write_spec: Any, mount: Any, delay_ms: int = 0
) -> tuple[Mount, bytes]:
    """Three raw children holding the same random data, under faults nodes, mounted."""
    data = os.urandom(SIZE)
    for i in range(3):
        (tmp_path / f"c{i}.img").write_bytes(data)
    return mount(write_spec(quorum_spec(delay_ms))), data


def evict(path: Path) -> bool:
    """Drop one file's pages from the page cache; False if they stay (tmpfs keeps them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)


def quorum_spec(delay_ms: int = 0) -> str:
    """Three raw children, each behind a `faults` node holding reads `delay_ms`."""
    out = []
    for i in range(3):
        out.append(f'[nodes.c{i}]\ndriver = "raw"\nfilename = "c{i}.img"\n')
        out.append(
            f'[nodes.f{i}]\ndriver = "faults"\nfile = "c{i}"\n'
            f"delay-reads = {'true' if delay_ms else 'false'}\ndelay = {delay_ms}\n"
        )
    out.append('[nodes.q]\ndriver = "quorum"\nvote-threshold = 2\nchildren = ["f0", "f1", "f2"]\n')
    out.append('[disks.vm0]\nnode = "q"\n')
    return "\n".join(out)


def node_stats(m: Mount, node: str) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(m.path("vm0", "nodes", node, "stats").read_text())
    return stats


def dd_read(m: Mount, offset: int, length: int) -> bytes:
    """One O_DIRECT read by dd: a single request reaches the quorum at a time."""
    result = subprocess.run(
        ["dd", f"if={m.path('vm0.img')}", "of=/dev/stdout", f"bs={length}", "count=1",
         f"skip={offset // length}", "iflag=direct", "status=none"],
        capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    return result.stdout


@pytest.mark.mount
@needs("dd")
def test_slow_children_are_read_at_once_not_one_after_another(tmp_path, write_spec, mount):
    m, data = mount_quorum(tmp_path, write_spec, mount, delay_ms=200)
    for i in range(4):
        assert dd_read(m, i * 65536, 65536) == data[i * 65536 : (i + 1) * 65536]
    stats = node_stats(m, "q")
    assert stats["peak_child_reads_in_flight"] == 3, stats
    assert stats["child_reads_in_flight"] == 0
    for i in range(3):
        assert node_stats(m, f"f{i}")["requests_delayed"] >= 4


@pytest.mark.mount
@needs("dd")
def test_cold_children_are_read_at_once(tmp_path, write_spec, mount):
    m, data = mount_quorum(tmp_path, write_spec, mount)
    for i in range(4):
        offset = (2 * i + 1) * MiB
        if not all(evict(tmp_path / f"c{c}.img") for c in range(3)):
            pytest.skip("the page cache of this file system cannot be evicted (tmpfs?)")
        assert dd_read(m, offset, MiB) == data[offset : offset + MiB]
    assert node_stats(m, "q")["peak_child_reads_in_flight"] == 3


@pytest.mark.mount
@needs("dd")
def test_cached_children_agree_and_large_reads_stay_inline(tmp_path, write_spec, mount):
    m, data = mount_quorum(tmp_path, write_spec, mount)
    for i in range(4):
        assert dd_read(m, i * MiB, MiB) == data[i * MiB : (i + 1) * MiB]
    for i in range(3):
        stats = node_stats(m, f"c{i}.file")
        if not stats["nowait_reads"]:
            pytest.skip("this file system has no RWF_NOWAIT reads")
        assert stats["inline_reads"] >= 3  # page-cache hits, one copy each
    status = json.loads(m.path("vm0", "nodes", "q", "status").read_text())
    assert status["state"] == "healthy"
    assert all(c["mismatches"] == 0 for c in status["children"].values())


# -- the host reads a quorum's children take (HostFile.read, no mount) -----------------


@pytest.mark.parametrize("aio", ["threads", "io_uring"])
async def test_large_reads_land_in_bytes_in_one_copy_wherever_the_data_is(tmp_path, aio):
    data = os.urandom(4 * MiB)
    path = tmp_path / "d0.img"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    host = HostFile(fd, "t", aio=aio)
    try:
        got = await host.read(MiB + 5, MiB)
        assert type(got) is bytes and got == data[MiB + 5 : 2 * MiB + 5]
        if not host.statistics()["nowait_reads"]:
            pytest.skip("this file system has no RWF_NOWAIT reads")
        assert host.inline_reads == 1
        # two reads of the same range are two objects: nothing is shared or reused
        again = await host.read(MiB + 5, MiB)
        assert again == got and again is not got
        # past the end: the inline read comes up short, the slow path pads with zeroes
        tail = await host.read(4 * MiB - 1000, ONE_COPY_MIN)
        assert tail == data[-1000:] + bytes(ONE_COPY_MIN - 1000)
        if evict(path):  # not cached: the slow path reads it
            assert await host.read(0, MiB) == data[:MiB]
            assert host.inline_reads == 2
    finally:
        host.close()
        os.close(fd)
