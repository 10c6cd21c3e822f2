"""A quorum over three NBD exports, one on each qemu-nbd process: one server dies.

The point of NBD children: siblings that fail independently.  With one server
killed, the disk keeps reading and writing through the two others, the quorum
marks the lost child failed, and `replace` onto a fourth server resyncs it;
afterwards every live server's image equals the others (qemu-img compare).
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.conftest import make_image, needs, read_at, run, write_at
from tests.nbd_helpers import External, external_servers

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120), needs("qemu-nbd", "qemu-img")]

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def servers():
    with external_servers() as start:
        yield start


def quorum_spec(tmp_path, extra: str = "") -> str:
    out = []
    for i in range(4):  # three children and a spare
        out.append(f'[nodes.n{i}]\ndriver = "nbd"\nserver.path = "{tmp_path}/s{i}.sock"\n{extra}')
    out.append('[nodes.q]\ndriver = "quorum"\nvote-threshold = 2\nchildren = ["n0", "n1", "n2"]\n')
    out.append('[disks.vm0]\nnode = "q"\n')
    return "\n".join(out)


def status(m) -> dict:
    return json.loads(m.path("vm0", "nodes", "q", "status").read_text())


def test_a_quorum_of_nbd_servers_survives_one_dying_and_resyncs_a_replacement(
    tmp_path, servers, write_spec, mount
):
    images = [make_image(tmp_path / f"r{i}.img", SIZE) for i in range(4)]
    procs: list[External] = [
        servers(tmp_path / f"s{i}.sock", "qemu-nbd", "-k", tmp_path / f"s{i}.sock", "-f", "raw",
                "--shared=4", "--cache=writeback", images[i])
        for i in range(4)
    ]  # fmt: skip
    m = mount(write_spec(quorum_spec(tmp_path)))
    disk = m.path("vm0.img")
    write_at(disk, 0, b"\x11" * (2 * MiB))

    procs[1].stop()  # one storage server dies
    write_at(disk, 4 * MiB, b"\x22" * MiB)  # the guest sees no error
    assert read_at(disk, 0, 2 * MiB) == b"\x11" * (2 * MiB)
    assert read_at(disk, 4 * MiB, MiB) == b"\x22" * MiB
    st = status(m)
    assert st["children"]["children.1"]["state"] == "failed", st
    assert st["state"] == "degraded" and st["children_in_service"] == 2

    m.path("vm0", "nodes", "q", "replace").write_text("children.1 n3 wait\n")
    deadline = time.monotonic() + 30
    while status(m)["children"].get("children.1", {}).get("node") != "n3":
        assert time.monotonic() < deadline, status(m)
        time.sleep(0.1)
    assert status(m)["state"] == "healthy"
    write_at(disk, 8 * MiB, b"\x33" * MiB)
    m.stop()
    for proc in procs:
        proc.stop()
    for other in (images[2], images[3]):
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", images[0], other)
    assert read_at(images[3], 4 * MiB, 4) == b"\x22" * 4


@needs("fio")
def test_a_frozen_server_is_dropped_after_reconnect_delay_and_fio_verifies(
    tmp_path, servers, write_spec, mount
):
    images = [make_image(tmp_path / f"r{i}.img", SIZE) for i in range(3)]
    procs = [
        servers(tmp_path / f"s{i}.sock", "qemu-nbd", "-k", tmp_path / f"s{i}.sock", "-f", "raw",
                "--shared=4", images[i])
        for i in range(3)
    ]  # fmt: skip
    m = mount(write_spec(quorum_spec(tmp_path, "reconnect-delay = 1\n")))
    assert procs[1].proc is not None
    procs[1].proc.send_signal(signal.SIGSTOP)  # frozen: the connection stays open, silent
    try:
        t0 = time.monotonic()
        run("fio", "--name=verify", f"--filename={m.path('vm0.img')}", "--rw=randwrite",
            "--bs=64k", "--size=8M", "--direct=1", "--ioengine=psync", "--verify=crc32c",
            "--do_verify=1", "--verify_fatal=1",
            "--verify_state_save=0")  # no state file in the working directory  # fmt: skip
        assert time.monotonic() - t0 >= 1  # the first write waited out reconnect-delay
        st = status(m)
        assert st["children"]["children.1"]["state"] == "failed", st
        assert "no reply" in m.log
    finally:
        procs[1].proc.send_signal(signal.SIGCONT)
    m.stop()
    for proc in procs:
        proc.stop()
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", images[0], images[2])
