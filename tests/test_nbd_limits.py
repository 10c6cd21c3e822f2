"""What NBD clients cannot exhaust: the daemon's memory, its time, its file descriptors.

The memory tests are bounded by design: the daemon's resident memory is
sampled while the hostile clients run, and the daemon is killed (the test
failing) as soon as it passes ABORT_RSS, so a regression costs the machine
at most that much.
"""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fusedisk.export.nbd import protocol as p
from fusedisk.export.nbd.budget import CONNECTION_BYTES, DAEMON_BYTES
from fusedisk.export.nbd.connection import STALL_TIMEOUT
from fusedisk.export.nbd.transmission import FIRST_REQUEST_TIMEOUT
from fusedisk.hostio.open_files import MIN_CONNECTIONS
from tests.conftest import make_image, needs, raw_spec, run
from tests.mounting import Mount
from tests.nbd_helpers import RawClient, Server, nbd_uri, run_tool

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


def still_serves(server: Server, timeout: float = 10.0) -> None:
    good = RawClient(server.sock, timeout=timeout)
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
    assert grew < DAEMON_BYTES + 128 * MiB, f"grew by {grew // MiB} MiB"
    # they hold the daemon's whole budget, so until they are hung up on for reading
    # none of their replies, others wait
    t0 = time.monotonic()
    still_serves(served, timeout=STALL_TIMEOUT + 30)
    print(f"a good client was served after {time.monotonic() - t0:.1f} s")
    assert "read no reply for" in served.log
    assert bad[0].closed_by_server(wait=10)  # it held the budget first: hung up on first
    for client in bad:
        client.close()


@contextmanager
def open_file_limit(soft: int, hard: int) -> Iterator[None]:
    """Start daemons under this soft RLIMIT_NOFILE (they inherit it); then the test's own."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def limits_of(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-file limit")


def idle_clients(sock: Path, count: int) -> list[RawClient]:
    """`count` clients that chose vm0 and then do nothing."""
    clients = []
    try:
        for _ in range(count):
            client = RawClient(sock, timeout=10)
            clients.append(client)
            client.go("vm0")
    except BaseException:
        for client in clients:
            client.close()
        raise
    return clients


QCOW2_SPEC = '[nodes.d0]\ndriver = "qcow2"\nfilename = "d0.qcow2"\n\n[disks.vm0]\nnode = "d0"\n'


@pytest.mark.mount
@pytest.mark.timeout(240)
@needs("qemu-img", "nbdinfo")
def test_many_idle_clients_leave_nbdinfo_and_snapshots_working(tmp_path, write_spec, mount):
    """1,100 clients that chose a disk and sit idle, under the usual soft limit of 1024:
    the daemon raised it to the hard limit, so nbdinfo and a snapshot still work."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard open-file limit ({hard}) is too low for this test")
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "d0.qcow2", "16M")
    sock = tmp_path / "nbd.sock"
    with open_file_limit(1024, hard):
        m = mount(write_spec(QCOW2_SPEC), extra_args=("--nbd", f"unix:{sock}"))
    with open_file_limit(min(hard, 8192), hard):  # this test's own 1,100 sockets
        check_idle_clients(m, sock)


def check_idle_clients(m: Mount, sock: Path) -> None:
    assert m.proc is not None
    soft_now, hard_now = limits_of(m.proc.pid)
    assert soft_now == hard_now  # raised at start, as QEMU does
    idle = idle_clients(sock, 1100)
    try:
        run_tool("nbdinfo", "--size", nbd_uri(sock))
        m.path("vm0", "snapshot").write_text("s1\n")  # failed with EINVAL: no descriptor left
    finally:
        for client in idle:
            client.close()


@pytest.mark.timeout(180)
def test_connections_over_the_cap_are_refused_and_idle_ones_dropped(tmp_path, write_spec):
    make_image(tmp_path / "d0.img", MiB, b"data")
    sock = tmp_path / "nbd.sock"

    def low_limit() -> None:  # a cap of about 400 - RESERVED - what is open
        resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))

    server = Server(write_spec(raw_spec()), sock, preexec_fn=low_limit)
    clients: list[RawClient] = []
    try:
        refused = 0
        for _ in range(200):
            client = RawClient(sock, timeout=10)
            clients.append(client)
            try:
                client.go("vm0")
            except (EOFError, OSError):
                refused += 1
        print(f"{200 - refused} admitted, {refused} refused")
        assert 0 < refused < 200 - MIN_CONNECTIONS, refused
        assert "connections are open, the cap" in server.log
        # crowded: those that chose a disk and sent nothing are hung up on in time
        assert clients[0].closed_by_server(wait=FIRST_REQUEST_TIMEOUT + 20)
        assert "no request within" in server.log
        for client in clients:
            client.close()
        clients.clear()
        time.sleep(0.5)
        still_serves(server)  # below the cap again
    finally:
        for client in clients:
            client.close()
        server.stop()
