"""The NBD export driven by independent clients: qemu-io, qemu-img, nbdinfo, nbdcopy.

Every client here is a program fusedisk did not write, on a unix socket; the
FUSE file of the same disk (through `fusedisk mount --nbd`) must show what
they wrote, and the other way round.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from fusedisk.export.nbd import protocol as p
from tests.conftest import make_image, needs, raw_spec, run, write_at
from tests.nbd_helpers import RawClient, Server, file_bytes, nbd_uri, run_tool

pytestmark = [pytest.mark.timeout(120), needs("qemu-io", "qemu-img", "nbdinfo", "nbdcopy")]

MiB = 1 << 20

TWO_DISKS = """
[nodes.d0]
driver = "raw"
filename = "d0.img"

[nodes.ro]
driver = "raw"
filename = "ro.img"

[disks.vm0]
node = "d0"

[disks.base]
node = "ro"
read-only = true
"""


@pytest.fixture
def served(tmp_path, write_spec):
    """`fusedisk serve` of a 64 MiB sparse vm0 and a read-only 'base' disk."""
    image = make_image(tmp_path / "d0.img", 64 * MiB)
    write_at(image, 8 * MiB, b"\x5a" * MiB)
    make_image(tmp_path / "ro.img", 4 * MiB, b"RO")
    server = Server(write_spec(TWO_DISKS), tmp_path / "nbd.sock")
    try:
        yield server
    finally:
        server.stop()


def qemu_io(uri: str, *commands: str) -> str:
    args = []
    for c in commands:
        args += ["-c", c]
    out = run("qemu-io", "-f", "raw", *args, uri)
    assert "failed" not in out.lower() and "error" not in out.lower(), out
    return out


def test_every_disk_is_listed_and_read_only_is_advertised(served):
    listing = run_tool("nbdinfo", "--list", "--json", served.uri).stdout
    exports = {e["export-name"]: e for e in json.loads(listing)["exports"]}
    assert set(exports) == {"vm0", "base"}
    assert exports["vm0"]["export-size"] == 64 * MiB
    assert exports["vm0"]["is_read_only"] is False
    assert exports["base"]["is_read_only"] is True
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_multi_conn"):  # fmt: skip
        assert exports["vm0"][flag] is True, flag
    assert "base:allocation" in exports["vm0"]["contexts"]
    # a write to the read-only disk is refused, and its image is untouched
    result = run_tool("qemu-io", "-f", "raw", "-c", "write -P 1 0 512",
                      nbd_uri(served.sock, "base"), check=False)  # fmt: skip
    assert "Operation not permitted" in result.stdout + result.stderr or result.returncode
    assert file_bytes(served.spec.parent / "ro.img", 0, 4) == b"RORO"


def test_qemu_io_reads_and_writes_and_nbdinfo_maps_holes(served):
    qemu_io(served.uri, "read -P 0x5a 8M 1M", "read -P 0 0 8M", "write -P 0xc3 20M 2M",
            "read -P 0xc3 20M 2M", "flush")  # fmt: skip
    assert file_bytes(served.spec.parent / "d0.img", 20 * MiB, 4) == b"\xc3" * 4
    qemu_io(served.uri, "write -z 20M 1M", "read -P 0 20M 1M", "read -P 0xc3 21M 1M",
            "discard 8M 64k", "write -P 0x11 -f 30M 4k")  # fmt: skip

    extents = json.loads(run_tool("nbdinfo", "--map", "--json", served.uri).stdout)
    data = [(e["offset"], e["length"]) for e in extents if not e["type"] & 1]
    holes = [(e["offset"], e["length"]) for e in extents if e["type"] & 1]
    assert holes and holes[0][0] == 0, extents  # the image's start was never written
    assert any(o <= 21 * MiB < o + n for o, n in data), extents
    assert not any(o <= 2 * MiB < o + n for o, n in data), extents
    assert sum(n for _, n in data + holes) == 64 * MiB


def test_nbdcopy_copies_a_disk_out_and_in(served, tmp_path):
    qemu_io(served.uri, "write -P 0x77 1M 3M")
    out = tmp_path / "copy.raw"
    run_tool("nbdcopy", served.uri, out)
    run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", out, tmp_path / "d0.img")
    # and back in, over multiple connections, from a different image
    source = make_image(tmp_path / "src.raw", 64 * MiB, b"fusedisk")
    run_tool("nbdcopy", "--connections=4", source, served.uri)
    run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", source, tmp_path / "d0.img")


def test_qemu_img_convert_into_the_export(served, tmp_path):
    source = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", source, "64M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x42 5M 1M", source)
    run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", source, served.uri)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", source, served.uri)


def test_serve_flushes_and_exits_on_sigint(tmp_path, write_spec):
    make_image(tmp_path / "d0.img", 8 * MiB)
    server = Server(write_spec(raw_spec()), tmp_path / "nbd.sock")
    try:
        qemu_io(server.uri, "write -P 0x99 0 1M")
    finally:
        server.proc.send_signal(signal.SIGINT)
        server.proc.wait(timeout=20)
        server.stop()
    assert "flushed and closed" in server.log
    assert not os.path.exists(tmp_path / "nbd.sock")
    assert file_bytes(tmp_path / "d0.img", 0, 2) == b"\x99\x99"


def test_a_bad_address_or_busy_socket_is_refused_with_a_sentence(tmp_path, write_spec):
    make_image(tmp_path / "d0.img", MiB)
    spec = write_spec(raw_spec())
    result = run_tool(os.sys.executable, "-m", "fusedisk", "serve", "--nbd", "nowhere", spec,
                      check=False)  # fmt: skip
    assert result.returncode == 1
    assert "expected unix:PATH or HOST:PORT" in result.stderr
    (tmp_path / "plain").write_text("not a socket")
    result = run_tool(os.sys.executable, "-m", "fusedisk", "serve", "--nbd",
                      f"unix:{tmp_path / 'plain'}", spec, check=False)  # fmt: skip
    assert result.returncode == 1 and "cannot listen for NBD" in result.stderr, result.stderr
    assert (tmp_path / "plain").read_text() == "not a socket"
    server = Server(spec, tmp_path / "busy.sock")
    make_image(tmp_path / "d1.img", MiB)  # its own image: d0.img is locked by the first
    other = write_spec(raw_spec("d1.img"), "other.toml")
    try:  # a second daemon does not steal a live daemon's socket
        result = run_tool(os.sys.executable, "-m", "fusedisk", "serve", "--nbd",
                          f"unix:{tmp_path / 'busy.sock'}", other, check=False)  # fmt: skip
        assert result.returncode == 1 and "another server listens" in result.stderr
        run_tool("nbdinfo", "--size", server.uri)
    finally:
        server.stop()


def test_mount_refuses_a_bad_nbd_address_before_mounting(tmp_path, write_spec):
    make_image(tmp_path / "d0.img", MiB)
    (tmp_path / "mnt").mkdir()
    result = run_tool(os.sys.executable, "-m", "fusedisk", "mount", "--nbd", "host:http",
                      write_spec(raw_spec()), tmp_path / "mnt", check=False)  # fmt: skip
    assert result.returncode == 1 and "NBD address 'host:http'" in result.stderr
    assert not os.path.ismount(tmp_path / "mnt")


@pytest.mark.mount
def test_mount_nbd_serves_what_the_fuse_file_shows(tmp_path, write_spec, mount):
    make_image(tmp_path / "d0.img", 32 * MiB)
    sock = tmp_path / "m.sock"
    m = mount(write_spec(raw_spec()), extra_args=("--nbd", f"unix:{sock}"))
    uri = nbd_uri(sock)
    write_at(m.path("vm0.img"), 3 * MiB, b"\xf1" * MiB)  # FUSE -> NBD
    qemu_io(uri, "read -P 0xf1 3M 1M", "write -P 0xe2 10M 1M")  # NBD -> FUSE
    assert file_bytes(m.path("vm0.img"), 10 * MiB, MiB) == b"\xe2" * MiB
    stats = json.loads(m.path("vm0", "stats").read_text())
    assert stats["write"]["ops"] >= 2  # one Disk, one set of counters for both fronts


@pytest.mark.mount
def test_a_snapshot_through_the_control_tree_applies_to_nbd_clients(tmp_path, write_spec, mount):
    images = tmp_path / "images"
    images.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", images / "d0.qcow2", "16M")
    spec = write_spec('[nodes.d0]\ndriver = "qcow2"\nfilename = "images/d0.qcow2"\n\n'
                      '[disks.vm0]\nnode = "d0"\n')  # fmt: skip
    sock = tmp_path / "m.sock"
    m = mount(spec, extra_args=("--nbd", f"unix:{sock}"))
    client = RawClient(sock)  # one connection, open across the snapshot
    try:
        client.go("vm0")
        client.request(p.CMD_WRITE, 0, MiB, cookie=1, payload=b"\xaa" * MiB)
        assert client.reply() == (0, 1, b"")
        m.path("vm0", "snapshot").write_text("s1\n")
        client.request(p.CMD_WRITE, 0, MiB, cookie=2, payload=b"\xbb" * MiB)
        assert client.reply() == (0, 2, b"")
        client.request(p.CMD_FLUSH, 0, 0, cookie=3)
        assert client.reply() == (0, 3, b"")
    finally:
        client.close()
    assert file_bytes(m.path("vm0.img"), 0, MiB) == b"\xbb" * MiB
    m.stop()
    run("qemu-img", "check", images / "d0.s1.qcow2")
    run("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0xaa 0 1M", images / "d0.qcow2")
    run("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0xbb 0 1M", images / "d0.s1.qcow2")


def test_tcp_on_loopback_with_a_chosen_port_and_systemd_readiness(tmp_path, write_spec):
    make_image(tmp_path / "d0.img", 4 * MiB, b"tcp!")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusedisk", "serve", "--nbd", "127.0.0.1:0",
         str(write_spec(raw_spec()))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert b"READY=1" in notify.recv(4096).split(b"\n")
        host, port = line.rsplit(" ", 1)[1].strip().rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0, line
        uri = f"nbd://127.0.0.1:{port}/vm0"
        copy = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, timeout=60)
        assert copy.returncode == 0 and copy.stdout == b"tcp!" * MiB, copy.stderr
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
        notify.close()


def test_disk_errors_reach_the_client_as_nbd_errors(tmp_path, write_spec):
    make_image(tmp_path / "d0.img", 8 * MiB)
    spec = write_spec(
        '[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"\n\n'
        '[nodes.bad]\ndriver = "faults"\nfile = "d0"\nerror-reads = true\nerror-writes = true\n'
        'range-start = "1M"\nrange-length = "64K"\nerrno = "ENOSPC"\n\n'
        '[disks.vm0]\nnode = "bad"\n'
    )
    server = Server(spec, tmp_path / "nbd.sock")
    try:
        bad = run_tool("qemu-io", "-f", "raw", "-c", "read 1M 4k", server.uri, check=False)
        assert "No space left on device" in bad.stdout + bad.stderr, bad
        bad = run_tool("qemu-io", "-f", "raw", "-c", "write 1M 4k", server.uri, check=False)
        assert "No space left on device" in bad.stdout + bad.stderr, bad
        qemu_io(server.uri, "write -P 0x21 2M 4k", "read -P 0x21 2M 4k")  # the rest works
    finally:
        server.stop()


@pytest.mark.mount
def test_a_connection_that_wrote_flushes_as_it_ends(tmp_path, write_spec, mount):
    """nbdcopy without --flush sends no NBD_CMD_FLUSH: the end of its connections
    flushes the disk, so its data is in the host file once it exits."""
    image = make_image(tmp_path / "d0.img", 16 * MiB)
    sock = tmp_path / "nbd.sock"
    m = mount(write_spec(raw_spec()), extra_args=("--nbd", f"unix:{sock}"))
    source = make_image(tmp_path / "src.raw", 16 * MiB, b"ends")
    run_tool("nbdcopy", source, nbd_uri(sock, "vm0"))
    stats = json.loads(m.path("vm0", "nodes", "d0.file", "stats").read_text())
    assert stats["flush"]["ops"] >= 1
    assert image.read_bytes() == source.read_bytes()
