"""rbd disks through a real mount, against the session's Ceph cluster: interop with QEMU's
own rbd driver and `rbd export` both ways, and what a stopped OSD does."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
import time

import pytest

from tests.conftest import make_image, needs, read_at, run, write_at
from tests.mounting import MountError

pytestmark = [pytest.mark.mount, pytest.mark.timeout(150), needs("qemu-io", "fio")]

MiB = 1 << 20


def rbd_node(name: str, conf: str, pool: str, image: str, extra: str = "") -> str:
    return f"""
[nodes.{name}]
driver = "rbd"
pool = "{pool}"
image = "{image}"
conf = "{conf}"
{extra}
"""


def test_fusedisk_writes_qemu_and_rbd_export_read(ceph, tmp_path, write_spec, mount):
    image = ceph.new_image(size="16M")
    spec = write_spec(rbd_node("r", ceph.conf, "rbd", image) + '[disks.vm0]\nnode = "r"\n')
    m = mount(spec)
    data = os.urandom(2 * MiB)
    write_at(m.path("vm0.img"), 3 * MiB, data)
    write_at(m.path("vm0.img"), 8 * MiB, b"\x5a" * MiB)
    run("dd", f"if={m.path('vm0.img')}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none")
    # while fusedisk holds the image: QEMU reads it (reads need no lock)
    run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5a 8M 1M", "-c", "read -P 0 12M 4M",
        ceph.qemu_name("rbd", image))  # fmt: skip
    exported = ceph.export("rbd", image, tmp_path / "export.raw")
    assert exported[3 * MiB : 5 * MiB] == data
    assert exported[8 * MiB : 9 * MiB] == b"\x5a" * MiB
    assert m.path("vm0.img").stat().st_size == 16 * MiB
    m.stop()


def test_qemu_writes_fusedisk_reads(ceph, tmp_path, write_spec, mount):
    image = ceph.new_image(size="16M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xc3 1M 3M", "-c", "write -P 0x11 15M 1M",
        ceph.qemu_name("rbd", image))  # fmt: skip
    spec = write_spec(rbd_node("r", ceph.conf, "rbd", image) + '[disks.vm0]\nnode = "r"\n')
    m = mount(spec)
    assert read_at(m.path("vm0.img"), 1 * MiB, 3 * MiB) == b"\xc3" * 3 * MiB
    assert read_at(m.path("vm0.img"), 15 * MiB, MiB) == b"\x11" * MiB
    assert read_at(m.path("vm0.img"), 0, MiB) == bytes(MiB)
    # QEMU cannot write while the mount holds the exclusive lock
    result = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x22 0 4k", ceph.qemu_name("rbd", image)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Read-only file system" in result.stdout + result.stderr
    m.stop()


def test_a_stopped_osd_with_an_op_timeout_gives_eio_in_bounded_time(ceph, write_spec, mount):
    image = ceph.new_image(pool="p0", size="16M")
    spec = write_spec(
        rbd_node("r", ceph.conf, "p0", image, "rados-options = { rados_osd_op_timeout = 5 }")
        + '[disks.vm0]\nnode = "r"\n'
    )
    # data in an object librbd has not cached: its read must reach the OSD
    run("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 4k", ceph.qemu_name("p0", image))
    m = mount(spec)
    with ceph.stopped_osd(0):
        started = time.monotonic()
        fd = os.open(m.path("vm0.img"), os.O_RDONLY | os.O_DIRECT)
        try:
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        assert e.value.errno == errno.EIO
        assert time.monotonic() - started < 15
    # the OSD is back: the disk serves again
    assert read_at(m.path("vm0.img"), 0, 4096) == b"a" * 4096
    m.stop()


def test_without_a_timeout_requests_wait_and_other_disks_serve(ceph, tmp_path, write_spec, mount):
    image = ceph.new_image(pool="p0", size="16M")
    make_image(tmp_path / "local.img", 4 * MiB, b"L")
    spec = write_spec(
        rbd_node("r", ceph.conf, "p0", image)
        + '[disks.vm0]\nnode = "r"\n'
        + '[nodes.local]\ndriver = "raw"\nfilename = "local.img"\n[disks.vm1]\nnode = "local"\n'
    )
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 4M 4k", ceph.qemu_name("p0", image))
    m = mount(spec)
    got: list[bytes] = []
    with ceph.stopped_osd(0):
        reader = threading.Thread(
            target=lambda: got.append(read_at(m.path("vm0.img"), 4 * MiB, 4096)), daemon=True
        )
        reader.start()
        time.sleep(3)
        assert reader.is_alive() and not got  # waiting for the OSD
        assert read_at(m.path("vm1.img"), 0, MiB) == b"L" * MiB  # the other disk serves
        stats = m.path("vm0", "nodes", "r", "stats").read_text()
        assert "in_flight" in stats
    reader.join(timeout=60)
    assert got == [b"\x77" * 4096]
    m.stop()


QUORUM = """
[nodes.q]
driver = "quorum"
children = ["r0", "r1", "r2"]
vote-threshold = 2

[disks.vm0]
node = "q"
"""


def test_a_quorum_over_three_pools_serves_with_one_osd_stopped(ceph, write_spec, mount):
    images = [ceph.new_image(pool=f"p{i}", size="32M") for i in range(3)]
    nodes = "".join(
        rbd_node(f"r{i}", ceph.conf, f"p{i}", images[i],
                 "rados-options = { rados_osd_op_timeout = 4 }")
        for i in range(3)
    )  # fmt: skip
    m = mount(write_spec(nodes + QUORUM))
    fio = ["fio", "--name=v", f"--filename={m.path('vm0.img')}", "--size=8M", "--bs=64k",
           "--ioengine=psync", "--direct=1", "--verify=crc32c", "--verify_fatal=1",
           "--verify_state_save=0"]  # fmt: skip
    with ceph.stopped_osd(1):
        out = run(*fio, "--rw=randwrite", "--do_verify=1")
        assert "err= 0" in out
    # the OSD is back: what was written while it was stopped reads back right
    assert "err= 0" in run(*fio, "--rw=randwrite", "--verify_only=1")
    status = json.loads(m.path("vm0", "nodes", "q", "status").read_text())
    stopped = status["children"]["children.1"]  # left service, its error counted
    assert stopped["state"] == "failed" and stopped["write_errors"] >= 1, status
    for other in ("children.0", "children.2"):
        assert status["children"][other]["state"] == "healthy", status
    m.stop()
    # the two children that stayed hold the same bytes
    a = ceph.export("p0", images[0], m.mountpoint.parent / "a.raw")
    b = ceph.export("p2", images[2], m.mountpoint.parent / "b.raw")
    assert a == b


def test_rbd_snapshots_through_the_control_file(ceph, write_spec, mount):
    image = ceph.new_image(size="8M")
    spec = write_spec(rbd_node("r", ceph.conf, "rbd", image) + '[disks.vm0]\nnode = "r"\n')
    m = mount(spec)
    control = m.path("vm0", "nodes", "r", "snapshots")
    write_at(m.path("vm0.img"), 0, b"A" * MiB)
    control.write_text("create before\n")
    write_at(m.path("vm0.img"), 0, b"B" * MiB)
    assert control.read_text().split("\t")[0] == "before"
    assert "before" in ceph.rbd("snap", "ls", f"rbd/{image}")
    control.write_text("rollback before\n")  # the disk drained meanwhile
    assert read_at(m.path("vm0.img"), 0, MiB) == b"A" * MiB
    with pytest.raises(OSError) as e:
        control.write_text("remove nosuch\n")
    assert e.value.errno == errno.ENOENT
    control.write_text("remove before\n")
    assert control.read_text() == ""
    m.stop()


def test_a_missing_image_fails_the_mount_with_one_sentence(ceph, write_spec, mount):
    spec = write_spec(rbd_node("r", ceph.conf, "rbd", "nosuch") + '[disks.vm0]\nnode = "r"\n')
    with pytest.raises(MountError) as e:
        mount(spec)
    assert "node 'r': no image 'rbd/nosuch'" in str(e.value)
    assert "Traceback" not in str(e.value)


def test_a_growable_disk_resizes_its_image(ceph, write_spec, mount):
    image = ceph.new_image(size="8M")
    spec = write_spec(
        rbd_node("r", ceph.conf, "rbd", image) + '[disks.vm0]\nnode = "r"\ngrowable = true\n'
    )
    m = mount(spec)
    os.truncate(m.path("vm0.img"), 24 * MiB)
    assert m.path("vm0.img").stat().st_size == 24 * MiB
    write_at(m.path("vm0.img"), 20 * MiB, b"g" * 4096)
    assert "size 24 MiB" in ceph.rbd("info", f"rbd/{image}")
    m.stop()
