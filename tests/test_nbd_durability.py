"""A write an NBD client saw acknowledged survives the daemon's death, however the client left.

nbd.md promises that once a client has exited its data is in the host files.
A client that exits without NBD_CMD_DISC does not wait for anything: the
daemon may not even have read the end of its stream when it is killed.  So
the reply to a write must mean the data has left the daemon (it is in the
host file's page cache), as qemu-nbd's does.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from fusedisk.export.nbd import protocol as p
from tests.conftest import make_image, needs, raw_spec
from tests.nbd_helpers import RawClient, Server

pytestmark = [pytest.mark.timeout(120)]

MiB = 1 << 20
SIZE = 64 * MiB


@pytest.fixture
def served(tmp_path, write_spec):
    make_image(tmp_path / "d0.img", SIZE)
    server = Server(write_spec(raw_spec()), tmp_path / "nbd.sock")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait()


def killed_at_once(server: Server) -> None:
    server.proc.kill()
    server.proc.wait()


def test_acknowledged_writes_survive_a_kill_right_after_a_client_hangs_up(served, tmp_path):
    client = RawClient(served.sock)
    client.go("vm0")
    pattern = [bytes([0x41 + i]) * (4 * MiB) for i in range(8)]
    for i, data in enumerate(pattern):  # pipelined, acknowledged, no flush
        client.request(p.CMD_WRITE, i * 4 * MiB, len(data), cookie=i, payload=data)
    assert sorted(client.reply()[1] for _ in pattern) == list(range(len(pattern)))
    client.close()  # no NBD_CMD_DISC
    killed_at_once(served)
    with open(tmp_path / "d0.img", "rb") as f:
        for i, data in enumerate(pattern):
            assert f.read(len(data)) == data, f"write {i} was acknowledged and lost"


@needs("nbdsh")
def test_nbdsh_writes_survive_a_kill_right_after_it_exits(served, tmp_path):
    # nbdsh runs the system python3 (its nbd module); a venv first on PATH hides it
    env = {**os.environ, "PATH": f"/usr/bin:/bin:{os.environ.get('PATH', '')}"}
    script = "h.pwrite(b'\\x5a' * (32 << 20), 0)"
    nbdsh = shutil.which("nbdsh", path=env["PATH"])
    subprocess.run([nbdsh, "-u", served.uri, "-c", script], env=env, check=True, timeout=60)
    killed_at_once(served)
    with open(tmp_path / "d0.img", "rb") as f:
        assert f.read(32 * MiB) == b"\x5a" * (32 * MiB)
