"""External snapshots through a real mount: overlays go in below the filters."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import needs, run, write_at

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120), needs("qemu-img", "qemu-io")]

MiB = 1 << 20

SPEC = """
[nodes.d0]
driver = "qcow2"
filename = "images/d0.qcow2"

[disks.vm0]
node = "d0"
"""


def qemu_img(*args: str) -> str:
    return run("qemu-img", *args)


def pattern_write(path, offset: int, length: int, byte: int) -> None:
    write_at(path, offset, bytes([byte]) * length)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(folder / "d0.qcow2"), "16M")
    return folder


def test_snapshot_inserts_an_overlay_and_keeps_old_data_in_the_base(
    tmp_path, images, write_spec, mount
):
    m = mount(write_spec(SPEC))
    disk = m.path("vm0.img")
    pattern_write(disk, 0, MiB, 0xAA)
    pattern_write(disk, 4 * MiB, MiB, 0xBB)
    m.path("vm0", "snapshot").write_text("s1\n")

    overlay = images / "d0.s1.qcow2"
    assert overlay.exists()
    nodes = m.path("vm0", "nodes")
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0.s1"
    assert (nodes / "d0.s1" / "children" / "backing").resolve() == (nodes / "d0").resolve()
    assert (nodes / "d0" / "parents" / "d0.s1").exists()
    assert (nodes / "d0.s1" / "driver").read_text() == "qcow2\n"
    assert "s1\t" in m.path("vm0", "snapshot").read_text()

    pattern_write(disk, 4 * MiB, MiB, 0xCC)  # after the snapshot: goes to the overlay
    with open(disk, "rb") as f:
        data = f.read(6 * MiB)
    assert data[:MiB] == b"\xaa" * MiB and data[4 * MiB : 5 * MiB] == b"\xcc" * MiB
    m.stop()

    info = json.loads(qemu_img("info", "--output=json", "--backing-chain", str(overlay)))
    assert [os.path.basename(i["filename"]) for i in info] == ["d0.s1.qcow2", "d0.qcow2"]
    assert info[0]["backing-filename"] == "d0.qcow2"  # relative to the overlay's folder
    qemu_img("check", str(overlay))
    qemu_img("check", str(images / "d0.qcow2"))
    # The base still holds exactly the data from before the snapshot.
    out = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0xbb 4M 1M", "-c", "read -P 0xaa 0 1M",
         str(images / "d0.qcow2")], capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "Pattern verification failed" not in out and out.count("read 1048576") == 2


def test_the_disk_reopens_on_the_newest_layer_after_remount_and_crash(
    tmp_path, images, write_spec, mount
):
    spec = write_spec(SPEC)
    m = mount(spec)
    m.path("vm0", "snapshot").write_text("s1\n")
    pattern_write(m.path("vm0.img"), 0, MiB, 0x42)
    m.crash()
    assert (tmp_path / "spec.toml.state.json").exists()
    assert spec.read_text() == SPEC  # the user's spec is never rewritten
    m2 = mount(spec, name="mnt2")
    assert os.readlink(m2.path("vm0", "root")) == "nodes/d0.s1"
    with open(m2.path("vm0.img"), "rb") as f:
        assert f.read(MiB) == b"\x42" * MiB
    m2.path("vm0", "snapshot").write_text("s2\n")
    assert (images / "d0.s2.qcow2").exists()
    m2.stop()
    m3 = mount(spec, name="mnt3")
    assert os.readlink(m3.path("vm0", "root")) == "nodes/d0.s2"
    names = [line.split("\t")[0] for line in m3.path("vm0", "snapshot").read_text().splitlines()]
    assert names == ["s1", "s2"]


def test_a_failing_snapshot_changes_nothing_and_the_writer_sees_the_error(
    tmp_path, images, write_spec, mount
):
    m = mount(write_spec(SPEC))
    subprocess.run(["chattr", "+i", str(images)], check=True)
    try:
        with pytest.raises(OSError) as err:
            m.path("vm0", "snapshot").write_text("s1\n")
        assert err.value.errno == errno.EINVAL
    finally:
        subprocess.run(["chattr", "-i", str(images)], check=True)
    assert sorted(p.name for p in images.iterdir()) == ["d0.qcow2"]
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0"
    assert not (tmp_path / "spec.toml.state.json").exists()
    assert "snapshot 's1' failed" in m.log
    pattern_write(m.path("vm0.img"), 0, 4096, 1)  # the disk still works


def test_snapshot_names_are_checked(tmp_path, images, write_spec, mount):
    m = mount(write_spec(SPEC))
    with pytest.raises(OSError):
        m.path("vm0", "snapshot").write_text("a/b\n")
    m.path("vm0", "snapshot").write_text("ok\n")
    with pytest.raises(OSError):
        m.path("vm0", "snapshot").write_text("ok\n")  # names are unique per spec


def test_check_shows_the_recorded_overlays_and_writes_nothing(tmp_path, images, write_spec, mount):
    spec = write_spec(SPEC)
    m = mount(spec)
    m.path("vm0", "snapshot").write_text("s1\n")
    m.stop()
    files = sorted(images.iterdir())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    result = subprocess.run([sys.executable, "-m", "fusedisk", "check", str(spec)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "d0.s1 (qcow2" in result.stdout and "backing: d0 (qcow2" in result.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
