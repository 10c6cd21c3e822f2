"""The seed's tree: throttle -> luks -> quorum -> 3 x qcow2 -> 3 x file, snapshotted
while mounted.  The overlays go in below the quorum, one per sibling; throttle,
luks and quorum stay on top."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import needs, read_at, run, write_at
from tests.test_quorum_mount import SEED_TREE

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180), needs("qemu-img", "fio")]

MiB = 1 << 20


@pytest.fixture
def seed(tmp_path, write_spec):
    for i in range(3):
        run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / f"d{i}.qcow2"), "32M")
    (tmp_path / "key").write_bytes(b"seed tree passphrase")
    return write_spec(SEED_TREE)


def test_snapshot_puts_one_overlay_per_sibling_below_the_filters(tmp_path, seed, mount):
    m = mount(seed)
    before = os.urandom(MiB)
    write_at(m.path("vm0.img"), 0, before)
    m.path("vm0", "snapshot").write_text("s1\n")

    nodes = m.path("vm0", "nodes")
    link = lambda *p: os.readlink(nodes.joinpath(*p))  # noqa: E731
    assert os.readlink(m.path("vm0", "root")) == "nodes/thr"
    assert link("thr", "children", "file") == "../../crypt"
    assert link("crypt", "children", "file") == "../../q"
    for i in range(3):
        assert link("q", "children", f"children.{i}") == f"../../d{i}.s1"
        assert link(f"d{i}.s1", "children", "backing") == f"../../d{i}"
        assert sorted(os.listdir(nodes / f"d{i}.s1" / "siblings")) == sorted(
            f"d{j}.s1" for j in range(3) if j != i
        )
    # The bases are frozen now: keep copies to compare with at the end.
    for i in range(3):
        shutil.copy(tmp_path / f"d{i}.qcow2", tmp_path / f"copy{i}.qcow2")

    after = os.urandom(MiB)
    write_at(m.path("vm0.img"), 4 * MiB, after)
    assert read_at(m.path("vm0.img"), 0, MiB) == before  # the disk reads the union
    assert read_at(m.path("vm0.img"), 4 * MiB, MiB) == after
    status = json.loads(m.path("vm0", "nodes", "q", "status").read_text())
    assert status["state"] == "healthy"
    m.stop()

    for i in range(3):
        overlay = tmp_path / f"d{i}.s1.qcow2"
        chain = json.loads(run("qemu-img", "info", "--output=json", "--backing-chain",
                               str(overlay)))  # fmt: skip
        assert [os.path.basename(c["filename"]) for c in chain] == [overlay.name, f"d{i}.qcow2"]
        assert chain[0]["backing-filename-format"] == "qcow2"
        run("qemu-img", "check", "-q", str(overlay))
        run("qemu-img", "check", "-q", str(tmp_path / f"d{i}.qcow2"))
        # Data written before the snapshot stayed in the base, untouched since.
        run("qemu-img", "compare", "-q", str(tmp_path / f"copy{i}.qcow2"),
            str(tmp_path / f"d{i}.qcow2"))  # fmt: skip
    # Only ciphertext below luks: the plaintext is in no image file.
    assert before[:4096] not in (tmp_path / "d0.qcow2").read_bytes()

    m2 = mount(seed, name="mnt2")
    assert read_at(m2.path("vm0.img"), 0, MiB) == before
    assert read_at(m2.path("vm0.img"), 4 * MiB, MiB) == after


def test_snapshot_while_fio_writes_loses_nothing(tmp_path, seed, mount):
    m = mount(seed)
    fio = subprocess.Popen(
        ["fio", "--name=w", f"--filename={m.path('vm0.img')}", "--rw=write", "--bs=64k",
         "--size=12M", "--rate=6m", "--verify=crc32c", "--do_verify=1", "--fsync=16",
         "--verify_state_save=0", "--ioengine=psync"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        time.sleep(0.8)
        m.path("vm0", "snapshot").write_text("during\n")
        out, _ = fio.communicate(timeout=120)
    finally:
        fio.kill()
    assert fio.returncode == 0, out
    assert "err= 0" in out
    assert (tmp_path / "d1.during.qcow2").exists()


def test_a_snapshot_that_fails_for_one_sibling_changes_nothing(tmp_path, seed, mount):
    # d2 lives in a folder where no overlay can be created.
    (tmp_path / "locked").mkdir()
    (tmp_path / "d2.qcow2").rename(tmp_path / "locked" / "d2.qcow2")
    seed.write_text(seed.read_text().replace('"d2.qcow2"', '"locked/d2.qcow2"'))
    m = mount(seed)
    write_at(m.path("vm0.img"), 0, b"x" * 4096)
    subprocess.run(["chattr", "+i", str(tmp_path / "locked")], check=True)
    try:
        with pytest.raises(OSError):
            m.path("vm0", "snapshot").write_text("s1\n")
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / "locked")], check=True)
    assert not list(tmp_path.glob("*.s1.qcow2")), "created overlays must be removed"
    assert os.readlink(m.path("vm0", "nodes", "q", "children", "children.0")) == "../../d0"
    assert sorted(os.listdir(m.path("vm0", "nodes"))) == [
        "crypt",
        "d0",
        "d0.file",
        "d1",
        "d1.file",
        "d2",
        "d2.file",
        "q",
        "thr",
    ]
    assert read_at(m.path("vm0.img"), 0, 4096) == b"x" * 4096
    write_at(m.path("vm0.img"), 8192, b"y" * 4096)  # still writable
