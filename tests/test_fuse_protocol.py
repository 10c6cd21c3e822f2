"""The kernel transport's protocol handling, without a kernel.

A SOCK_SEQPACKET socket pair keeps message boundaries as /dev/fuse does, so
the session reads one request per read and writes one reply per writev.  This
is where malformed, truncated and unknown requests are sent: the kernel would
never send most of them, and the session must survive them all.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedisk.fuse.filesystem import ROOT_INODE, SEEK_DATA, SEEK_HOLE, MountFilesystem
from fusedisk.fuse.kernel import protocol as p
from fusedisk.fuse.kernel.session import MAX_WRITE, KernelSession
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec
from tests.conftest import make_image, raw_spec

MiB = 1 << 20


class Client:
    """The kernel's side: numbered requests out, replies in."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.unique = 100

    def header(self, opcode: int, nodeid: int, body: bytes, pid: int = 1) -> bytes:
        self.unique += 1
        return p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, self.unique, nodeid,
                                0, 0, pid, 0, 0) + body  # fmt: skip

    async def send_raw(self, message: bytes) -> None:
        await self.sock.send(message)

    async def call(
        self, opcode: int, nodeid: int = ROOT_INODE, body: bytes = b"", pid: int = 1
    ) -> bytes:
        """Send one request; its payload, or OSError with the errno of the reply."""
        await self.sock.send(self.header(opcode, nodeid, body, pid))
        return await self.reply(self.unique)

    async def reply(self, unique: int) -> bytes:
        with trio.fail_after(5):
            raw = await self.sock.recv(MAX_WRITE + 4096)
        length, error, got = p.OUT_HEADER.unpack_from(raw)
        assert got == unique
        assert length == len(raw)
        if error:
            assert length == p.OUT_HEADER.size, "error replies carry no payload"
            raise OSError(-error, os.strerror(-error))
        return raw[p.OUT_HEADER.size :]

    async def nothing_pending(self) -> None:
        """No reply is on its way (for requests that must not be answered)."""
        with trio.move_on_after(0.2):
            raw = await self.sock.recv(4096)
            raise AssertionError(f"unexpected reply {raw[:16]!r}")


class UnexpectedErrors(logging.Handler):
    """Collects log records of exceptions that escaped a handler."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "unexpected error" in record.getMessage():
            self.seen.append(self.format(record))


def init_request(minor: int = 45, flags: int = 0xFFFFFFFF) -> bytes:
    body = p.INIT_IN.pack(7, minor, 128 * 1024, flags) + struct.pack("<I", 0) + bytes(44)
    return p.IN_HEADER.pack(p.IN_HEADER.size + len(body), p.Op.INIT, 1, 0, 0, 0, 0, 0, 0) + body


@asynccontextmanager
async def session(tmp_path: Path, size: int = 8 * MiB) -> AsyncIterator[Client]:
    make_image(tmp_path / "d0.img", size)
    unexpected = UnexpectedErrors()
    logging.getLogger("fusedisk").addHandler(unexpected)
    spec = parse_spec(raw_spec(), tmp_path / "spec.toml")
    graph = await Graph.open(spec)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        ours.send(init_request())
        s = KernelSession(MountFilesystem(graph), theirs.fileno())
        s.negotiate()
        reply = ours.recv(4096)
        major, minor, _, flags, max_bg, _, max_write, _, max_pages, _, _ = p.INIT_OUT.unpack_from(
            reply, p.OUT_HEADER.size
        )
        assert (major, minor, max_write, max_pages) == (7, p.OUR_MINOR, MiB, 256)
        assert flags & p.ASYNC_DIO and flags & p.MAX_PAGES and flags & p.INIT_EXT
        assert max_bg == 256
        client = Client(trio.socket.from_stdlib_socket(ours))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.serve)
            yield client
            s.stop()
    finally:
        ours.close()
        theirs.close()
        await graph.close()
        logging.getLogger("fusedisk").removeHandler(unexpected)
    assert not unexpected.seen, unexpected.seen


async def lookup(c: Client, name: str, parent: int = ROOT_INODE) -> int:
    out = await c.call(p.Op.LOOKUP, parent, name.encode() + b"\0")
    return int(p.ENTRY_OUT.unpack_from(out)[0])


async def open_file(c: Client, ino: int, flags: int = os.O_RDWR) -> tuple[int, int]:
    fh, open_flags, _ = p.OPEN_OUT.unpack(await c.call(p.Op.OPEN, ino, p.OPEN_IN.pack(flags, 0)))
    return fh, open_flags


async def test_disk_requests_round_trip(tmp_path) -> None:
    async with session(tmp_path) as c:
        ino = await lookup(c, "vm0.img")
        attr = await c.call(p.Op.GETATTR, ino, p.GETATTR_IN.pack(0, 0, 0))
        size = p.ATTR.unpack_from(attr, p.ATTR_OUT.size)[1]
        assert size == 8 * MiB
        fh, flags = await open_file(c, ino)
        assert flags & p.FOPEN_DIRECT_IO and flags & p.FOPEN_PARALLEL_DIRECT_WRITES
        data = os.urandom(4096)
        out = await c.call(p.Op.WRITE, ino, p.WRITE_IN.pack(fh, 1 * MiB, 4096, 0, 0, 0, 0) + data)
        assert p.WRITE_OUT.unpack(out)[0] == 4096
        assert await c.call(p.Op.READ, ino, p.READ_IN.pack(fh, 1 * MiB, 4096, 0, 0, 0, 0)) == data
        assert await c.call(p.Op.FSYNC, ino, p.FSYNC_IN.pack(fh, 0, 0)) == b""
        seek = p.LSEEK_IN.pack(fh, 0, SEEK_DATA, 0)
        assert p.LSEEK_OUT.unpack(await c.call(p.Op.LSEEK, ino, seek))[0] == 1 * MiB
        seek = p.LSEEK_IN.pack(fh, 1 * MiB, SEEK_HOLE, 0)
        assert p.LSEEK_OUT.unpack(await c.call(p.Op.LSEEK, ino, seek))[0] == 1 * MiB + 4096
        punch = p.FALLOCATE_IN.pack(fh, 1 * MiB, 4096, 0x03, 0)
        assert await c.call(p.Op.FALLOCATE, ino, punch) == b""
        assert await c.call(p.Op.READ, ino, p.READ_IN.pack(fh, 1 * MiB, 4096, 0, 0, 0, 0)) == bytes(
            4096
        )
        with pytest.raises(OSError) as e:
            await c.call(p.Op.LSEEK, ino, p.LSEEK_IN.pack(fh, 0, SEEK_DATA, 0))
        assert e.value.errno == errno.ENXIO
        with pytest.raises(OSError) as e:
            await c.call(p.Op.FALLOCATE, ino, p.FALLOCATE_IN.pack(fh, 0, 4096, 0x08, 0))
        assert e.value.errno == errno.EOPNOTSUPP  # COLLAPSE_RANGE: not for a disk
        assert await c.call(p.Op.RELEASE, ino, p.RELEASE_IN.pack(fh, 0, 0, 0)) == b""
        with pytest.raises(OSError) as e:
            await c.call(p.Op.READ, ino, p.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0))
        assert e.value.errno == errno.EBADF


def setattr_size(size: int, valid: int = p.FATTR_SIZE, fh: int = 0) -> bytes:
    return p.SETATTR_IN.pack(valid, 0, fh, size, *([0] * 12))


async def test_o_trunc_is_the_openers_next_size_0_and_keeps_the_size(tmp_path) -> None:
    """Without ATOMIC_O_TRUNC, O_TRUNC is OPEN then SETATTR(size 0, by path) from the
    same thread (a GETXATTR may come between); its reply carries the disk's size,
    which the kernel keeps.  Any other truncate to 0 is refused."""
    async with session(tmp_path) as c:
        ino = await lookup(c, "vm0.img")
        with pytest.raises(OSError) as e:  # truncate(2) with no open before it
            await c.call(p.Op.SETATTR, ino, setattr_size(0), pid=7)
        assert e.value.errno == errno.EINVAL
        await open_file(c, ino, os.O_WRONLY)
        await c.call(p.Op.GETATTR, ino, p.GETATTR_IN.pack(0, 0, 0), pid=8)  # another thread
        with pytest.raises(OSError):
            await c.call(p.Op.GETXATTR, ino, b"\0" * 8 + b"security.capability\0")
        out = await c.call(p.Op.SETATTR, ino, setattr_size(0))
        assert p.ATTR.unpack_from(out, p.ATTR_OUT.size)[1] == 8 * MiB  # the size stays
        with pytest.raises(OSError):  # the same thread again: no open just before
            await c.call(p.Op.SETATTR, ino, setattr_size(0))
        fh, _ = await open_file(c, ino, os.O_WRONLY)
        with pytest.raises(OSError):  # ftruncate(fd, 0): it names its file handle
            await c.call(p.Op.SETATTR, ino, setattr_size(0, p.FATTR_SIZE | p.FATTR_FH, fh))
        await open_file(c, ino, os.O_RDONLY)
        with pytest.raises(OSError):  # a read-only open truncates nothing
            await c.call(p.Op.SETATTR, ino, setattr_size(0))


@pytest.mark.parametrize("opcode", [p.Op.READDIR, p.Op.READDIRPLUS])
async def test_directories_list_with_offsets(tmp_path, opcode) -> None:
    """A small buffer takes one entry at a time; the offsets resume where it stopped;
    READDIRPLUS entries carry the attributes a lookup would give."""
    head = p.ENTRY_OUT.size + p.ATTR.size if opcode == p.Op.READDIRPLUS else 0
    async with session(tmp_path) as c:
        fh = p.OPEN_OUT.unpack(await c.call(p.Op.OPENDIR, ROOT_INODE, p.OPEN_IN.pack(0, 0)))[0]
        names, inodes, offset = [], [], 0
        while True:
            request = p.READ_IN.pack(fh, offset, head + 64, 0, 0, 0, 0)
            out = await c.call(opcode, ROOT_INODE, request)
            if not out:
                break
            pos = 0
            while pos < len(out):
                if head:
                    inodes.append(p.ENTRY_OUT.unpack_from(out, pos)[0])
                _ino, offset, namelen, _type = p.DIRENT.unpack_from(out, pos + head)
                start = pos + head + p.DIRENT.size
                names.append(out[start : start + namelen].decode())
                pos = start + (namelen + 7) // 8 * 8
        assert names == ["last-error", "metrics", "vm0", "vm0.img"]
        if head:
            assert inodes[-1] == await lookup(c, "vm0.img")
        with pytest.raises(OSError) as e:
            await lookup(c, "nothing-here")
        assert e.value.errno == errno.ENOENT


async def test_malformed_and_unknown_requests_never_end_the_session(tmp_path) -> None:
    async with session(tmp_path) as c:
        await c.send_raw(b"\x01\x02\x03")  # shorter than a header: ignored
        await c.send_raw(p.IN_HEADER.pack(999, p.Op.GETATTR, 7, 1, 0, 0, 0, 0, 0))  # bad length
        await c.nothing_pending()
        with pytest.raises(OSError) as e:
            await c.call(9, ROOT_INODE, b"")  # MKDIR: not served
        assert e.value.errno == errno.ENOSYS
        with pytest.raises(OSError) as e:
            await c.call(p.Op.READ, ROOT_INODE, b"\0" * 8)  # body too short
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            await c.call(p.Op.LOOKUP, ROOT_INODE, b"no terminating nul")
        assert e.value.errno == errno.EINVAL
        ino = await lookup(c, "vm0.img")
        fh, _ = await open_file(c, ino)
        with pytest.raises(OSError) as e:  # says 4096 bytes, carries 10
            await c.call(p.Op.WRITE, ino, p.WRITE_IN.pack(fh, 0, 4096, 0, 0, 0, 0) + bytes(10))
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:  # past the end of the disk
            await c.call(p.Op.WRITE, ino, p.WRITE_IN.pack(fh, 8 * MiB, 4, 0, 0, 0, 0) + bytes(4))
        assert e.value.errno == errno.ENOSPC
        await c.send_raw(c.header(p.Op.INTERRUPT, 0, struct.pack("<Q", 5)))
        await c.send_raw(c.header(p.Op.FORGET, ino, struct.pack("<Q", 1)))
        await c.nothing_pending()
        assert await lookup(c, "vm0.img") == ino  # still serving


FUZZED_OPCODES = [int(op) for op in p.Op if op not in (p.Op.INIT, p.Op.DESTROY)] + [
    0, 9, 47, 4096, 0xFFFFFFFF,
]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    opcode=st.sampled_from(FUZZED_OPCODES),
    nodeid=st.sampled_from([0, 1, 2, 3, 1 << 63]),
    body=st.binary(max_size=200),
)
def test_fuzzed_requests_get_a_reply_or_nothing_and_the_session_lives(
    tmp_path_factory, opcode: int, nodeid: int, body: bytes
) -> None:
    """Any body for any opcode: an errno, a payload or (FORGET, INTERRUPT) nothing; no
    exception escapes a handler, and the next request is served."""

    async def main() -> None:
        async with session(tmp_path_factory.mktemp("fuzz"), size=MiB) as c:
            assert await lookup(c, "vm0.img") == 2
            await c.send_raw(c.header(opcode, nodeid, body))
            fuzzed = c.unique
            await c.send_raw(c.header(p.Op.LOOKUP, ROOT_INODE, b"vm0.img\0"))
            probe = c.unique
            while True:
                with trio.fail_after(5):
                    raw = await c.sock.recv(MAX_WRITE + 4096)
                length, error, unique = p.OUT_HEADER.unpack_from(raw)
                assert length == len(raw) and unique in (fuzzed, probe)
                assert not error or length == p.OUT_HEADER.size
                if unique == probe:
                    assert not error
                    break

    trio.run(main)
