"""Data through a real mount of a raw disk: what qemu-io, dd, losetup and mkfs see."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pytest

from tests.conftest import make_image, needs, raw_spec, run

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

MiB = 1 << 20


@needs("qemu-io")
def test_qemu_io_patterns_through_the_mount_match_the_host_file(tmp_path, write_spec, mount):
    image = make_image(tmp_path / "d0.img", 16 * MiB)
    m = mount(write_spec(raw_spec()))
    disk = str(m.path("vm0.img"))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 3583 70001",
        "-c", "write -P 0x11 16760832 16384", "-c", "flush", disk)  # fmt: skip
    out = run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 3583", "-c", "read -P 0xa5 3583 70001",
              "-c", "read -P 0x11 16760832 16384", disk)  # fmt: skip
    assert "Pattern verification failed" not in out
    # The host file holds exactly the same bytes, read without the mount.
    out = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0xa5 3583 70001",
              "-c", "read -P 0x11 16760832 16384", str(image))  # fmt: skip
    assert "Pattern verification failed" not in out


@needs("dd")
def test_o_direct_dd_round_trips(tmp_path, write_spec, mount):
    make_image(tmp_path / "d0.img", 8 * MiB)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(4 * MiB))
    m = mount(write_spec(raw_spec()))
    disk = str(m.path("vm0.img"))
    run("dd", f"if={src}", f"of={disk}", "bs=1M", "oflag=direct", "conv=notrunc,fsync", "seek=2")
    back = tmp_path / "back"
    run("dd", f"if={disk}", f"of={back}", "bs=64k", "iflag=direct", "skip=32", "count=64")
    assert back.read_bytes() == src.read_bytes()
    assert (tmp_path / "d0.img").read_bytes()[2 * MiB : 6 * MiB] == src.read_bytes()


def test_fsync_reaches_the_host_file_before_it_returns(tmp_path, write_spec, mount):
    image = make_image(tmp_path / "d0.img", 4 * MiB)
    m = mount(write_spec(raw_spec()))
    data = os.urandom(65536)
    fd = os.open(m.path("vm0.img"), os.O_RDWR)
    try:
        os.pwrite(fd, data, 12345)
        stats = json.loads(m.path("vm0", "nodes", "d0.file", "stats").read_text())
        flushes_before = stats["flush"]["ops"]
        os.fsync(fd)
        stats = json.loads(m.path("vm0", "nodes", "d0.file", "stats").read_text())
        assert stats["flush"]["ops"] == flushes_before + 1  # fdatasync on the host file ran
        m.crash()  # with the file still open: not even the flush of its close may be needed
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert image.read_bytes()[12345 : 12345 + 65536] == data


@needs("losetup", "mkfs.ext4", "fsck.ext4", "mount")
def test_ext4_on_a_loop_device_of_the_disk_is_clean(tmp_path, write_spec, mount):
    make_image(tmp_path / "d0.img", 64 * MiB)
    m = mount(write_spec(raw_spec()))
    loop = run("losetup", "--find", "--show", str(m.path("vm0.img"))).strip()
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    try:
        run("mkfs.ext4", "-q", "-F", loop)
        run("mount", loop, str(fsdir))
        try:
            payload = os.urandom(3 * MiB + 17)
            for i in range(5):
                (fsdir / f"file{i}").write_bytes(payload[i:])
            os.sync()
        finally:
            run("umount", str(fsdir))
        run("fsck.ext4", "-f", "-n", loop)
        run("mount", "-o", "ro", loop, str(fsdir))
        try:
            assert (fsdir / "file3").read_bytes() == payload[3:]
        finally:
            run("umount", str(fsdir))
    finally:
        subprocess.run(["losetup", "-d", loop])
    run("fsck.ext4", "-f", "-n", str(tmp_path / "d0.img"))


def test_reads_past_the_end_are_short_and_writes_past_it_fail(tmp_path, write_spec, mount):
    make_image(tmp_path / "d0.img", MiB, b"\x07")
    m = mount(write_spec(raw_spec()))
    fd = os.open(m.path("vm0.img"), os.O_RDWR)
    try:
        assert os.pread(fd, 100, MiB - 10) == b"\x07" * 10
        assert os.pread(fd, 100, MiB) == b""
        with pytest.raises(OSError) as err:
            os.pwrite(fd, b"x" * 20, MiB - 10)
        assert err.value.errno == 28  # ENOSPC, as a block device says
    finally:
        os.close(fd)


def test_read_only_disk_refuses_writers(tmp_path, write_spec, mount):
    make_image(tmp_path / "d0.img", MiB)
    m = mount(write_spec(raw_spec(disk_options="read-only = true")))
    assert os.stat(m.path("vm0.img")).st_mode & 0o777 == 0o400
    with pytest.raises(OSError) as err:
        os.open(m.path("vm0.img"), os.O_RDWR)
    assert err.value.errno == 30  # EROFS


def test_mode_and_owner_come_from_the_spec(tmp_path, write_spec, mount):
    make_image(tmp_path / "d0.img", MiB)
    m = mount(write_spec(raw_spec(disk_options="mode = 0o640\nuid = 1234\ngid = 99")))
    st = os.stat(m.path("vm0.img"))
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 1234, 99)
    assert st.st_size == MiB


def test_detect_zeroes_unmap_frees_space_in_the_host_file(tmp_path, write_spec, mount):
    image = make_image(tmp_path / "d0.img", 8 * MiB, b"\xff")
    os.sync()
    m = mount(write_spec(raw_spec(disk_options='detect-zeroes = "unmap"')))
    blocks_before = os.stat(image).st_blocks
    fd = os.open(m.path("vm0.img"), os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(4 * MiB), 2 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    freed = blocks_before - os.stat(image).st_blocks
    assert freed > 0.9 * (4 * MiB // 512)  # the host fs may keep a few blocks of metadata
    data = image.read_bytes()
    assert data[2 * MiB : 6 * MiB] == bytes(4 * MiB)
    assert data[: 2 * MiB] == b"\xff" * (2 * MiB)
    stats = json.loads(m.path("vm0", "stats").read_text())
    assert stats["zero_writes_detected"] >= 1


def test_two_disks_in_one_mount_are_independent(tmp_path, write_spec, mount):
    make_image(tmp_path / "a.img", MiB, b"a")
    make_image(tmp_path / "b.img", 2 * MiB, b"b")
    spec = write_spec(
        """
[nodes.a]
driver = "raw"
filename = "a.img"
[nodes.b]
driver = "raw"
file = { driver = "file", filename = "b.img" }
offset = 4096
size = "1M"
[disks.one]
node = "a"
[disks.two]
node = "b"
"""
    )
    m = mount(spec)
    assert m.path("one.img").read_bytes() == b"a" * MiB
    assert m.path("two.img").stat().st_size == MiB
    with open(m.path("two.img"), "r+b") as f:
        f.write(b"X" * 10)
    assert (tmp_path / "b.img").read_bytes()[4096 : 4096 + 11] == b"X" * 10 + b"b"


def test_the_connection_allows_many_background_requests(tmp_path, write_spec, mount):
    # Throttled disks hold requests; the kernel's default of 12 outstanding
    # background requests per mount would let them starve their neighbours.
    from fusedisk.fuse.connection import FUSECTL, MAX_BACKGROUND, connection_id

    make_image(tmp_path / "d0.img", MiB)
    m = mount(write_spec(raw_spec()))
    minor = connection_id(m.mountpoint)
    assert minor is not None
    assert (FUSECTL / str(minor) / "max_background").read_text() == f"{MAX_BACKGROUND}\n"


def test_a_growable_disk_grows_with_truncate_and_never_shrinks(tmp_path, write_spec, mount):
    image = make_image(tmp_path / "d0.img", MiB)
    m = mount(write_spec(raw_spec(disk_options="growable = true")))
    disk = m.path("vm0.img")
    os.truncate(disk, 3 * MiB)
    assert disk.stat().st_size == 3 * MiB and image.stat().st_size == 3 * MiB
    with open(disk, "r+b") as f:
        f.seek(3 * MiB - 5)
        f.write(b"tail!")
    assert image.read_bytes()[-5:] == b"tail!"
    with pytest.raises(OSError):
        os.truncate(disk, MiB)
    assert image.stat().st_size == 3 * MiB


def test_a_fixed_disk_refuses_to_change_size(tmp_path, write_spec, mount):
    make_image(tmp_path / "d0.img", MiB)
    m = mount(write_spec(raw_spec()))
    os.truncate(m.path("vm0.img"), MiB)  # the same size is fine (O_TRUNC of a full write)
    with pytest.raises(OSError):
        os.truncate(m.path("vm0.img"), 2 * MiB)
    assert (tmp_path / "d0.img").stat().st_size == MiB
