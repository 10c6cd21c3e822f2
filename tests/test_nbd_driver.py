"""The `nbd` driver against real NBD servers: nbdkit, qemu-nbd and fusedisk's own export.

Servers run as subprocesses on unix sockets in the test's folder.  What the
driver wrote is checked by the server's own tools (qemu-io, qemu-img on the
image qemu-nbd served), block status against what was written, and the
reconnection rules against a server that is killed and started again.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import trio

from fusedisk.errors import IOFailure, OpenError
from fusedisk.graph.extents import Status
from fusedisk.graph.graph import Graph
from fusedisk.spec import load_spec
from tests.conftest import make_image, needs, raw_spec, run, write_at
from tests.nbd_helpers import External, Server, external_servers, file_bytes, nbd_uri

pytestmark = [pytest.mark.timeout(90), needs("nbdkit", "qemu-nbd", "qemu-img", "qemu-io")]

MiB = 1 << 20


@pytest.fixture
def servers():
    with external_servers() as start:
        yield start


def nbd_spec(sock: Path, extra: str = "") -> str:
    return f"""
[nodes.remote]
driver = "nbd"
server.type = "unix"
server.path = "{sock}"
{extra}

[disks.vm0]
node = "remote"
"""


async def open_graph(tmp_path: Path, text: str) -> Graph:
    spec = tmp_path / "nbd.toml"
    spec.write_text(text)
    return await Graph.open(load_spec(spec))


async def exercise(graph: Graph) -> dict[int, bytes]:
    """Concurrent writes and reads of random data, then trim and write-zeroes."""
    disk = graph.disks["vm0"]
    rng = random.Random(7)
    written: dict[int, bytes] = {}
    offsets = rng.sample(range(0, min(disk.size, 16 * MiB) // (256 << 10)), 24)

    async def one(slot: int) -> None:
        data = rng.randbytes(rng.choice([512, 4096, 65536, 256 << 10]))
        await disk.write(slot * (256 << 10), data)
        written[slot * (256 << 10)] = data
        assert await disk.read(slot * (256 << 10), len(data)) == data

    async with trio.open_nursery() as nursery:
        for slot in offsets:
            nursery.start_soon(one, slot)
    await disk.write(0, b"\x01" * MiB)
    await disk.write_zeroes(0, 512 << 10, unmap=True)
    await disk.write_zeroes(512 << 10, 4096, unmap=False)
    await disk.flush()
    assert await disk.read(0, 516 << 10) == bytes(516 << 10)
    assert await disk.read(MiB - 4096, 4096) == b"\x01" * 4096
    await disk.discard(2 * MiB, MiB)  # advisory: must simply not fail
    # what is left as written: outside the overwritten first MiB and the trimmed range
    return {o: d for o, d in written.items() if not (o < MiB or 2 * MiB <= o < 3 * MiB)}


async def test_nbdkit_memory_export_reads_writes_and_block_status(tmp_path, servers):
    sock = tmp_path / "kit.sock"
    servers(sock, "nbdkit", "-f", "-U", sock, "memory", "32M")
    graph = await open_graph(tmp_path, nbd_spec(sock))
    try:
        disk = graph.disks["vm0"]
        assert disk.size == 32 * MiB and not disk.read_only
        await exercise(graph)
        await disk.write(20 * MiB, b"\xee" * MiB)
        extents = await disk.block_status(16 * MiB, 8 * MiB)
        assert sum(e.length for e in extents) == 8 * MiB
        data = [e for e in extents if e.status & Status.DATA]
        assert any(e.offset <= 20 * MiB and e.end >= 21 * MiB for e in data), extents
        assert extents[0].status & Status.ZERO and not extents[0].status & Status.DATA, extents
        stats = graph.nodes["remote"].driver_stats()
        assert stats["connected"] is True and stats["reconnects"] == 0
    finally:
        await graph.close()


async def test_qemu_nbd_serving_a_qcow2_gets_what_was_written(tmp_path, servers):
    image = tmp_path / "served.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "32M")
    sock = tmp_path / "qemu.sock"
    server = servers(sock, "qemu-nbd", "-k", sock, "-f", "qcow2", "-x", "disk0", "--discard=unmap",
                     "--shared=4", image)  # fmt: skip
    graph = await open_graph(tmp_path, nbd_spec(sock, 'export = "disk0"'))
    try:
        written = await exercise(graph)
    finally:
        await graph.close()
    server.stop()
    run("qemu-img", "check", image)
    flat = tmp_path / "flat.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, flat)
    for offset, data in written.items():
        assert file_bytes(flat, offset, len(data)) == data, offset
    mapped = run("qemu-img", "map", "-f", "qcow2", "--output=json", image)
    assert '"start": 0, "length": 524288, "depth": 0, "present": true, "zero": true' in mapped


async def test_fusedisks_own_export_as_a_child(tmp_path):
    image = make_image(tmp_path / "d0.img", 16 * MiB)
    spec = tmp_path / "server.toml"
    spec.write_text(raw_spec())
    server = Server(spec, tmp_path / "own.sock")
    try:
        graph = await open_graph(tmp_path, nbd_spec(tmp_path / "own.sock", 'export = "vm0"'))
        try:
            written = await exercise(graph)
            extents = await graph.disks["vm0"].block_status(8 * MiB, 8 * MiB)
            assert all(e.status & Status.ZERO for e in extents) or written
        finally:
            await graph.close()
    finally:
        server.stop()
    for offset, data in written.items():
        assert file_bytes(image, offset, len(data)) == data


async def test_a_read_only_export_needs_read_only_and_bad_specs_name_the_option(tmp_path, servers):
    sock = tmp_path / "ro.sock"
    servers(sock, "nbdkit", "-f", "-r", "-U", sock, "pattern", "8M")
    with pytest.raises(OpenError, match="read-only; set read-only = true"):
        await open_graph(tmp_path, nbd_spec(sock))
    graph = await open_graph(tmp_path, nbd_spec(sock, "read-only = true"))
    try:
        disk = graph.disks["vm0"]
        assert disk.read_only
        assert (await disk.read(8, 8)) == (8).to_bytes(8, "big")  # the pattern plugin
    finally:
        await graph.close()
    with pytest.raises(OpenError, match=r"option 'server.path': cannot open export"):
        await open_graph(tmp_path, nbd_spec(tmp_path / "nobody.sock"))
    with pytest.raises(OpenError, match=r"option 'server.host' is required"):
        await open_graph(tmp_path, '[nodes.r]\ndriver = "nbd"\n[disks.vm0]\nnode = "r"\n')


async def test_reconnect_delay_holds_requests_then_fails_them(tmp_path, servers):
    image = make_image(tmp_path / "remote.img", 8 * MiB, b"remote!!")
    sock = tmp_path / "re.sock"

    def start_server() -> External:
        return servers(sock, "qemu-nbd", "-k", sock, "-f", "raw", "--shared=4", image)

    server = start_server()
    graph = await open_graph(tmp_path, nbd_spec(sock, "reconnect-delay = 5"))
    disk = graph.disks["vm0"]
    node = graph.nodes["remote"]
    try:
        await disk.write(0, b"before!!")
        server.stop()  # the server goes away...
        async with trio.open_nursery() as nursery:
            result: list[bytes] = []

            async def read_while_away() -> None:
                result.append(await disk.read(0, 8))

            nursery.start_soon(read_while_away)
            await trio.sleep(0.5)
            assert not result  # ...the request waits within reconnect-delay
            server = await trio.to_thread.run_sync(start_server)  # and comes back
        assert result == [b"before!!"]
        assert node.driver_stats()["reconnects"] == 1

        node.reconnect_delay = 0.3
        server.stop()
        t0 = trio.current_time()
        with pytest.raises(IOFailure, match="unreachable") as failure:
            await disk.read(0, 8)
        assert failure.value.errno == errno.EIO
        assert trio.current_time() - t0 < 5
        with pytest.raises(IOFailure):  # after the delay: at once
            await disk.write(0, b"x" * 8)
        await trio.to_thread.run_sync(start_server)
        with trio.fail_after(10):
            while not node.driver_stats()["connected"]:
                await trio.sleep(0.05)  # reconnected in the background
        assert await disk.read(0, 8) == b"before!!"
    finally:
        await graph.close()


def test_nested_server_table_reads_like_dotted_keys(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[nodes.r]\ndriver = "nbd"\nserver = { type = "inet", host = "127.0.0.1", '
                    'port = 10809 }\n[disks.vm0]\nnode = "r"\n')  # fmt: skip
    node = load_spec(spec).nodes["r"]
    assert node.options["server.host"] == "127.0.0.1" and node.options["server.port"] == 10809


@pytest.mark.mount
def test_a_disk_on_an_nbd_child_through_a_mount(tmp_path, servers, write_spec, mount):
    sock = tmp_path / "kit.sock"
    servers(sock, "nbdkit", "-f", "-U", sock, "memory", "16M")
    m = mount(write_spec(nbd_spec(sock)))
    write_at(m.path("vm0.img"), 3 * MiB, b"\x3c" * MiB)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x3c 3M 1M", "-c", "write -P 0x4d 5M 64k",
        m.path("vm0.img"))  # fmt: skip
    out = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x4d 5M 64k", "-c",
              "read -P 0x3c 3M 1M", nbd_uri(sock, ""))  # fmt: skip
    assert "Pattern verification failed" not in out
    assert os.path.exists(m.path("vm0", "nodes", "remote", "stats"))


async def test_a_server_shutting_down_fails_requests_with_eio(tmp_path, servers):
    """A server that stops answers the requests still coming with NBD's ESHUTDOWN (nbdkit
    and qemu-nbd do); the node's promise is EIO once the server is gone, not ESHUTDOWN."""
    sock = tmp_path / "going.sock"
    servers(sock, "nbdkit", "-f", "-U", sock, "--filter=error", "memory", "8M",
            "error=ESHUTDOWN", "error-pread-rate=100%")  # fmt: skip
    graph = await open_graph(tmp_path, nbd_spec(sock))
    try:
        with pytest.raises(IOFailure) as failure:
            await graph.disks["vm0"].read(0, 4096)
        assert failure.value.errno == errno.EIO, failure.value
        assert "unreachable" in str(failure.value)
    finally:
        await graph.close()
