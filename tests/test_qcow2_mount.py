"""qcow2 through a real FUSE mount: reads match `qemu-img convert`, random writes then
unmount leave an image `qemu-img check` calls clean, and a SIGKILLed daemon loses no
fsync'd write."""

from __future__ import annotations

import contextlib
import os
import random
import signal
from pathlib import Path

import pytest

from tests.qcow2_helpers import (
    KiB,
    MiB,
    assert_clean,
    check,
    create,
    needs_qemu,
    pattern,
    qemu_img,
    qemu_io,
    raw_of,
)

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120), needs_qemu]

SPEC = """
[nodes.d0]
driver = "qcow2"
filename = "{image}"

[disks.vm0]
node = "d0"
"""


def chain(d: Path) -> Path:
    base = create(d / "base.qcow2", "4M", "cluster_size=4k")
    qemu_io(base, "write -P 0x01 0 4m")
    mid = d / "mid.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", base, mid)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "", mid)
    qemu_io(mid, "write -P 0x02 1m 1m")
    top = create(d / "top.qcow2", None, "extended_l2=on", backing="mid.qcow2")
    qemu_io(top, "write -P 0x03 1100k 10k", "write -z 3m 64k")
    return top


def test_reads_through_the_mount_match_qemu(tmp_path, write_spec, mount) -> None:
    top = chain(tmp_path)
    expected = raw_of(top)
    m = mount(write_spec(SPEC.format(image=top.name)))
    assert m.path("vm0.img").read_bytes() == expected
    assert os.readlink(m.path("vm0", "nodes", "d0", "children", "backing")).endswith("d0.backing")


def test_random_writes_through_the_mount_then_unmount(tmp_path, write_spec, mount) -> None:
    base = create(tmp_path / "base.qcow2", "8M")
    qemu_io(base, "write -P 0x61 0 8m")
    image = create(tmp_path / "img.qcow2", None, backing="base.qcow2")
    qemu_io(image, "write -P 0x62 0 1m")
    qemu_img("snapshot", "-c", "s1", image)
    snap = raw_of(image, "-l", "snapshot.name=s1")
    model = bytearray(raw_of(image))
    m = mount(write_spec(SPEC.format(image=image.name)))
    rnd = random.Random(3)
    fd = os.open(m.path("vm0.img"), os.O_RDWR)
    try:
        for i in range(200):
            off = rnd.randrange(8 * MiB)
            n = min(8 * MiB - off, rnd.choice([1, 512, 4096, 65537, 300 * KiB, MiB]))
            data = pattern(i, n)
            os.pwrite(fd, data, off)
            model[off : off + n] = data
            if i % 50 == 49:
                os.fsync(fd)
        assert os.pread(fd, 8 * MiB, 0) == bytes(model)
    finally:
        os.close(fd)
    m.stop()
    assert_clean(image)
    (tmp_path / "model.raw").write_bytes(model)
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", image, tmp_path / "model.raw")
    assert raw_of(image, "-l", "snapshot.name=s1") == snap


def test_sigkill_of_the_daemon_keeps_fsynced_writes(tmp_path, write_spec, mount) -> None:
    image = create(tmp_path / "img.qcow2", "8M")
    m = mount(write_spec(SPEC.format(image=image.name)))
    fd = os.open(m.path("vm0.img"), os.O_RDWR)
    model = bytearray(8 * MiB)
    try:
        for i in range(40):
            off = (i * 211 * KiB) % (6 * MiB)
            data = pattern(i, 40 * KiB)
            os.pwrite(fd, data, off)
            model[off : off + len(data)] = data
            if i % 4 == 3:
                os.fsync(fd)
        os.fsync(fd)
        os.pwrite(fd, b"\xff" * 100 * KiB, 7 * MiB)  # not fsync'd: may or may not survive
        assert m.proc is not None
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait()
    finally:
        with contextlib.suppress(OSError):  # the daemon is gone
            os.close(fd)
    m.stop(check_log=False)
    rc, report = check(image)
    assert rc in (0, 3) and not report.get("corruptions"), report
    assert raw_of(image)[: 7 * MiB] == bytes(model[: 7 * MiB])
