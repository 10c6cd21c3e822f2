"""The seed tree on Ceph: throttle -> luks -> quorum -> 3 x rbd (one pool, one OSD each),
snapshotted while mounted (qcow2 overlays in the spec's folder, below the quorum, whose
headers name their rbd images as QEMU does), then committed back into rbd."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import needs, read_at, run, seed_filters, write_at

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180), needs("qemu-img", "fio")]

MiB = 1 << 20

TOP = seed_filters(["r0", "r1", "r2"])


def control(m, name: str, text: str = "") -> None:
    m.path("vm0", name).write_text(f"{text}\n")


def test_snapshot_below_the_quorum_over_rbd_then_commit_back(ceph, tmp_path, write_spec, mount):
    images = [ceph.new_image(pool=f"p{i}", size="48M", prefix="seed") for i in range(3)]
    nodes = "".join(
        f'[nodes.r{i}]\ndriver = "rbd"\npool = "p{i}"\nimage = "{images[i]}"\n'
        f'conf = "{ceph.conf}"\n\n'
        for i in range(3)
    )
    (tmp_path / "key").write_bytes(b"seed tree passphrase")
    spec = write_spec(TOP + nodes)
    m = mount(spec)
    disk = m.path("vm0.img")
    before = os.urandom(2 * MiB)
    write_at(disk, 0, before)
    control(m, "snapshot", "s1")
    links = m.path("vm0", "nodes", "q", "children")
    for i in range(3):
        assert os.readlink(links / f"children.{i}") == f"../../r{i}.s1"
        overlay = tmp_path / f"r{i}.s1.qcow2"
        chain = json.loads(run("qemu-img", "info", "--output=json", "--backing-chain",
                               "-U", str(overlay)))  # fmt: skip
        assert chain[0]["backing-filename"].startswith(f"rbd:p{i}/{images[i]}:conf=")
        assert chain[1]["virtual-size"] == 48 * MiB  # QEMU opened the rbd image
    # the rbd images are frozen now: what they hold is the snapshot's
    frozen = [ceph.export(f"p{i}", images[i], tmp_path / f"frozen{i}.raw") for i in range(3)]
    assert frozen[0] == frozen[1] == frozen[2]

    after = os.urandom(3 * MiB)
    write_at(disk, 5 * MiB, after)
    fio = run("fio", "--name=v", f"--filename={disk}", "--offset=12M", "--size=6M",
              "--bs=64k", "--rw=randwrite", "--ioengine=psync", "--direct=1",
              "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0")  # fmt: skip
    assert "err= 0" in fio
    for i in range(3):  # the writes went to the overlays, not to rbd
        assert ceph.export(f"p{i}", images[i], tmp_path / f"still{i}.raw") == frozen[i]

    control(m, "commit", "s1")
    control(m, "job", "wait")
    assert json.loads(m.path("vm0", "job").read_text())["state"] == "done"
    for i in range(3):
        assert os.readlink(links / f"children.{i}") == f"../../r{i}"
        assert not (tmp_path / f"r{i}.s1.qcow2").exists()
    content = read_at(disk, 0, disk.stat().st_size)
    assert content[: 2 * MiB] == before
    assert content[5 * MiB : 8 * MiB] == after
    m.stop()

    # committed into rbd: the three images agree (QEMU's compare and rbd export)
    names = [ceph.qemu_name(f"p{i}", images[i]) for i in range(3)]
    for i in (1, 2):
        run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", names[0], names[i])
    exports = [ceph.export(f"p{i}", images[i], tmp_path / f"done{i}.raw") for i in range(3)]
    assert exports[0] == exports[1] == exports[2] != frozen[0]
    assert before[:4096] not in exports[0]  # ciphertext only below luks

    m2 = mount(spec, name="mnt2")
    assert read_at(m2.path("vm0.img"), 0, 8 * MiB) == content[: 8 * MiB]
    assert "err= 0" in run("fio", "--name=v", f"--filename={m2.path('vm0.img')}",
                           "--offset=12M", "--size=6M", "--bs=64k", "--rw=randwrite",
                           "--ioengine=psync", "--direct=1", "--verify=crc32c",
                           "--verify_only=1", "--verify_state_save=0")  # fmt: skip
