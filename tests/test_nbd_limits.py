"""What NBD clients cannot exhaust: the daemon's memory, its time, its file descriptors.

The memory tests are bounded by design: the daemon's resident memory is
sampled while the hostile clients run, and the daemon is killed (the test
failing) as soon as it passes ABORT_RSS, so a regression costs the machine
at most that much.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from fusedisk.export.nbd import protocol as p
from fusedisk.export.nbd.budget import CONNECTION_BYTES, DAEMON_BYTES
from tests.conftest import make_image, raw_spec
from tests.nbd_helpers import RawClient, Server

pytestmark = [pytest.mark.timeout(120)]

MiB = 1 << 20
ABORT_RSS = 1200 * MiB


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def peak_rss(server: Server, seconds: float) -> int:
    """The daemon's highest resident memory over `seconds`; killed past ABORT_RSS."""
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, rss(server.proc.pid))
        if peak > ABORT_RSS:
            server.proc.kill()
            server.proc.wait()
            raise AssertionError(f"the daemon's memory reached {peak // MiB} MiB; killed")
        time.sleep(0.02)
    return peak


def flood_with_big_reads(sock: Path, requests: int = 64) -> RawClient:
    """A client that pipelines 32 MiB reads and never reads a reply."""
    client = RawClient(sock)
    client.go("vm0")
    client.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for cookie in range(requests):
        client.request(p.CMD_READ, 0, p.MAX_REQUEST, cookie=cookie)
    return client


@pytest.fixture
def served(tmp_path, write_spec):
    make_image(tmp_path / "d0.img", 40 * MiB, b"data")
    server = Server(write_spec(raw_spec()), tmp_path / "nbd.sock")
    try:
        yield server
    finally:
        server.stop(check=server.proc.poll() is None)


def still_serves(server: Server) -> None:
    good = RawClient(server.sock)
    good.go("vm0")
    good.request(p.CMD_READ, 4096, 4096, cookie=7)
    assert good.reply(4096) == (0, 7, b"data" * 1024)
    good.request(p.CMD_DISC, 0, 0)
    good.close()


def test_a_client_that_never_reads_its_replies_pins_a_bounded_memory(served):
    base = rss(served.proc.pid)
    bad = flood_with_big_reads(served.sock)
    grew = peak_rss(served, 3.0) - base
    print(f"one connection: +{grew // MiB} MiB")
    still_serves(served)
    bad.close()
    # two 32 MiB replies in flight, and the copies on their way to the socket
    assert grew < CONNECTION_BYTES + 96 * MiB, f"grew by {grew // MiB} MiB"


def test_many_such_clients_together_stop_at_the_daemons_bound(served):
    base = rss(served.proc.pid)
    bad = [flood_with_big_reads(served.sock, 8) for _ in range(8)]  # 8 x 64 MiB asked
    grew = peak_rss(served, 4.0) - base
    print(f"eight connections: +{grew // MiB} MiB")
    for client in bad:
        client.close()
    still_serves(served)
    assert grew < DAEMON_BYTES + 128 * MiB, f"grew by {grew // MiB} MiB"
