"""NBD parsing and the server loop under fuzzing, in process, on memory streams.

The parsers must refuse anything malformed with ProtocolError and nothing
else; the connection handler, fed a valid handshake and then random bytes,
must end (reply, refuse or hang up) without an exception and without
hanging, and the disk must hold only what well-formed writes put there.
"""

from __future__ import annotations

import contextlib
import struct

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedisk.export.nbd import protocol as p
from fusedisk.export.nbd.address import parse_address
from fusedisk.export.nbd.server import serve_connection
from fusedisk.graph.disk import Disk
from fusedisk.spec import DiskSpec
from tests.memory_node import MemoryNode

SIZE = 1 << 20
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


@given(st.binary(max_size=200))
def test_option_parsers_raise_only_protocol_errors(data):
    for parse in (p.parse_info_request, p.parse_meta_request, p.parse_export_name):
        with contextlib.suppress(p.ProtocolError):
            parse(data)


@given(
    st.sampled_from([*p.COMMAND_NAMES, 5, 8, 0xFFFF]),
    st.integers(0, 0xFFFF),
    st.sampled_from([0, 1, SIZE - 1, SIZE, SIZE + 1, 2**63, 2**64 - 1]),
    st.sampled_from([0, 1, 512, SIZE, p.MAX_REQUEST, p.MAX_REQUEST + 1, 2**32 - 1]),
    st.booleans(),
    st.booleans(),
)
def test_check_request_keeps_every_accepted_request_inside_the_disk(
    kind, flags, offset, length, read_only, structured
):
    req = p.Request(flags, kind, 1, offset, length)
    error = p.check_request(req, SIZE, read_only, structured)
    if error == 0 and kind not in (p.CMD_FLUSH, p.CMD_DISC):
        assert offset + length <= SIZE
        assert not (read_only and kind in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES))
    if kind in (p.CMD_READ, p.CMD_WRITE) and length > p.MAX_REQUEST:
        assert error


def test_addresses():
    assert str(parse_address("unix:/run/x.sock")) == "unix:/run/x.sock"
    assert str(parse_address("127.0.0.1:10809")) == "127.0.0.1:10809"
    assert str(parse_address("[::1]:10809")) == "[::1]:10809"
    for bad in ("nowhere", "unix:", ":10809", "host:99999", "host:port"):
        try:
            parse_address(bad)
        except Exception as e:
            assert "NBD address" in str(e)
        else:
            raise AssertionError(bad)


def handshake(structured: bool) -> bytes:
    """What a client sends to reach the transmission phase of disk vm0."""
    out = struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)
    if structured:
        out += p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_STRUCTURED_REPLY, 0)
        meta = p.name_payload("vm0") + struct.pack(">I", 1) + p.name_payload("base:allocation")
        out += p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_SET_META_CONTEXT, len(meta)) + meta
    go = p.name_payload("vm0") + struct.pack(">H", 0)
    return out + p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_GO, len(go)) + go


def request(kind: int, offset: int, length: int, flags: int = 0, cookie: int = 0) -> bytes:
    return p.REQUEST.pack(p.REQUEST_MAGIC, flags, kind, cookie, offset, length)


async def run_client(stream_bytes: bytes) -> tuple[MemoryNode, bytes]:
    """Serve one connection that sends `stream_bytes` then closes; the server's output."""
    node = MemoryNode(SIZE)
    disks = {"vm0": Disk(DiskSpec("vm0", "mem"), node)}
    client, server = trio.testing.memory_stream_pair()
    received = bytearray()

    async def talk() -> None:
        await client.send_all(stream_bytes)
        await client.send_eof()
        while chunk := await client.receive_some():
            received.extend(chunk)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(talk)
            await serve_connection(disks, server, "fuzz")
    return node, bytes(received)


@FUZZ
@given(st.booleans(), st.binary(max_size=300), st.integers(0, 3))
async def test_random_bytes_after_the_handshake_end_the_connection_cleanly(
    structured, garbage, valid_first
):
    valid = [
        request(p.CMD_WRITE, 100, 4, cookie=1) + b"abcd",
        request(p.CMD_READ, 0, 512, cookie=2),
        request(p.CMD_BLOCK_STATUS, 0, SIZE, cookie=3),
    ][:valid_first]
    node, out = await run_client(handshake(structured) + b"".join(valid) + garbage)
    assert out.startswith(struct.pack(">Q", p.NBDMAGIC))
    if valid_first:
        assert node.buf[100:104] == b"abcd"


@FUZZ
@given(st.binary(max_size=400))
async def test_random_bytes_in_the_negotiation_end_it_cleanly(garbage):
    await run_client(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE) + garbage)


async def test_structured_replies_hole_chunks_and_block_status():
    stream = handshake(True) + b"".join([
        request(p.CMD_WRITE, 4096, 4, cookie=1) + b"data",
        request(p.CMD_READ, 65536, 4096, cookie=2),  # zeroes: one hole chunk
        request(p.CMD_BLOCK_STATUS, 0, 8192, cookie=3, flags=p.CMD_FLAG_REQ_ONE),
        request(p.CMD_READ, SIZE, 1, cookie=4),  # past the end: an error chunk
        request(p.CMD_DISC, 0, 0),
    ])  # fmt: skip
    _, out = await run_client(stream)
    chunks = {}
    pos = out.index(struct.pack(">I", p.STRUCTURED_REPLY_MAGIC))
    while pos < len(out):
        magic, flags, kind, cookie, length = p.CHUNK.unpack_from(out, pos)
        assert magic == p.STRUCTURED_REPLY_MAGIC and flags & p.REPLY_FLAG_DONE
        pos += p.CHUNK.size
        chunks[cookie] = (kind, out[pos : pos + length])
        pos += length
    assert chunks[1] == (p.REPLY_TYPE_NONE, b"")
    assert chunks[2] == (p.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 65536, 4096))
    assert chunks[3] == (p.REPLY_TYPE_BLOCK_STATUS, struct.pack(">III", 1, 8192, 0))
    assert chunks[4][0] == p.REPLY_TYPE_ERROR
    assert struct.unpack(">I", chunks[4][1][:4])[0] == p.EINVAL
    assert b"past its end" in chunks[4][1]
