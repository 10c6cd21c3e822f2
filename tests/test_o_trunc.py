"""O_TRUNC on a disk file changes nothing a reader or a later writer sees (issue 25).

mount.md promises "O_TRUNC: ignored, as a block device ignores it".  With the
kernel's atomic O_TRUNC, the kernel itself set the file's size to 0 after such an
open: a QEMU reader with cache=none,aio=native then read zeroes (asynchronous
direct I/O is clipped at the cached size), and `echo x >> vm0.img` wrote at
offset 0.  Both transports are driven with real programs.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest
import trio

from fusedisk.fuse.o_trunc import SizeKeeper
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec
from tests.conftest import make_image, needs, raw_spec, run
from tests.mounting import Mount

MiB = 1 << 20
SIZE = 16 * MiB
PATTERN = b"\xab"

pytestmark = pytest.mark.timeout(90)

TRANSPORTS = pytest.mark.parametrize(
    "transport", [(), ("--transport", "pyfuse3")], ids=["kernel", "pyfuse3"]
)
MOUNT = pytest.mark.mount


class QemuIo:
    """An interactive qemu-io on the disk file: a running VM's direct, native-AIO reads."""

    def __init__(self, image: Path) -> None:
        self.proc = subprocess.Popen(
            ["qemu-io", "-f", "raw", "-t", "none", "-i", "native", str(image)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def read_pattern(self, offset: int, length: int) -> str:
        """Run `read -P`; the lines qemu-io printed for it (a failure says so)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"read -P 0x{PATTERN.hex()} {offset} {length}\n")
        self.proc.stdin.flush()
        lines = []
        while True:
            line = self.proc.stdout.readline()
            assert line, f"qemu-io exited: {''.join(lines)}"
            lines.append(line)
            if "ops/sec" in line or "error" in line.lower():
                return "".join(lines)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=20)


def _mount(tmp_path: Path, mount, write_spec, transport: tuple[str, ...]) -> Mount:
    make_image(tmp_path / "d0.img", SIZE, PATTERN)
    return mount(write_spec(raw_spec()), extra_args=transport)


@needs("qemu-io")
@TRANSPORTS
@MOUNT
def test_o_trunc_does_not_make_a_running_aio_reader_see_zeroes(
    tmp_path, mount, write_spec, transport
) -> None:
    m = _mount(tmp_path, mount, write_spec, transport)
    disk = m.path("vm0.img")
    reader = QemuIo(disk)
    try:
        assert "verification failed" not in reader.read_pattern(0, MiB)
        subprocess.run(["sh", "-c", f": > {disk}"], check=True)  # what dd of= does first
        for offset in (MiB, 0, SIZE - 4096):
            out = reader.read_pattern(offset, 4096 if offset else MiB)
            assert "verification failed" not in out, out
    finally:
        reader.close()
    assert os.path.getsize(disk) == SIZE


@needs("qemu-io")
@TRANSPORTS
@MOUNT
def test_a_truncating_descriptor_held_open_does_not_hide_the_disk(
    tmp_path, mount, write_spec, transport
) -> None:
    """`exec 3> vm0.img` opens with O_TRUNC and keeps the descriptor, sending nothing
    more: within moments (pyfuse3 pushes the size back on timers), readers see the disk."""
    m = _mount(tmp_path, mount, write_spec, transport)
    disk = m.path("vm0.img")
    reader = QemuIo(disk)
    assert "verification failed" not in reader.read_pattern(0, 4096)  # it has the disk open
    held = os.open(disk, os.O_WRONLY | os.O_TRUNC)
    try:
        deadline = time.monotonic() + 5
        while "verification failed" in (out := reader.read_pattern(MiB, 4096)):
            assert time.monotonic() < deadline, out
            time.sleep(0.1)
    finally:
        os.close(held)
        reader.close()


@TRANSPORTS
@MOUNT
def test_an_append_after_o_trunc_is_refused_and_sector_0_stays(
    tmp_path, mount, write_spec, transport
) -> None:
    m = _mount(tmp_path, mount, write_spec, transport)
    disk = m.path("vm0.img")
    result = subprocess.run(["sh", "-c", f": > {disk}; echo x >> {disk}"], capture_output=True)
    assert result.returncode != 0  # the append fails, as on a block device
    fd = os.open(disk, os.O_WRONLY | os.O_TRUNC)
    try:
        os.close(os.open(disk, os.O_WRONLY | os.O_TRUNC))
        appender = os.open(disk, os.O_WRONLY | os.O_APPEND)
        try:
            with pytest.raises(OSError) as e:
                os.write(appender, b"x")
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(appender)
    finally:
        os.close(fd)
    assert os.path.getsize(disk) == SIZE
    # dd without conv=notrunc still writes where it is told
    run("dd", "if=/dev/zero", f"of={disk}", "bs=4k", "count=1", "seek=1", "status=none")
    m.stop()
    image = (tmp_path / "d0.img").read_bytes()
    assert len(image) == SIZE
    assert image[:4096] == PATTERN * 4096  # sector 0 intact
    assert image[4096:8192] == bytes(4096)
    assert image[8192:] == PATTERN * (SIZE - 8192)


@TRANSPORTS
@MOUNT
def test_a_real_truncate_to_zero_is_still_refused(tmp_path, mount, write_spec, transport) -> None:
    """Only the O_TRUNC of an open is ignored: truncate(2) and ftruncate(2) say no."""
    m = _mount(tmp_path, mount, write_spec, transport)
    disk = m.path("vm0.img")
    with pytest.raises(OSError) as e:
        os.truncate(disk, 0)
    assert e.value.errno == errno.EINVAL
    fd = os.open(disk, os.O_RDWR)
    try:
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    assert os.path.getsize(disk) == SIZE


async def test_the_size_keeper_pushes_until_the_handle_is_used(tmp_path) -> None:
    """pyfuse3's side, without a kernel: the disk's last byte is stored (which extends the
    kernel's cached size) on timers after the open, once more at the handle's first
    request, and never after that or after release."""
    make_image(tmp_path / "d0.img", SIZE, PATTERN)
    graph = await Graph.open(parse_spec(raw_spec(), tmp_path / "spec.toml"))
    stored: list[tuple[int, int, bytes]] = []
    try:
        disk = graph.disks["vm0"]
        keeper = SizeKeeper(lambda inode, offset, data: stored.append((inode, offset, data)))
        async with trio.open_nursery() as nursery:
            keeper.opened(nursery, 8, 43, disk)
            keeper.released(8)  # closed before its timers ran: nothing for it
            keeper.opened(nursery, 7, 42, disk)
            with trio.fail_after(10):
                while not stored:  # the timers push with no request at all
                    await trio.sleep(0.01)
            before = len(stored)
            await keeper.before_request(7)
            assert len(stored) > before  # the first request pushes, the open being over
            await trio.sleep(1)  # past every timer (the last is at 0.5 s)
            settled = len(stored)
            await keeper.before_request(7)
            await trio.sleep(0.6)
            assert len(stored) == settled  # used once: no more pushes
        assert set(stored) == {(42, SIZE - 1, PATTERN)}
    finally:
        await graph.close()
