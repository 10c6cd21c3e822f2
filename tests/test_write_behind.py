"""Write-behind: buffered writes acknowledged when queued, written in order by one thread.

The writer's blocking write is the real `pwrite_full`; where a test must hold
writes in the queue, it is the real write behind a gate (a threading.Event),
as a slow device would hold it.  The ENOSPC tests fill a real tmpfs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from fusedisk.hostio.host_file import HostFile, pwrite_full
from fusedisk.hostio.write_behind import WriteBehind
from tests.conftest import cli, raw_spec

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


class GatedWrite:
    """pwrite_full that waits for `gate` first: writes stay queued until the test opens it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls = 0

    def __call__(self, fd: int, data: bytes, offset: int) -> None:
        self.gate.wait(30)
        self.calls += 1
        pwrite_full(fd, data, offset)


def open_file(tmp_path: Path, size: int = 4 * MiB) -> int:
    path = tmp_path / "f.img"
    path.write_bytes(bytes(size))
    return os.open(path, os.O_RDWR)


@contextlib.contextmanager
def gated_queue(tmp_path: Path, **options: int) -> Iterator[tuple[int, GatedWrite, WriteBehind]]:
    """A WriteBehind on a fresh file whose writes wait for the gate; all closed after."""
    fd = open_file(tmp_path)
    gated = GatedWrite()
    behind = WriteBehind(fd, "t", gated, **options)
    try:
        yield fd, gated, behind
    finally:
        gated.gate.set()
        behind.close()
        os.close(fd)


async def test_writes_land_in_order_and_reads_see_them(tmp_path):
    """Overlapping writes in random order: reads (while queued) and the file match a model."""
    fd = open_file(tmp_path, MiB)
    host = HostFile(fd, "t")
    model = bytearray(MiB)
    rng = random.Random(7)
    try:
        for i in range(400):
            off = rng.randrange(0, MiB - 8192)
            data = bytes([i & 0xFF]) * rng.randrange(1, 8192)
            await host.write(off, data)
            model[off : off + len(data)] = data
            if i % 7 == 0:
                probe = rng.randrange(0, MiB - 16384)
                assert await host.read(probe, 16384) == bytes(model[probe : probe + 16384])
        await host.drain()
        assert host.behind is not None and host.behind.queued == 400
        assert os.pread(fd, MiB, 0) == bytes(model)
    finally:
        host.close()
        os.close(fd)


async def test_a_read_of_a_queued_write_waits_for_it(tmp_path):
    with gated_queue(tmp_path) as (fd, gated, behind):
        await behind.write(4096, b"new" * 100)
        assert behind.busy
        read_done = trio.Event()

        async def reader() -> None:
            await behind.before_read(4000, 200)
            read_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await behind.before_read(MiB, 4096)  # no overlap: no wait
            await trio.sleep(0.05)
            assert not read_done.is_set()  # overlaps the queued write: held
            gated.gate.set()
        assert os.pread(fd, 300, 4096) == b"new" * 100


async def test_a_full_queue_holds_the_next_write(tmp_path):
    with gated_queue(tmp_path, max_bytes=64 * 1024) as (fd, gated, behind):
        for i in range(16):
            await behind.write(i * 4096, b"a" * 4096)  # 64 KiB: all queued at once
        assert behind.waits == 0
        with trio.move_on_after(0.1) as held:
            await behind.write(16 * 4096, b"b" * 4096)
        assert held.cancelled_caught  # the 17th waits for room
        gated.gate.set()
        await behind.write(16 * 4096, b"b" * 4096)
        await behind.drain()
        assert os.pread(fd, 17 * 4096, 0) == b"a" * 65536 + b"b" * 4096
        assert behind.waits >= 1


async def test_mutable_buffers_are_copied_before_they_are_acknowledged(tmp_path):
    with gated_queue(tmp_path) as (fd, gated, behind):
        buf = bytearray(b"x" * 4096)
        await behind.write(0, buf)
        buf[:] = b"y" * 4096  # as luks reuses its output buffer
        gated.gate.set()
        await behind.drain()
        assert os.pread(fd, 4096, 0) == b"x" * 4096


async def test_close_with_queued_writes_still_writes_them(tmp_path):
    """The writer's own descriptor: the file may be closed while writes are queued."""
    fd = open_file(tmp_path)
    gated = GatedWrite()
    behind = WriteBehind(fd, "t", gated)
    await behind.write(0, b"z" * 4096)
    behind.close()
    os.close(fd)
    gated.gate.set()
    for _ in range(100):
        if gated.calls:
            break
        await trio.sleep(0.01)
    await trio.sleep(0.05)
    assert (tmp_path / "f.img").read_bytes()[:4096] == b"z" * 4096


# -- a real ENOSPC ----------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_a_failed_write_fails_the_file_and_names_the_offset(tmp_path):
    with small_tmpfs(tmp_path / "small", "1M") as small:
        path = small / "sparse.img"
        with open(path, "wb") as f:
            f.truncate(8 * MiB)
        fd = os.open(path, os.O_RDWR)
        host = HostFile(fd, "file:d0", where=f"node 'd0': '{path}'")
        try:
            with pytest.raises(OSError) as failed:  # at a later write, or at the flush
                for i in range(32):  # 2 MiB into a 1 MiB file system
                    await host.write(i * 65536, os.urandom(65536))
                await host.fdatasync()
            assert failed.value.errno == errno.ENOSPC
            assert f"node 'd0': '{path}': a write of 65536 bytes at offset" in str(failed.value)
            with pytest.raises(OSError):  # sticky: later writes are refused too
                await host.write(0, b"x" * 512)
        finally:
            host.close()
            os.close(fd)


async def test_after_enospc_a_read_sees_the_write_or_fails(tmp_path):
    """Issue 25: a read of an acknowledged write that was then dropped returned the
    old bytes with no error.  Every range must read back as written, or fail."""
    with small_tmpfs(tmp_path / "small", "1M") as small:
        path = small / "sparse.img"
        with open(path, "wb") as f:
            f.truncate(8 * MiB)
        fd = os.open(path, os.O_RDWR)
        host = HostFile(fd, "file:d0", where=f"node 'd0': '{path}'")
        try:
            written = []
            for i in range(32):  # 2 MiB into a 1 MiB file system
                data = os.urandom(65536)
                try:
                    await host.write(i * 65536, data)
                except OSError:
                    break  # the failure reached a later write: the rest is refused
                written.append(data)
            with contextlib.suppress(OSError):
                await host.drain()
            failed = 0
            for i, data in enumerate(written):
                try:
                    assert await host.read(i * 65536, 65536) == data, f"stale read at {i}"
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    assert "acknowledged but never written" in str(e)
                    failed += 1
            assert failed >= 1
            assert await host.read(0, 4096) == written[0][:4096]  # what landed still reads
        finally:
            host.close()
            os.close(fd)


def _direct_buffer(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


@pytest.mark.mount
@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", [(), ("--transport", "pyfuse3")], ids=["kernel", "pyfuse3"])
def test_after_enospc_the_guest_reads_its_writes_or_an_error(
    tmp_path, mount, write_spec, transport
):
    """Through the mount, with O_DIRECT as a VM does: writes acknowledged, the host
    file system full; each range reads back as written or fails, never stale."""
    with small_tmpfs(tmp_path / "small", "1M") as small:
        image = small / "d0.img"
        with open(image, "wb") as f:
            f.truncate(8 * MiB)
        m = mount(write_spec(raw_spec(str(image))), extra_args=transport)
        fd = os.open(m.path("vm0.img"), os.O_RDWR | os.O_DIRECT)
        try:
            written = []
            for i in range(32):
                data = os.urandom(65536)
                try:
                    os.pwrite(fd, _direct_buffer(data), i * 65536)
                except OSError:
                    break
                written.append(data)
            failed = 0
            for i, data in enumerate(written):
                buf = mmap.mmap(-1, 65536)
                try:
                    assert os.preadv(fd, [buf], i * 65536) == 65536
                    assert bytes(buf) == data, f"stale read of the write at {i * 65536}"
                except OSError as e:
                    assert e.errno in (errno.ENOSPC, errno.EIO)
                    failed += 1
            assert failed >= 1
        finally:
            with contextlib.suppress(OSError):  # the close's flush reports the failure
                os.close(fd)
        assert "acknowledged but never written" in m.log
        m.stop()


@pytest.mark.mount
@pytest.mark.timeout(90)
def test_enospc_behind_the_mount_reaches_the_guest_at_its_flush(tmp_path, mount, write_spec):
    """dd with conv=fsync into a disk whose host file system fills up: dd fails, the
    daemon lives on, and `status` names the node."""
    with small_tmpfs(tmp_path / "small", "1M") as small:
        image = small / "d0.img"
        with open(image, "wb") as f:
            f.truncate(8 * MiB)
        spec = write_spec(f'[nodes.d0]\ndriver = "raw"\nfilename = "{image}"\n'
                          '[disks.vm0]\nnode = "d0"\n')  # fmt: skip
        m = mount(spec)
        result = subprocess.run(
            ["dd", "if=/dev/urandom", f"of={m.path('vm0.img')}", "bs=64k", "count=32",
             "conv=fsync,notrunc", "oflag=direct"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode != 0
        assert "No space left on device" in result.stderr or "Input/output error" in result.stderr
        # the daemon still answers, and the disk's first bytes read back
        with open(m.path("vm0.img"), "rb") as f:
            assert len(f.read(4096)) == 4096
        assert cli("status", m.mountpoint).returncode == 0
        m.stop()


@pytest.mark.mount
@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", [(), ("--transport", "pyfuse3")], ids=["kernel", "pyfuse3"])
def test_closing_the_disk_file_puts_its_writes_in_the_host_file(
    tmp_path, mount, write_spec, transport
):
    """close(2) flushes, as QEMU's FUSE export does: once dd (no fsync) has exited, the
    host file holds what it wrote, while the disk is still mounted."""
    image = tmp_path / "d0.img"
    image.write_bytes(bytes(4 * MiB))
    m = mount(write_spec(raw_spec(str(image))), extra_args=transport)
    data = os.urandom(2 * MiB)
    (tmp_path / "data").write_bytes(data)
    result = subprocess.run(
        ["dd", f"if={tmp_path / 'data'}", f"of={m.path('vm0.img')}", "bs=64k", "seek=16",
         "conv=notrunc", "oflag=direct", "status=none"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert image.read_bytes()[MiB : 3 * MiB] == data
    stats = json.loads(m.path("vm0", "nodes", "d0.file", "stats").read_text())
    assert stats["write_behind_queued"] >= 32 and stats["write_behind_queued_bytes"] == 0
    assert stats["flush"]["ops"] >= 1  # dd never called fsync: the close flushed


async def test_a_write_after_a_full_queue_emptied_meanwhile_goes_straight_in(tmp_path):
    with gated_queue(tmp_path, max_bytes=16 * 1024) as (fd, gated, behind):
        for i in range(4):
            await behind.write(i * 4096, b"c" * 4096)  # full
        gated.gate.set()
        while behind.busy:  # the writer empties it; nobody has looked yet
            await trio.sleep(0.01)
        await behind.write(4 * 4096, b"d" * 4096)
        await behind.drain()
        assert os.pread(fd, 5 * 4096, 0) == b"c" * 16384 + b"d" * 4096


async def test_a_page_stays_held_while_a_later_write_to_it_is_queued(tmp_path):
    """Two writes in one page: once the first is written, a read of the page still
    waits for the second."""
    fd = open_file(tmp_path)
    one_at_a_time = threading.Semaphore(0)

    def write_all(fd: int, data: bytes, offset: int) -> None:
        one_at_a_time.acquire(timeout=30)
        pwrite_full(fd, data, offset)

    behind = WriteBehind(fd, "t", write_all)
    try:
        await behind.write(0, b"1" * 1024)
        await behind.write(2048, b"2" * 1024)
        one_at_a_time.release()  # the first lands
        while behind._done < 1:
            await trio.sleep(0.01)
        with trio.move_on_after(0.1) as held:
            await behind.before_read(0, 4096)
        assert held.cancelled_caught  # the second is still queued in that page
        one_at_a_time.release()
        await behind.before_read(0, 4096)
        assert os.pread(fd, 3072, 0) == b"1" * 1024 + bytes(1024) + b"2" * 1024
    finally:
        one_at_a_time.release()
        behind.close()
        os.close(fd)
