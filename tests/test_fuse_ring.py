"""FUSE over io_uring (`--transport uring`, and `auto`'s choice) and the eager start.

The rest of the mount tests run on whatever FUSEDISK_TEST_TRANSPORT says (the
test command runs them all on /dev/fuse, then a protocol-heavy subset over the
ring, which conftest.py turns on); these are about the ring itself:
that it is used and says so, that `auto` falls back with one line saying why,
that a request in flight at unmount is answered, and that a request which
needs no waiting is answered in the loop pass that read it, with no task.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio

from fusedisk.fuse import serve as serving
from fusedisk.fuse.filesystem import MountFilesystem
from fusedisk.fuse.kernel import ring
from fusedisk.fuse.kernel.session import KernelSession, ProtocolError
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec
from tests.conftest import make_image, raw_spec, read_at, run, write_at
from tests.mounting import is_mounted
from tests.test_fuse_protocol import init_request

MiB = 1 << 20
RING = ("--transport", "uring")
DEVFUSE = ("--transport", "kernel")
needs_ring = pytest.mark.skipif(ring.unavailable() is not None, reason=str(ring.unavailable()))


def served(log: str) -> tuple[int, int, int]:
    """(requests, answered in the loop, waited in a task) from the session's last line."""
    found = re.search(r"(\d+) requests, (\d+) answered in the loop, (\d+) waited", log)
    assert found, log
    requests, eager, waited = (int(x) for x in found.groups())
    return requests, eager, waited


@pytest.mark.mount
@pytest.mark.timeout(120)
@needs_ring
def test_the_ring_serves_a_mount_and_says_so(tmp_path, write_spec, mount) -> None:
    make_image(tmp_path / "d0.img", 32 * MiB)
    m = mount(write_spec(raw_spec()), extra_args=RING)
    data = os.urandom(3 * MiB + 512)
    write_at(m.path("vm0.img"), 5 * MiB - 512, data)  # 1 MiB requests, unaligned ends
    assert read_at(m.path("vm0.img"), 5 * MiB - 512, len(data)) == data
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k",
        m.path("vm0.img"))  # fmt: skip
    assert sorted(os.listdir(m.path("vm0", "nodes")))  # directories, lookups, readdirplus
    assert m.path("vm0", "size").read_text() == f"{32 * MiB}\n"
    assert "FUSE over io_uring: " in m.log and "queues of" in m.log
    m.stop()
    assert "over io_uring: " in m.log.splitlines()[-2]
    assert (tmp_path / "d0.img").read_bytes()[5 * MiB - 512 :][: len(data)] == data


@pytest.mark.mount
@pytest.mark.timeout(120)
@pytest.mark.parametrize("args", [RING, DEVFUSE], ids=["uring", "dev-fuse"])
def test_a_page_cache_hit_needs_no_task(tmp_path, write_spec, mount, args) -> None:
    """Reads of cached host data and writes that write-behind queues are answered in
    the loop pass that read them: the session counts no request that waited."""
    if args == RING and ring.unavailable():
        pytest.skip(str(ring.unavailable()))
    make_image(tmp_path / "d0.img", 4 * MiB, pattern=b"cached!\n")  # in the page cache now
    m = mount(write_spec(raw_spec()), extra_args=args)
    fd = os.open(m.path("vm0.img"), os.O_RDWR | os.O_DIRECT)
    try:
        buf = bytearray(4096)
        for i in range(200):
            assert os.preadv(fd, [buf], (i * 4096) % (4 * MiB)) == 4096
        os.pwrite(fd, b"w" * 4096, 0)
    finally:
        os.close(fd)
    m.stop()
    _requests, eager, waited = served(m.log)
    assert eager >= 200 and waited <= 1, m.log  # the one: close's flush of a writer


@pytest.mark.mount
@pytest.mark.timeout(120)
@pytest.mark.parametrize("args", [RING, DEVFUSE], ids=["uring", "dev-fuse"])
def test_a_request_in_flight_at_unmount_is_answered(tmp_path, write_spec, mount, args) -> None:
    if args == RING and ring.unavailable():
        pytest.skip(str(ring.unavailable()))
    make_image(tmp_path / "d0.img", MiB, pattern=b"slow")
    spec = write_spec(
        '[nodes.slow]\ndriver = "faults"\nfile = { driver = "raw", filename = "d0.img" }\n'
        'delay-reads = true\ndelay = 1500\n[disks.vm0]\nnode = "slow"\n'
    )
    m = mount(spec, extra_args=args)
    got: list[bytes | BaseException] = []

    def reader() -> None:
        try:
            got.append(read_at(m.path("vm0.img"), 0, 4096))
        except OSError as e:
            got.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.5)  # the read is held by the faults node
    subprocess.run(["fusermount3", "-uz", str(m.mountpoint)], check=True)
    thread.join(timeout=30)
    assert got == [b"slow" * 1024]
    assert m.proc is not None and m.proc.wait(timeout=30) == 0
    m.proc = None
    assert not is_mounted(m.mountpoint)


@pytest.mark.mount
@pytest.mark.timeout(120)
@needs_ring
def test_host_io_goes_into_the_fuse_ring(tmp_path, write_spec, mount) -> None:
    """An O_DIRECT image (every read and write waits for the device): its io_uring
    operations go into the mount's FUSE ring, and the data is right."""
    data = os.urandom(4 * MiB)
    (tmp_path / "d0.img").write_bytes(data)
    spec = write_spec(
        '[nodes.d0]\ndriver = "raw"\nfile = { driver = "file", filename = "d0.img", '
        'cache.direct = true, aio = "io_uring" }\n[disks.vm0]\nnode = "d0"\n'
    )
    m = mount(spec, extra_args=RING)
    assert read_at(m.path("vm0.img"), 0, len(data)) == data
    write_at(m.path("vm0.img"), 4096, b"r" * 8192)
    assert read_at(m.path("vm0.img"), 0, 3 * 4096) == data[:4096] + b"r" * 8192
    stats = json.loads(m.path("vm0", "nodes", "d0.file", "stats").read_text())
    assert stats["uring_in_fuse_ring"] >= 3 and stats["inline_reads"] == 0, stats
    m.stop()
    assert "host operations" in m.log


# -- selection, without a mount ---------------------------------------------------------


async def _session_over_socket(tmp_path: Path, transport: str, flags2: int) -> KernelSession:
    make_image(tmp_path / "d0.img", MiB)
    graph = await Graph.open(parse_spec(raw_spec(), tmp_path / "spec.toml"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        request = bytearray(init_request())
        request[56:60] = flags2.to_bytes(4, "little")  # fuse_init_in.flags2
        ours.send(bytes(request))
        return serving._session(MountFilesystem(graph), theirs.fileno(), transport)
    finally:
        ours.close()
        theirs.close()
        await graph.close()


def test_auto_falls_back_to_dev_fuse_with_one_line(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(serving, "unavailable", lambda: "FUSE over io_uring is off, say")
    with caplog.at_level(logging.INFO, logger="fusedisk"):
        session = trio.run(_session_over_socket, tmp_path, "auto", ring.OVER_IO_URING)
    assert type(session) is KernelSession
    why = [r.getMessage() for r in caplog.records if "not FUSE over io_uring" in r.getMessage()]
    assert why == ["serving /dev/fuse, not FUSE over io_uring: FUSE over io_uring is off, say"]


def test_uring_asked_for_and_missing_is_an_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(serving, "unavailable", lambda: "this kernel has none")
    with pytest.raises(ProtocolError, match="--transport uring: this kernel has none"):
        trio.run(_session_over_socket, tmp_path, "uring", ring.OVER_IO_URING)


@needs_ring
def test_a_kernel_that_does_not_offer_the_ring_gets_dev_fuse(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="fusedisk"):
        session = trio.run(_session_over_socket, tmp_path, "auto", 0)
    assert isinstance(session, ring.RingSession) and session.ring is None
    assert "the kernel's INIT did not offer FUSE over io_uring" in caplog.text


def test_possible_cpus_counts_ranges(monkeypatch) -> None:
    monkeypatch.setattr(Path, "read_text", lambda self: "0-3,6,8-9\n")
    assert ring.possible_cpus() == 7
