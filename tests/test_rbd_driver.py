"""The `rbd` driver against a real Ceph cluster (tests/ceph_cluster.py), without a mount:
I/O and block status, resize, the exclusive lock, the image's snapshots, bad options,
and `create`/`info`."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
import trio

from fusedisk.errors import ControlError, OpenError, SpecError
from fusedisk.formats.rbd.create import create_image, image_info
from fusedisk.graph.extents import Status
from fusedisk.graph.graph import Graph
from fusedisk.spec import load_spec
from tests.conftest import cli, run

pytestmark = [pytest.mark.timeout(120)]

MiB = 1 << 20


def rbd_spec(conf: str, pool: str, image: str, extra: str = "", name: str = "r") -> str:
    return f"""
[nodes.{name}]
driver = "rbd"
pool = "{pool}"
image = "{image}"
conf = "{conf}"
{extra}

[disks.vm0]
node = "{name}"
"""


async def open_graph(tmp_path: Path, text: str, name: str = "spec.toml") -> Graph:
    spec = tmp_path / name
    spec.write_text(text)
    return await Graph.open(load_spec(spec))


def test_io_block_status_and_resize(ceph, tmp_path):
    image = ceph.new_image(size="32M")

    async def main() -> None:
        graph = await open_graph(tmp_path, rbd_spec(ceph.conf, "rbd", image))
        try:
            node = graph.nodes["r"]
            assert node.size == 32 * MiB
            status = await node.block_status(0, node.size)
            assert [(e.offset, e.length, e.status) for e in status] == [
                (0, 32 * MiB, Status.ZERO | Status.ALLOCATED)
            ]
            data = os.urandom(MiB + 4096)
            async with trio.open_nursery() as nursery:  # many aio requests at once
                for i in range(8):
                    nursery.start_soon(node.write, 9 * MiB + i * 4096, data[i * 4096 :][:4096])
            await node.write(9 * MiB + 8 * 4096, data[8 * 4096 :])
            await node.flush()
            assert await node.read(9 * MiB, len(data)) == data
            # per 4 MiB object: bytes at 9 MiB make data from their object's start
            status = await node.block_status(0, node.size)
            data_runs = [(e.offset, e.end) for e in status if e.status & Status.DATA]
            assert len(data_runs) == 1
            start, end = data_runs[0]
            assert start == 8 * MiB and 10 * MiB + 4096 <= end <= 12 * MiB
            await node.write_zeroes(9 * MiB, 4096, unmap=False)
            await node.discard(9 * MiB + 4096, 4096)  # advisory: below librbd's granularity
            got = await node.read(9 * MiB, 3 * 4096)
            assert got[:4096] == bytes(4096) and got[8192:] == data[8192:12288]
            await node.truncate(48 * MiB)
            assert node.size == 48 * MiB
        finally:
            await graph.close()

    trio.run(main)
    assert "size 48 MiB" in ceph.rbd("info", f"rbd/{image}")


def test_a_second_writer_is_refused(ceph, tmp_path):
    image = ceph.new_image(size="8M")

    async def main() -> None:
        graph = await open_graph(tmp_path, rbd_spec(ceph.conf, "rbd", image))
        try:
            await graph.nodes["r"].write(0, b"A" * 4096)
            # a second fusedisk: refused at open, with the reason
            with pytest.raises(OpenError, match=r"node 'r': image 'rbd/img.*' is in use"):
                await open_graph(tmp_path, rbd_spec(ceph.conf, "rbd", image), "two.toml")
            # QEMU: its writes fail with EROFS, ours go on
            out = await trio.to_thread.run_sync(
                lambda: run_fail(
                    "qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4k", ceph.qemu_name("rbd", image)
                )
            )
            assert "Read-only file system" in out
            # a read-only open takes no lock: it works beside the writer
            reader = await open_graph(
                tmp_path, rbd_spec(ceph.conf, "rbd", image, "read-only = true"), "ro.toml"
            )
            try:
                assert await reader.nodes["r"].read(0, 4096) == b"A" * 4096
            finally:
                await reader.close()
            await graph.nodes["r"].write(4096, b"B" * 4096)
            assert await graph.nodes["r"].read(0, 8192) == b"A" * 4096 + b"B" * 4096
        finally:
            await graph.close()

    trio.run(main)
    # closed: the lock is free again
    run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4k", ceph.qemu_name("rbd", image))


def run_fail(*cmd: str) -> str:
    import subprocess

    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stdout
    return result.stdout + result.stderr


def test_the_images_snapshots_as_a_control_file(ceph, tmp_path):
    image = ceph.new_image(size="8M")

    async def main() -> None:
        graph = await open_graph(tmp_path, rbd_spec(ceph.conf, "rbd", image))
        try:
            node = graph.nodes["r"]
            control = node.controls()["snapshots"]
            assert control.read() == ""
            assert control.write is not None
            await node.write(0, b"1" * 4096)
            await control.write("create one")
            await node.write(0, b"2" * 4096)
            await control.write("create two")
            assert [line.split("\t")[0] for line in control.read().splitlines()] == [
                "one",
                "two",
            ]
            await node.write(0, b"3" * 4096)
            await control.write("rollback one")
            assert await node.read(0, 4096) == b"1" * 4096
            await control.write("remove two")
            assert [line.split("\t")[0] for line in control.read().splitlines()] == ["one"]
            with pytest.raises(ControlError) as e:
                await control.write("remove nosuch")
            assert e.value.errno == errno.ENOENT
            with pytest.raises(ControlError, match="expected one of"):
                await control.write("frobnicate x")
        finally:
            await graph.close()

    trio.run(main)
    assert "one" in ceph.rbd("snap", "ls", f"rbd/{image}")

    # a snapshot opens read-only, with what it held
    async def snapshot() -> None:
        graph = await open_graph(tmp_path, rbd_spec(ceph.conf, "rbd", image, 'snapshot = "one"'))
        try:
            node = graph.nodes["r"]
            assert node.read_only
            assert await node.read(0, 4096) == b"1" * 4096
        finally:
            await graph.close()

    trio.run(snapshot)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('image = "nosuch"', r"node 'r': no image 'rbd/nosuch'"),
        ('pool = "nopool"', r"node 'r': cannot open pool 'nopool'"),
        ('rados-options = { "bad option" = 1 }', r"node 'r': client option bad option"),
        (
            'server = [{ host = "127.0.0.1" , port = "99999" }]',
            r"node 'r': option 'server'\[0\]: 'port' must be 1-65535",
        ),
        ('key-file = "nokey"', r"node 'r': option 'key-file': cannot open '.*nokey'"),
        ('auth-client-required = "kerberos"', r"option 'auth-client-required': expected cephx"),
    ],
)
def test_bad_options_are_named(ceph, tmp_path, extra, message):
    image = "img-bad"
    text = rbd_spec(ceph.conf, "rbd", image, extra)
    for key in ("image", "pool"):  # a replaced option, not a second one
        if extra.startswith(f"{key} ="):
            text = text.replace(f'{key} = "{"rbd" if key == "pool" else image}"\n', "", 1)
    with pytest.raises((OpenError, SpecError), match=message):
        trio.run(open_graph, tmp_path, text)


def test_an_unreachable_cluster_fails_in_bounded_time(ceph, tmp_path):
    # a port nothing listens on, and no conf: librados gives up after client_mount_timeout
    text = rbd_spec(ceph.conf, "rbd", "x",
                    'server = [{host = "127.0.0.1", port = "9"}]\n'
                    "rados-options = { client_mount_timeout = 3 }")  # fmt: skip
    text = text.replace(f'conf = "{ceph.conf}"\n', "")
    started = time.monotonic()
    with pytest.raises(OpenError, match=r"node 'r': cannot connect to the Ceph cluster"):
        trio.run(open_graph, tmp_path, text)
    assert time.monotonic() - started < 20


def test_cephx_user_with_a_key_file_and_the_monitors_as_servers(ceph, tmp_path):
    image = ceph.new_image(size="8M")
    host, port = ceph.env["CEPH_MON"].strip("[]").removeprefix("v2:").rsplit(":", 1)
    text = rbd_spec(ceph.conf, "rbd", image,
                    f'user = "fusedisk"\nkey-file = "{ceph.secret_file}"\n'
                    f'server = [{{host = "{host}", port = "{port}"}}]')  # fmt: skip
    text = text.replace(f'conf = "{ceph.conf}"\n', "")

    async def main() -> None:
        graph = await open_graph(tmp_path, text)
        try:
            await graph.nodes["r"].write(0, b"k" * 4096)
        finally:
            await graph.close()

    trio.run(main)


def test_create_and_info(ceph, tmp_path):
    name = ceph.qemu_name("rbd", f"made{os.getpid()}")
    create_image(name, 12 * MiB, {"cluster_size": 1 << 20})
    info = image_info(name)
    assert info["virtual-size"] == 12 * MiB
    assert info["format"] == "raw"
    assert info["format-specific"]["data"]["object-size"] == 1 << 20
    with pytest.raises(OpenError, match="exists already"):
        create_image(name, 12 * MiB, {})
    with pytest.raises(OpenError, match="no image"):
        image_info(ceph.qemu_name("rbd", "nosuch"))
    with pytest.raises(SpecError, match="expected rbd:POOL/IMAGE"):
        image_info("rbd:justapool")


def test_the_command_line_creates_and_shows_an_image(ceph):
    name = ceph.qemu_name("rbd", f"cli{os.getpid()}")
    made = cli("create", "-f", "rbd", "-o", "cluster_size=1M", name, "20M")
    assert made.returncode == 0, made.stderr
    shown = cli("info", "--json", name)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["virtual-size"] == 20 * MiB
    ceph.rbd("snap", "create", f"rbd/cli{os.getpid()}@first")
    text = cli("info", name).stdout
    assert "virtual size: 20.0 MiB" in text
    assert "Snapshot list:" in text and "first" in text
    missing = cli("info", ceph.qemu_name("rbd", "nosuch"))
    assert missing.returncode != 0 and "no image 'rbd/nosuch'" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_many_requests_in_flight_use_no_thread_each(ceph, tmp_path):
    """librbd's completions come back through one wake-up per batch: 400 concurrent
    requests start no thread of ours (the process's thread count stays put)."""
    image = ceph.new_image(size="16M")

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    async def main() -> None:
        graph = await open_graph(tmp_path, rbd_spec(ceph.conf, "rbd", image))
        try:
            node = graph.nodes["r"]
            await node.write(0, os.urandom(16 * MiB))
            await node.block_status(0, node.size)  # the worker pool's thread, once
            before = threads()
            got: dict[int, bytes] = {}

            async def read(i: int) -> None:
                got[i] = await node.read(i * 40960, 4096)

            async with trio.open_nursery() as nursery:
                for i in range(400):
                    nursery.start_soon(read, i)
            assert len(got) == 400
            assert threads() <= before + 1
        finally:
            await graph.close()

    trio.run(main)
