"""Discard and holes through the mount, checked with tools we did not write.

fallocate(1), blkdiscard and fstrim on a loop device, qemu-io's discard,
`qemu-img map` and `cp --sparse`: each must see the disk file behave as a
thin-provisioned disk does, and the qcow2 image under it must shrink on the
host and stay clean for `qemu-img check`.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
from pathlib import Path

import pytest

from fusedisk.hostio.host_file import fallocate
from tests.conftest import make_image, needs, raw_spec, read_at, run
from tests.qcow2_helpers import MiB, assert_clean, create, needs_qemu, qemu_img

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180)]

QCOW2_SPEC = """
[nodes.d0]
driver = "qcow2"
filename = "d0.qcow2"

[disks.vm0]
node = "d0"
"""


def host_bytes(path: Path) -> int:
    """Space the host really gives the file (what `du` shows)."""
    return os.stat(path).st_blocks * 512


def fill(path: Path, offset: int, length: int, byte: int = 0xA5) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        buf.write(bytes([byte]) * length)
        os.pwrite(fd, buf, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def qemu_map(path: Path) -> list[dict]:
    out = run("qemu-img", "map", "-f", "raw", "--output=json", path)
    return json.loads(out)


@needs("fallocate")
def test_punch_hole_and_zero_range_on_a_raw_disk(tmp_path, write_spec, mount) -> None:
    image = make_image(tmp_path / "d0.img", 64 * MiB)
    m = mount(write_spec(raw_spec()))
    disk = m.path("vm0.img")
    fill(disk, 0, 16 * MiB)
    before = host_bytes(image)
    run("fallocate", "--punch-hole", "--offset", str(1 * MiB), "--length", str(4 * MiB), disk)
    run("fallocate", "--zero-range", "--offset", str(8 * MiB), "--length", str(4096), disk)
    assert read_at(disk, 1 * MiB, 4 * MiB) == bytes(4 * MiB)
    assert read_at(disk, 8 * MiB, 4096) == bytes(4096)
    assert read_at(disk, 8 * MiB + 4096, 4096) == b"\xa5" * 4096
    assert read_at(disk, 0, 4096) == b"\xa5" * 4096
    assert host_bytes(image) <= before - 4 * MiB  # the host file gave the space back
    # the unwritten tail and the punched range are holes for qemu-img map
    holes = [(e["start"], e["length"]) for e in qemu_map(disk) if not e["data"]]
    assert (1 * MiB, 4 * MiB) in holes
    assert any(start <= 16 * MiB and start + n == 64 * MiB for start, n in holes)


@needs("fallocate")
def test_fallocate_modes_a_file_would_refuse(tmp_path, write_spec, mount) -> None:
    make_image(tmp_path / "d0.img", 8 * MiB)
    m = mount(write_spec(raw_spec()))
    disk = m.path("vm0.img")
    fill(disk, 0, 1 * MiB)
    fd = os.open(disk, os.O_RDWR)  # fallocate(2) itself: glibc's posix_fallocate writes zeroes
    try:
        fallocate(fd, 0, 0, 1 * MiB)  # data already: allocated, so success
        with pytest.raises(OSError) as e:
            fallocate(fd, 0, 4 * MiB, 1 * MiB)  # a hole cannot be reserved in a raw file
        assert e.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as e:
            fallocate(fd, 0, 7 * MiB, 2 * MiB)  # past the end of a fixed-size disk
        assert e.value.errno in (errno.EFBIG, errno.EOPNOTSUPP)
    finally:
        os.close(fd)
    # punching past the end frees what is inside and succeeds, as on a file
    run("fallocate", "--punch-hole", "--offset", str(7 * MiB), "--length", str(4 * MiB), disk)
    assert os.path.getsize(disk) == 8 * MiB


@needs("fallocate")
def test_a_read_only_disk_refuses_punch_hole(tmp_path, write_spec, mount) -> None:
    make_image(tmp_path / "d0.img", 1 * MiB)
    m = mount(write_spec(raw_spec(disk_options="read-only = true")))
    result = subprocess.run(
        ["fallocate", "--punch-hole", "--offset", "0", "--length", "4096", m.path("vm0.img")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0  # opened read-only: EBADF from the kernel, or EROFS


@needs_qemu
@needs("fallocate")
def test_punch_hole_frees_qcow2_clusters_and_the_image_stays_clean(
    tmp_path, write_spec, mount
) -> None:
    image = create(tmp_path / "d0.qcow2", "64M", "cluster_size=64k")
    m = mount(write_spec(QCOW2_SPEC))
    disk = m.path("vm0.img")
    fill(disk, 0, 32 * MiB)
    before = host_bytes(image)
    run("fallocate", "--punch-hole", "--offset", str(4 * MiB), "--length", str(16 * MiB), disk)
    assert read_at(disk, 4 * MiB, 16 * MiB) == bytes(16 * MiB)
    holes = [(e["start"], e["length"]) for e in qemu_map(disk) if not e["data"]]
    assert (4 * MiB, 16 * MiB) in holes
    m.stop()
    assert host_bytes(image) <= before - 15 * MiB
    assert_clean(image)
    qemu_map_of_image = json.loads(run("qemu-img", "map", "--output=json", image))
    assert not any(e["data"] and e["start"] == 4 * MiB for e in qemu_map_of_image)


@needs_qemu
def test_qemu_io_discard_through_a_raw_view_of_the_disk_frees_qcow2_clusters(
    tmp_path, write_spec, mount
) -> None:
    image = create(tmp_path / "d0.qcow2", "32M", "cluster_size=64k")
    m = mount(write_spec(QCOW2_SPEC))
    disk = m.path("vm0.img")
    fill(disk, 0, 16 * MiB)
    before = host_bytes(image)
    opts = f"driver=raw,file.driver=file,file.filename={disk},discard=unmap"
    run("qemu-io", "--image-opts", opts, "-c", f"discard 0 {8 * MiB}")
    assert read_at(disk, 0, 8 * MiB) == bytes(8 * MiB)
    m.stop()
    assert host_bytes(image) <= before - 7 * MiB
    assert_clean(image)


@needs_qemu
@needs("losetup", "blkdiscard", "mkfs.ext4", "fstrim", "mount", "umount")
def test_blkdiscard_and_fstrim_on_a_loop_device_free_qcow2_space(
    tmp_path, write_spec, mount
) -> None:
    image = create(tmp_path / "d0.qcow2", "256M", "cluster_size=64k")
    m = mount(write_spec(QCOW2_SPEC))
    loop = run("losetup", "--find", "--show", m.path("vm0.img")).strip()
    fs_dir = tmp_path / "fs"
    fs_dir.mkdir()
    mounted_fs = False
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop)
        run("mount", loop, fs_dir)
        mounted_fs = True
        big = fs_dir / "big"
        with open(big, "wb") as f:
            for _ in range(64):
                f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())
        os.unlink(big)
        subprocess.run(["sync"])
        grown = host_bytes(image)
        run("fstrim", fs_dir)
        run("umount", fs_dir)
        mounted_fs = False
        trimmed = host_bytes(image)
        assert trimmed <= grown - 48 * MiB, (grown, trimmed)
        run("blkdiscard", loop)
        subprocess.run(["sync"])
    finally:
        if mounted_fs:
            subprocess.run(["umount", fs_dir])
        subprocess.run(["losetup", "-d", loop])
    m.stop()
    assert host_bytes(image) < 4 * MiB  # all clusters gone: metadata only
    assert_clean(image)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", image, _zeroes(tmp_path, 256 * MiB))


def _zeroes(tmp_path: Path, size: int) -> Path:
    return make_image(tmp_path / "zeroes.raw", size)


@needs_qemu
def test_cp_sparse_makes_a_sparse_copy_and_map_shows_the_holes(tmp_path, write_spec, mount) -> None:
    create(tmp_path / "d0.qcow2", "128M", "cluster_size=64k")
    m = mount(write_spec(QCOW2_SPEC))
    disk = m.path("vm0.img")
    fill(disk, 10 * MiB, 1 * MiB)
    copy = tmp_path / "copy.raw"
    run("cp", "--sparse=always", disk, copy)
    assert host_bytes(copy) <= 2 * MiB
    assert read_at(copy, 10 * MiB, 4096) == b"\xa5" * 4096
    data = [(e["start"], e["length"]) for e in qemu_map(disk) if e["data"]]
    assert data == [(10 * MiB, 1 * MiB)]
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 10 * MiB
        assert os.lseek(fd, 10 * MiB, os.SEEK_HOLE) == 11 * MiB
        with pytest.raises(OSError) as e:
            os.lseek(fd, 12 * MiB, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
    finally:
        os.close(fd)
