"""Persistent dirty bitmaps in qcow2, judged by QEMU: `qemu-img bitmap` before the mount,
writes through the mount, then `qemu-img info`, `qemu-img check` and `qemu-nbd -B` +
`nbdinfo --map` after it; a SIGKILL leaves them in use, hence inconsistent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli, needs, seed_filters
from tests.nbd_helpers import Server, external_servers, nbd_uri
from tests.qcow2_helpers import KiB, MiB, create, needs_qemu, qemu_img

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120), needs_qemu]

SPEC = """
[nodes.d0]
driver = "qcow2"
filename = "{image}"

[disks.vm0]
node = "d0"
"""

THROTTLED = (
    SPEC.replace('node = "d0"', 'node = "thr"')
    + """
[nodes.thr]
driver = "throttle"
file = "d0"
throttle-group = "g0"

[throttle-groups.g0]
iops-total = 100000
"""
)


def write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def info_bitmaps(image: Path, *extra: str) -> dict[str, dict]:
    out = json.loads(qemu_img("info", *extra, "--output=json", image).stdout)
    found = out.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: b for b in found}


def control(path: Path, text: str) -> None:
    path.write_text(text + "\n")


def extents_file(path: Path) -> list[tuple[int, int]]:
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]  # type: ignore[misc]


def qemu_nbd_map(tmp_path: Path, image: Path, name: str) -> list[tuple[int, int]]:
    """The dirty extents of bitmap `name` as QEMU itself exports them."""
    sock = tmp_path / "qemu-nbd.sock"
    with external_servers() as start:
        start(sock, "qemu-nbd", "-r", "-f", "qcow2", "-B", name, "-k", sock, image)
        return nbdinfo_dirty(f"nbd+unix:///?socket={sock}", name)


def nbdinfo_dirty(uri: str, name: str) -> list[tuple[int, int]]:
    out = subprocess.run(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}", uri],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    dirty = []
    for line in out.stdout.splitlines():
        offset, length, kind = line.split()[:3]
        if int(kind) & 1:
            dirty.append((int(offset), int(length)))
    return dirty


@needs("qemu-nbd", "nbdinfo")
def test_qemu_bitmaps_are_kept_and_updated(tmp_path, write_spec, mount) -> None:
    image = create(tmp_path / "d.qcow2", "64M")
    qemu_img("bitmap", "--add", image, "b0")
    qemu_img("bitmap", "--add", "-g", "128k", image, "b1")
    qemu_img("bitmap", "--add", "--disable", image, "b2")
    m = mount(write_spec(SPEC.format(image=image.name)))
    shown = info_bitmaps(image, "-U")
    assert shown["b0"]["flags"] == ["in-use", "auto"] and shown["b2"]["flags"] == ["in-use"]
    disk = m.path("vm0.img")
    write(disk, 640 * KiB, os.urandom(192 * KiB))
    write(disk, 16000 * KiB, os.urandom(4 * KiB))
    bitmaps = m.path("vm0", "bitmaps")
    ours = extents_file(bitmaps / "b0" / "extents")
    assert ours == [(640 * KiB, 192 * KiB), (16000 * KiB, 64 * KiB)]
    assert (bitmaps / "b0" / "count").read_text() == f"{256 * KiB}\n"
    assert (bitmaps / "b1" / "granularity").read_text() == f"{128 * KiB}\n"
    assert (bitmaps / "b2" / "flags").read_text() == "disabled persistent\n"
    assert extents_file(bitmaps / "b2" / "extents") == []
    b1 = extents_file(bitmaps / "b1" / "extents")
    m.stop()
    shown = info_bitmaps(image)
    assert shown["b0"]["flags"] == ["auto"] and shown["b1"]["granularity"] == 128 * KiB
    assert shown["b2"]["flags"] == []
    ours_info = json.loads(cli("info", "--json", image).stdout)  # fusedisk info agrees
    assert ours_info["format-specific"]["data"]["bitmaps"] == list(shown.values())
    qemu_img("check", image)
    assert qemu_nbd_map(tmp_path, image, "b0") == ours
    assert qemu_nbd_map(tmp_path, image, "b1") == b1
    assert qemu_nbd_map(tmp_path, image, "b2") == []


def test_bitmaps_survive_a_remount_and_clear(tmp_path, write_spec, mount) -> None:
    image = create(tmp_path / "d.qcow2", "16M")
    spec = write_spec(SPEC.format(image=image.name))
    m = mount(spec)
    control(m.path("vm0", "bitmaps", "add"), "b0 persistent")
    control(m.path("vm0", "bitmaps", "add"), "mem 4k")
    write(m.path("vm0.img"), 1 * MiB, b"x" * 100)
    m.stop()
    assert info_bitmaps(image)["b0"]["flags"] == ["auto"]
    m = mount(spec)
    b0 = m.path("vm0", "bitmaps", "b0")
    assert not m.path("vm0", "bitmaps", "mem").exists()  # in memory only
    assert extents_file(b0 / "extents") == [(1 * MiB, 64 * KiB)]
    control(m.path("vm0", "bitmaps", "clear"), "b0")
    write(m.path("vm0.img"), 3 * MiB + 5, b"y")
    assert extents_file(b0 / "extents") == [(3 * MiB, 64 * KiB)]
    metrics = m.path("metrics").read_text()
    assert 'fusedisk_node_bitmap_dirty_bytes{node="d0",bitmap="b0"} 65536' in metrics
    control(m.path("vm0", "bitmaps", "disable"), "b0")
    write(m.path("vm0.img"), 5 * MiB, b"z")
    assert extents_file(b0 / "extents") == [(3 * MiB, 64 * KiB)]
    m.stop()
    assert info_bitmaps(image)["b0"]["flags"] == []
    qemu_img("check", image)


def test_a_crash_leaves_the_bitmap_inconsistent(tmp_path, write_spec, mount) -> None:
    image = create(tmp_path / "d.qcow2", "16M")
    qemu_img("bitmap", "--add", image, "b0")
    spec = write_spec(SPEC.format(image=image.name))
    m = mount(spec)
    write(m.path("vm0.img"), 0, b"a" * 4096)
    m.crash()
    assert "in-use" in info_bitmaps(image)["b0"]["flags"]
    m = mount(spec)
    bitmaps = m.path("vm0", "bitmaps")
    assert (bitmaps / "b0" / "flags").read_text() == "enabled persistent inconsistent\n"
    with pytest.raises(OSError):
        control(bitmaps / "clear", "b0")
    assert "inconsistent" in m.path("last-error").read_text()
    write(m.path("vm0.img"), 4096, b"b" * 4096)
    m.stop()
    assert "in-use" in info_bitmaps(image)["b0"]["flags"]  # still never trusted
    qemu_img("check", image)
    m = mount(spec)
    control(m.path("vm0", "bitmaps", "remove"), "b0")
    m.stop()
    assert info_bitmaps(image) == {}
    qemu_img("check", image)


def test_bitmaps_beside_a_backing_file_and_qemu_merge(tmp_path, write_spec, mount) -> None:
    """Adding the extension moves the backing file name that follows the extensions."""
    create(tmp_path / "base.qcow2", "8M")
    image = create(tmp_path / "top.qcow2", None, backing="base.qcow2")
    spec = write_spec(THROTTLED.format(image=image.name))
    m = mount(spec)
    bitmaps = m.path("vm0", "bitmaps")  # the qcow2 below the throttle
    assert os.path.samefile(bitmaps, m.path("vm0", "nodes", "d0", "bitmaps"))
    control(bitmaps / "add", "a persistent")
    control(bitmaps / "add", "b 512 persistent")
    write(m.path("vm0.img"), 2 * MiB, b"q" * 1000)
    m.stop()
    info = json.loads(qemu_img("info", "--output=json", image).stdout)
    assert info["backing-filename"] == "base.qcow2"
    qemu_img("bitmap", "--add", image, "c")
    qemu_img("bitmap", "--merge", "b", image, "c")
    assert set(info_bitmaps(image)) == {"a", "b", "c"}
    m = mount(spec)
    assert extents_file(bitmaps / "b" / "extents") == [(2 * MiB, 1024)]
    assert extents_file(bitmaps / "c" / "extents") == [(2 * MiB, 64 * KiB)]  # its granularity
    for name in ("a", "b", "c"):
        control(bitmaps / "remove", name)
    m.stop()
    assert info_bitmaps(image) == {}
    info = json.loads(qemu_img("info", "--output=json", image).stdout)
    assert info["backing-filename"] == "base.qcow2"
    qemu_img("check", image)


def test_bad_requests_get_sentences(tmp_path, write_spec, mount) -> None:
    image = create(tmp_path / "d.qcow2", "16M")
    m = mount(write_spec(SPEC.format(image=image.name)))
    bitmaps = m.path("vm0", "bitmaps")
    control(bitmaps / "add", "b0")
    cases = {
        "add": ("b0", "a bitmap named 'b0' exists"),
        "remove": ("nope", "no bitmap named 'nope'"),
        "merge": ("b0", "write 'SRC DST'"),
    }
    for command, (text, message) in cases.items():
        with pytest.raises(OSError):
            control(bitmaps / command, text)
        assert message in m.path("last-error").read_text()
    with pytest.raises(OSError):
        control(m.path("vm0", "nodes", "d0.file", "bitmaps", "add"), "p persistent")
    assert "cannot keep persistent bitmaps" in m.path("last-error").read_text()


@needs("qemu-nbd", "nbdinfo")
def test_nbd_exports_each_bitmap_as_qemu_nbd_does(tmp_path, write_spec, mount) -> None:
    """`mount --nbd` offers qemu:dirty-bitmap:NAME; after unmount, qemu-nbd -B agrees."""
    image = create(tmp_path / "d.qcow2", "32M")
    qemu_img("bitmap", "--add", image, "b0")
    sock = tmp_path / "nbd.sock"
    spec = write_spec(SPEC.format(image=image.name))
    m = mount(spec, extra_args=("--nbd", f"unix:{sock}"))
    control(m.path("vm0", "bitmaps", "add"), "mem 4k")
    for offset, length in [(0, 1), (5 * MiB, 300 * KiB), (31 * MiB, 1 * MiB)]:
        write(m.path("vm0.img"), offset, b"w" * length)
    uri = nbd_uri(sock)
    served = nbdinfo_dirty(uri, "b0")
    assert served == [(0, 64 * KiB), (5 * MiB, 320 * KiB), (31 * MiB, 1 * MiB)]
    assert nbdinfo_dirty(uri, "mem") == [(0, 4 * KiB), (5 * MiB, 300 * KiB), (31 * MiB, 1 * MiB)]
    listed = subprocess.run(["nbdinfo", "--list", "--content", uri], capture_output=True,
                            text=True, timeout=60).stdout  # fmt: skip
    for context in ("base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:mem"):
        assert context in listed
    m.stop()
    assert qemu_nbd_map(tmp_path, image, "b0") == served
    server = Server(spec, tmp_path / "serve.sock")  # after a remount: the same extents
    try:
        assert nbdinfo_dirty(server.uri, "b0") == served
    finally:
        server.stop()


SEED_TREE = seed_filters(["d0", "d1", "d2"]) + "".join(
    f'[nodes.d{i}]\ndriver = "qcow2"\nfilename = "d{i}.qcow2"\n' for i in range(3)
)


@needs("qemu-nbd", "nbdinfo")
def test_bitmaps_below_throttle_luks_and_quorum_see_every_write(
    tmp_path, write_spec, mount
) -> None:
    images = [create(tmp_path / f"d{i}.qcow2", "32M") for i in range(3)]
    for image in images:
        qemu_img("bitmap", "--add", image, "b0")
    (tmp_path / "key").write_bytes(b"bitmap passphrase")
    m = mount(write_spec(SEED_TREE))
    assert os.readlink(m.path("vm0", "bitmaps")) == "nodes/q/bitmaps"
    nodes = m.path("vm0", "nodes")
    before = extents_file(nodes / "d0" / "bitmaps" / "b0" / "extents")  # the luks header
    write(m.path("vm0.img"), 20 * MiB, b"z" * 100)
    after = [extents_file(nodes / f"d{i}" / "bitmaps" / "b0" / "extents") for i in range(3)]
    assert after[0] == after[1] == after[2]
    new = [r for r in after[0] if r not in before]
    assert len(new) == 1 and new[0][0] >= 20 * MiB and new[0][1] == 64 * KiB  # + payload offset
    m.stop()
    for image in images:
        qemu_img("check", image)
        assert qemu_nbd_map(tmp_path, image, "b0") == after[0]


def test_a_grown_disk_keeps_its_bitmaps_at_the_new_size(tmp_path, write_spec, mount) -> None:
    image = create(tmp_path / "d.qcow2", "16M")
    qemu_img("bitmap", "--add", image, "b0")
    m = mount(write_spec(SPEC.format(image=image.name) + "growable = true\n"))
    write(m.path("vm0.img"), 0, b"a")
    os.truncate(m.path("vm0.img"), 48 * MiB)
    write(m.path("vm0.img"), 40 * MiB, b"b")
    assert extents_file(m.path("vm0", "bitmaps", "b0", "extents")) == [
        (0, 64 * KiB), (40 * MiB, 64 * KiB)]  # fmt: skip
    m.stop()
    qemu_img("check", image)
    assert info_bitmaps(image)["b0"]["flags"] == ["auto"]
    assert qemu_nbd_map(tmp_path, image, "b0") == [(0, 64 * KiB), (40 * MiB, 64 * KiB)]


def test_a_snapshot_stores_the_base_bitmaps_cleanly(tmp_path, write_spec, mount) -> None:
    """The base becomes read-only: its bitmaps are stored consistent, as at a close."""
    image = create(tmp_path / "d.qcow2", "16M")
    qemu_img("bitmap", "--add", image, "b0")
    m = mount(write_spec(SPEC.format(image=image.name)))
    write(m.path("vm0.img"), MiB, b"a")
    m.path("vm0", "snapshot").write_text("s1\n")
    assert info_bitmaps(image, "-U")["b0"]["flags"] == ["auto"]
    assert os.readlink(m.path("vm0", "bitmaps")) != "nodes/d0/bitmaps"  # now the overlay's
    write(m.path("vm0.img"), 2 * MiB, b"b")
    assert extents_file(m.path("vm0", "nodes", "d0", "bitmaps", "b0", "extents")) == [
        (MiB, 64 * KiB)]  # fmt: skip
    m.stop()
    qemu_img("check", image)
    assert qemu_nbd_map(tmp_path, image, "b0") == [(MiB, 64 * KiB)]
