"""The fault-injection node: errors, corruption and dropped writes, as ruled, and only those."""

from __future__ import annotations

import errno
import json
import mmap
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from fusedisk.errors import ControlError, IOFailure, OpenError, to_errno
from fusedisk.filters.faults.node import FaultsNode, parse_errno
from fusedisk.graph.graph import Graph
from fusedisk.graph.registry import drivers
from fusedisk.spec import parse_spec
from tests.memory_node import MemoryDriver

pytestmark = pytest.mark.timeout(30)

SIZE = 1 << 20
PATTERN = bytes(range(256)) * (SIZE // 256)


async def open_faults(tmp_path: Path, rule: str = "") -> tuple[Graph, FaultsNode]:
    (tmp_path / "d0.img").write_bytes(PATTERN)
    text = f"""
[nodes.f0]
driver = "file"
filename = "d0.img"

[nodes.flt]
driver = "faults"
file = "f0"
{rule}

[disks.vm0]
node = "flt"
"""
    graph = await Graph.open(parse_spec(text, tmp_path / "spec.toml"))
    node = graph.nodes["flt"]
    assert isinstance(node, FaultsNode)
    return graph, node


async def test_without_a_rule_everything_passes(tmp_path):
    graph, _ = await open_faults(tmp_path)
    disk = graph.disks["vm0"]
    assert await disk.read(0, SIZE) == PATTERN
    await disk.write(0, b"x" * 4096)
    await disk.flush()
    assert await disk.read(0, 4096) == b"x" * 4096
    await graph.close()


async def test_read_error_in_a_range_only(tmp_path):
    graph, node = await open_faults(
        tmp_path, "error-reads = true\nrange-start = 8192\nrange-length = 4096"
    )
    disk = graph.disks["vm0"]
    assert await disk.read(0, 8192) == PATTERN[:8192]
    assert await disk.read(12288, 4096) == PATTERN[12288:16384]
    with pytest.raises(IOFailure) as info:
        await disk.read(8192 + 100, 10)
    assert to_errno(info.value) == errno.EIO
    assert "node 'flt': injected EIO on read at 8292+10" in str(info.value)
    with pytest.raises(IOFailure):
        await disk.read(4096, 8192)  # overlapping the range fails as a whole
    await disk.write(8192, b"w" * 4096)  # writes are not ruled
    assert node.driver_stats()["errors_injected"] == 2
    await graph.close()


async def test_errno_by_name_and_other_kinds(tmp_path):
    graph, _ = await open_faults(
        tmp_path, 'error-writes = true\nerror-flushes = true\nerrno = "ENOSPC"'
    )
    disk = graph.disks["vm0"]
    with pytest.raises(IOFailure) as info:
        await disk.write(0, b"a" * 512)
    assert to_errno(info.value) == errno.ENOSPC
    with pytest.raises(IOFailure, match="ENOSPC on flush"):
        await disk.flush()
    assert await disk.read(0, 512) == PATTERN[:512]  # the write did not happen
    await graph.close()


async def test_discard_and_zeroes_rules(tmp_path):
    graph, _ = await open_faults(tmp_path, "error-discards = true\nerror-zeroes = true")
    root = graph.disks["vm0"].root
    with pytest.raises(IOFailure, match="on discard"):
        await root.discard(0, 4096)
    with pytest.raises(IOFailure, match="on write-zeroes"):
        await root.write_zeroes(0, 4096)
    await graph.close()


async def test_after_n_operations(tmp_path):
    graph, _ = await open_faults(tmp_path, "error-reads = true\nafter = 3")
    disk = graph.disks["vm0"]
    for _ in range(3):
        await disk.read(0, 512)
    with pytest.raises(IOFailure):
        await disk.read(0, 512)
    await graph.close()


async def test_max_errors_limits_the_number_of_faults(tmp_path):
    graph, _ = await open_faults(tmp_path, "error-reads = true\nmax-errors = 2")
    disk = graph.disks["vm0"]
    for _ in range(2):
        with pytest.raises(IOFailure):
            await disk.read(0, 512)
    assert await disk.read(0, 512) == PATTERN[:512]
    await graph.close()


async def test_probability_is_reproducible_with_a_seed(tmp_path):
    async def outcomes(sub: str) -> list[bool]:
        d = tmp_path / sub
        d.mkdir()
        graph, _ = await open_faults(d, "error-reads = true\nprobability = 0.3\nseed = 42")
        disk = graph.disks["vm0"]
        out = []
        for _ in range(200):
            try:
                await disk.read(0, 512)
                out.append(True)
            except IOFailure:
                out.append(False)
        await graph.close()
        return out

    first, second = await outcomes("a"), await outcomes("b")
    assert first == second
    assert 30 < first.count(False) < 90  # about 60 of 200


async def test_corrupt_reads_flip_one_bit_per_sector_in_the_range(tmp_path):
    graph, node = await open_faults(
        tmp_path, "corrupt-reads = true\nrange-start = 4096\nrange-length = 2048\nseed = 1"
    )
    disk = graph.disks["vm0"]
    data = await disk.read(0, 16384)
    diff = [i for i in range(len(data)) if data[i] != PATTERN[i]]
    assert len(diff) == 4  # 2048 bytes = 4 sectors, one bit each
    assert all(4096 <= i < 6144 for i in diff)
    assert all(bin(data[i] ^ PATTERN[i]).count("1") == 1 for i in diff)
    # the image itself is untouched
    node.options["corrupt-reads"] = False
    assert await disk.read(0, 16384) == PATTERN[:16384]
    await graph.close()


async def test_drop_writes_keeps_the_part_outside_the_range(tmp_path):
    graph, node = await open_faults(
        tmp_path, "drop-writes = true\nrange-start = 4096\nrange-length = 4096"
    )
    disk = graph.disks["vm0"]
    await disk.write(0, b"z" * 12288)  # succeeds
    back = await disk.read(0, 12288)
    assert back[:4096] == b"z" * 4096
    assert back[4096:8192] == PATTERN[4096:8192]  # silently dropped
    assert back[8192:] == b"z" * 4096
    assert node.driver_stats()["writes_dropped"] == 1
    await graph.close()


async def test_rule_changed_at_run_time_through_options_takes_effect(tmp_path):
    graph, node = await open_faults(tmp_path)
    disk = graph.disks["vm0"]
    assert "error-reads" in node.runtime_options()
    await node.set_option("error-reads", "true\n")
    with pytest.raises(IOFailure):
        await disk.read(0, 512)
    await node.set_option("errno", "EROFS")
    with pytest.raises(IOFailure) as info:
        await disk.read(0, 512)
    assert to_errno(info.value) == errno.EROFS
    with pytest.raises(ControlError, match="option 'errno'"):
        await node.set_option("errno", "ENOTANERROR")
    await node.set_option("error-reads", "false")
    assert await disk.read(0, 512) == PATTERN[:512]
    await graph.close()


async def test_rules_control_file(tmp_path):
    graph, node = await open_faults(tmp_path)
    disk = graph.disks["vm0"]
    rules = node.controls()["rules"]
    assert "error-reads = false" in rules.read()
    assert rules.write is not None
    await rules.write("error-writes=true range-start=512K range-length=0 errno=EIO after=1")
    text = rules.read()
    assert "error-writes = true" in text and "after = 1" in text
    assert "range-start = 524288" in text
    await disk.write(0, b"q" * 512)  # below the range
    await disk.write(SIZE // 2, b"q" * 512)  # the first one in the range passes
    with pytest.raises(IOFailure):
        await disk.write(SIZE - 512, b"q" * 512)
    await rules.write("clear")
    assert "error-writes = false" in rules.read()
    with pytest.raises(ControlError, match="expected key=value"):
        await rules.write("explode")
    with pytest.raises(ControlError, match="option 'probability'"):
        await rules.write("probability=2")
    await graph.close()


async def test_rules_control_counts_after_from_the_change(tmp_path):
    graph, node = await open_faults(tmp_path)
    disk = graph.disks["vm0"]
    for _ in range(5):
        await disk.read(0, 512)
    write = node.controls()["rules"].write
    assert write is not None
    await write("error-reads=true,after=2")
    await disk.read(0, 512)
    await disk.read(0, 512)
    with pytest.raises(IOFailure):
        await disk.read(0, 512)
    await graph.close()


async def test_a_bad_errno_in_the_spec_is_refused(tmp_path):
    with pytest.raises(OpenError, match="node 'flt': option 'errno'"):
        await open_faults(tmp_path, 'errno = "EWHAT"')


def test_parse_errno():
    assert parse_errno("EIO") == errno.EIO
    assert parse_errno("enospc") == errno.ENOSPC
    assert parse_errno(str(errno.EPERM)) == errno.EPERM


# -- through a real mount --------------------------------------------------------------------

MOUNT_SPEC = """
[nodes.flt]
driver = "faults"
file = { driver = "raw", filename = "d0.img" }
error-reads = true
range-start = "1M"
range-length = "64K"

[nodes.other]
driver = "raw"
filename = "d1.img"

[disks.vm0]
node = "flt"
[disks.vm1]
node = "other"
"""


def _pread(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    finally:
        os.close(fd)


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_injected_errors_reach_the_reader_and_rules_change_at_run_time(tmp_path, write_spec, mount):
    (tmp_path / "d0.img").write_bytes(PATTERN * 4)
    (tmp_path / "d1.img").write_bytes(PATTERN * 4)
    m = mount(write_spec(MOUNT_SPEC))
    disk = m.path("vm0.img")
    with pytest.raises(OSError) as info:
        _pread(disk, SIZE, 4096)
    assert info.value.errno == errno.EIO
    assert _pread(disk, 0, 4096) == PATTERN[:4096]  # outside the range
    assert _pread(m.path("vm1.img"), SIZE, 4096) == PATTERN[:4096]  # another disk
    node = m.path("vm0", "nodes", "flt")
    (node / "options" / "errno").write_text("ENOSPC\n")
    with pytest.raises(OSError) as info:
        _pread(disk, SIZE, 4096)
    assert info.value.errno == errno.ENOSPC
    (node / "rules").write_text("error-reads=false corrupt-reads=true seed=7\n")
    corrupted = _pread(disk, SIZE, 4096)
    assert corrupted != PATTERN[:4096] and len(corrupted) == 4096
    (node / "rules").write_text("clear\n")
    assert _pread(disk, SIZE, 4096) == PATTERN[:4096]
    assert "error-reads = false" in (node / "rules").read_text()
    stats = json.loads((node / "stats").read_text())
    assert stats["errors_injected"] == 2 and stats["reads_corrupted"] == 1
    with pytest.raises(OSError) as info:
        (node / "rules").write_text("nonsense\n")
    assert info.value.errno == errno.EINVAL


async def open_delayed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rule: str) -> Graph:
    """faults over a memory node: on the mock clock, a delay is exact."""
    monkeypatch.setitem(drivers(), "memory", MemoryDriver)
    text = f'[nodes.m]\ndriver = "memory"\n[nodes.flt]\ndriver = "faults"\nfile = "m"\n{rule}\n'
    return await Graph.open(parse_spec(text + '[disks.vm0]\nnode = "flt"\n', tmp_path / "s.toml"))


async def test_delay_holds_ruled_requests_and_only_those(tmp_path, monkeypatch, autojump_clock):
    graph = await open_delayed(
        tmp_path, monkeypatch, "delay-reads = true\ndelay = 2000\nrange-length = 4096"
    )
    disk = graph.disks["vm0"]
    finished: dict[str, float] = {}

    async def timed(name: str, op: Any) -> None:
        await op
        finished[name] = trio.current_time()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timed, "ruled read", disk.read(0, 512))
        nursery.start_soon(timed, "read elsewhere", disk.read(8192, 512))
        nursery.start_soon(timed, "write", disk.write(0, b"w" * 512))
        nursery.start_soon(timed, "flush", disk.flush())
    assert finished["ruled read"] - start == pytest.approx(2.0)
    for name in ("read elsewhere", "write", "flush"):
        assert finished[name] == start
    stats = graph.nodes["flt"].driver_stats()
    assert stats["requests_delayed"] == 1
    await graph.close()


async def test_delay_then_error_and_the_counters_apply(tmp_path, monkeypatch, autojump_clock):
    rule = "delay-writes = true\ndelay = 500\nerror-writes = true\nafter = 1\nmax-errors = 1"
    graph = await open_delayed(tmp_path, monkeypatch, rule)
    disk = graph.disks["vm0"]
    start = trio.current_time()
    await disk.write(0, b"a" * 512)  # `after`: passes at once
    assert trio.current_time() == start
    with pytest.raises(IOFailure, match="injected EIO on write"):
        await disk.write(0, b"b" * 512)
    assert trio.current_time() - start == pytest.approx(0.5)
    await disk.write(0, b"c" * 512)  # max-errors reached: neither delayed nor failed
    assert trio.current_time() - start == pytest.approx(0.5)
    node = graph.nodes["flt"]
    assert isinstance(node, FaultsNode)
    await node.controls()["rules"].write("clear delay-flushes=true delay=250")
    await disk.flush()
    assert trio.current_time() - start == pytest.approx(0.75)
    assert "delay = 250" in node.controls()["rules"].read()
    await graph.close()


async def test_a_delayed_request_is_cancelled_like_any_wait(tmp_path, monkeypatch, autojump_clock):
    graph = await open_delayed(tmp_path, monkeypatch, "delay-reads = true\ndelay = 60000")
    with trio.move_on_after(1) as scope:
        await graph.disks["vm0"].read(0, 512)
    assert scope.cancelled_caught
    await graph.close()
