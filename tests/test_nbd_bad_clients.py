"""Misbehaving NBD clients get an error reply or a disconnect; nobody else notices.

Each test keeps a well-behaved client connected from the start and checks it
still reads and writes after the bad one is done, and that the daemon logged
no unexpected error and still stops cleanly.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from fusedisk.export.nbd import protocol as p
from tests.conftest import make_image, raw_spec
from tests.nbd_helpers import RawClient, Server

pytestmark = [pytest.mark.timeout(60)]

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def server(tmp_path, write_spec):
    make_image(tmp_path / "d0.img", SIZE, b"0123456789abcdef")
    srv = Server(write_spec(raw_spec()), tmp_path / "nbd.sock")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def good(server):
    """A client that behaves, connected before the bad one arrives."""
    client = RawClient(server.sock)
    client.go("vm0")
    cookie = iter(range(1000, 10**6))

    def still_works() -> None:
        c = next(cookie)
        client.request(p.CMD_WRITE, 4096, 512, cookie=c, payload=bytes([c % 256]) * 512)
        assert client.reply() == (0, c, b"")
        client.request(p.CMD_READ, 4096, 512, cookie=c + 1)
        assert client.reply(512) == (0, c + 1, bytes([c % 256]) * 512)

    still_works()
    yield still_works
    client.request(p.CMD_DISC, 0, 0)
    client.close()


def connect(server: Server) -> RawClient:
    client = RawClient(server.sock)
    client.go("vm0")
    return client


def test_garbage_instead_of_a_handshake_is_hung_up_on(server, good):
    bad = RawClient(server.sock)
    bad.recv(p.HANDSHAKE_HEADER.size)
    bad.s.sendall(os.urandom(4096))
    assert bad.closed_by_server()
    bad.close()
    good()


def test_garbage_options_get_errors_then_a_bad_magic_a_disconnect(server, good):
    bad = RawClient(server.sock)
    bad.greeting()
    # a truncated NBD_OPT_GO payload: an error reply, and the negotiation goes on
    assert bad.option(p.OPT_GO, b"\x00\x00\x01\x00vm")[-1][0] == p.REP_ERR_INVALID
    assert bad.option(p.OPT_GO, p.name_payload("nope") + b"\0\0")[-1][0] == p.REP_ERR_UNKNOWN
    assert bad.option(99)[-1][0] == p.REP_ERR_UNSUP
    bad.s.sendall(b"NOTMAGIC" + bytes(8))
    assert bad.closed_by_server()
    bad.close()
    good()


def test_garbage_request_magic_is_hung_up_on(server, good):
    bad = connect(server)
    bad.s.sendall(os.urandom(p.REQUEST.size))
    assert bad.closed_by_server()
    bad.close()
    good()


def test_an_oversized_write_is_hung_up_on_and_an_oversized_read_refused(server, good):
    bad = connect(server)
    bad.request(p.CMD_READ, 0, 64 * MiB, cookie=7)
    assert bad.reply() == (p.EOVERFLOW, 7, b"")
    bad.request(p.CMD_READ, 0, 512, cookie=8)  # the connection goes on
    assert bad.reply(512) == (0, 8, b"0123456789abcdef" * 32)
    bad.request(p.CMD_WRITE, 0, 0xFFFFFFFF, cookie=9)  # 4 GiB of payload announced
    assert bad.closed_by_server()
    bad.close()
    good()


def test_requests_past_the_end_get_errors_and_change_nothing(server, good, tmp_path):
    bad = connect(server)
    assert bad.size == SIZE
    bad.request(p.CMD_READ, SIZE - 512, 1024, cookie=1)
    assert bad.reply() == (p.EINVAL, 1, b"")
    bad.request(p.CMD_WRITE, SIZE - 512, 1024, cookie=2, payload=b"w" * 1024)
    assert bad.reply() == (p.ENOSPC, 2, b"")  # its payload was read and dropped
    bad.request(p.CMD_WRITE_ZEROES, 2**63, 4096, cookie=3)
    assert bad.reply()[:2] == (p.ENOSPC, 3)
    bad.request(p.CMD_TRIM, SIZE, 1, cookie=4)
    assert bad.reply()[:2] == (p.EINVAL, 4)
    bad.request(p.CMD_READ, 0, 16, cookie=5, flags=0x8000)  # an unknown flag
    assert bad.reply()[:2] == (p.EINVAL, 5)
    bad.request(42, 0, 16, cookie=6)  # an unknown command
    assert bad.reply()[:2] == (p.EINVAL, 6)
    bad.request(p.CMD_BLOCK_STATUS, 0, 4096, cookie=7)  # without structured replies
    assert bad.reply()[:2] == (p.EINVAL, 7)
    bad.request(p.CMD_READ, SIZE - 16, 16, cookie=8)
    assert bad.reply(16) == (0, 8, b"0123456789abcdef")
    bad.close()
    assert os.path.getsize(tmp_path / "d0.img") == SIZE
    good()


def test_a_client_vanishing_mid_write_or_with_requests_in_flight(server, good, tmp_path):
    bad = connect(server)
    bad.request(p.CMD_WRITE, 0, MiB, cookie=1, payload=b"h" * (MiB // 2))
    bad.close()  # half a payload, then gone
    bad = connect(server)
    for i in range(48):  # requests whose replies nobody will read
        bad.request(p.CMD_READ, i * 65536, 65536, cookie=i)
    bad.request(p.CMD_WRITE, 2 * MiB, 65536, cookie=99, payload=b"k" * 65536)
    bad.close()
    deadline = time.monotonic() + 10
    while "went away" not in server.log and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "went away" in server.log
    good()
    with open(tmp_path / "d0.img", "rb") as f:
        assert f.read(16) == b"0123456789abcdef"  # the half write never happened


def test_a_client_stuck_in_negotiation_holds_nobody_up(server, good):
    stuck = RawClient(server.sock)
    stuck.recv(p.HANDSHAKE_HEADER.size)
    stuck.s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE))  # ...and nothing more
    other = connect(server)
    other.request(p.CMD_READ, 0, 16, cookie=1)
    assert other.reply(16) == (0, 1, b"0123456789abcdef")
    other.close()
    stuck.close()
    good()


def export_name_answer(client: RawClient, name: bytes) -> bytes:
    """What the server sends after NBD_OPT_EXPORT_NAME, up to its hang-up (b"" if none)."""
    client.s.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, len(name)) + name)
    got = b""
    while True:
        try:
            chunk = client.s.recv(65536)
        except OSError:
            return got
        if not chunk:
            return got
        got += chunk


def test_export_name_of_an_unknown_disk_is_hung_up_on_without_a_reply(server, good):
    """NBD_OPT_EXPORT_NAME has no error reply: the protocol says to disconnect.  An
    option reply would be read by the client as an export size of about 1.1 PB."""
    bad = RawClient(server.sock)
    bad.greeting()
    assert export_name_answer(bad, b"no-such-disk") == b""
    bad.close()
    bad = RawClient(server.sock)
    bad.greeting()
    assert export_name_answer(bad, b"\xff not utf-8") == b""
    bad.close()
    good()
    assert "no disk named 'no-such-disk'" in server.log
