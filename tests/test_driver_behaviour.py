"""One behaviour suite that every driver runs (trio's check_one_way_stream, for disks).

Each driver is stacked in a minimal tree over real files and driven through its
Disk by the same seeded sequence of reads, writes, write-zeroes, discards and
flushes at awkward offsets and sizes, checked against a bytearray model; then
the graph is closed, opened again, and every byte the model knows is checked.
A discarded range may read back as anything the format defines, so the model
forgets it until it is written again.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from fusedisk.formats.qcow2.create import create_qcow2
from fusedisk.graph.graph import Graph
from fusedisk.graph.registry import drivers
from fusedisk.spec import parse_spec
from tests.conftest import make_image
from tests.nbd_helpers import serve_file_over_nbd

MiB = 1 << 20
SIZE = 4 * MiB
SIZES = [1, 511, 512, 513, 4095, 4096, 4097, 65535, 65536, 65537, 300_000, MiB]

TREES: dict[str, str] = {
    "file": '[nodes.top]\ndriver = "file"\nfilename = "a.img"',
    "raw": '[nodes.top]\ndriver = "raw"\nfilename = "a.img"\noffset = 4096\nsize = "4M"',
    "qcow2": '[nodes.top]\ndriver = "qcow2"\nfilename = "a.qcow2"',
    "luks": '[nodes.top]\ndriver = "luks"\nfile = { driver = "file", filename = "a.img" }\n'
    'key-file = "key"\nformat = true\npbkdf2-iterations = 1000',
    "throttle": '[nodes.top]\ndriver = "throttle"\niops-total = 1000000\n'
    'file = { driver = "raw", filename = "a.img" }',
    "copy-on-read": '[nodes.top]\ndriver = "copy-on-read"\n'
    'file = { driver = "qcow2", filename = "over.qcow2" }',
    "faults": '[nodes.top]\ndriver = "faults"\nfile = { driver = "raw", filename = "a.img" }',
    "quorum": '[nodes.top]\ndriver = "quorum"\nvote-threshold = 2\nchildren = ['
    '{ driver = "raw", filename = "a.img" }, { driver = "raw", filename = "b.img" }, '
    '{ driver = "raw", filename = "c.img" }]',
    "dedup": '[nodes.top]\ndriver = "dedup"\nformat = true\nsize = "4M"\n'
    'metadata = { driver = "file", filename = "meta.img" }\n'
    'data = { driver = "file", filename = "data.img" }',
    "nbd": '[nodes.top]\ndriver = "nbd"\nserver.path = "nbdkit.sock"',  # nbdkit file a.img
    # an image of the session's Ceph cluster (tests/ceph_cluster.py)
    "rbd": '[nodes.top]\ndriver = "rbd"\npool = "rbd"\nimage = "IMAGE"\nconf = "CONF"',
}


def prepare(folder: Path, driver: str) -> Path:
    for name in ("a.img", "b.img", "c.img"):
        make_image(folder / name, SIZE + (4096 if driver == "raw" else 0))
    if driver == "luks":
        (folder / "a.img").unlink()
        make_image(folder / "a.img", SIZE + 2 * MiB)  # room for the header
        (folder / "key").write_bytes(b"conformance")
    if driver == "qcow2":
        create_qcow2(folder / "a.qcow2", SIZE)
    if driver == "copy-on-read":
        make_image(folder / "base.img", SIZE, b"base")
        create_qcow2(folder / "over.qcow2", SIZE, backing="base.img", backing_fmt="raw")
    if driver == "dedup":
        make_image(folder / "meta.img", 0)
        make_image(folder / "data.img", 0)
    spec = folder / "spec.toml"
    spec.write_text(TREES[driver] + '\n[disks.vm0]\nnode = "top"\n')
    return spec


def test_every_driver_is_in_the_behaviour_suite():
    assert set(drivers()) == set(TREES)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("driver", sorted(TREES))
async def test_driver_keeps_what_the_model_says(driver, tmp_path, request):
    spec = prepare(tmp_path, driver)
    if driver == "nbd":
        request.addfinalizer(serve_file_over_nbd(tmp_path / "nbdkit.sock", tmp_path / "a.img"))
    if driver == "rbd":
        ceph = request.getfixturevalue("ceph")
        text = spec.read_text().replace("IMAGE", ceph.new_image(size="4M"))
        spec.write_text(text.replace("CONF", ceph.conf))
    graph = await Graph.open(parse_spec(spec.read_text(), spec))
    disk = graph.disks["vm0"]
    size = disk.size
    model = bytearray(await disk.read(0, size))
    known = bytearray(b"\x01" * size)  # 0 where a discard left the content undefined
    rng = random.Random(f"fusedisk-{driver}")
    try:
        for _ in range(120):
            kind = rng.choice(["write", "write", "write", "read", "zeroes", "discard", "flush"])
            offset = rng.randrange(0, size - 1)
            length = min(rng.choice(SIZES), size - offset)
            if kind == "write":
                data = rng.randbytes(length)
                await disk.write(offset, data)
                model[offset : offset + length] = data
                known[offset : offset + length] = b"\x01" * length
            elif kind == "zeroes":
                await disk.root.write_zeroes(offset, length, rng.random() < 0.5)
                model[offset : offset + length] = bytes(length)
                known[offset : offset + length] = b"\x01" * length
            elif kind == "discard":
                await disk.discard(offset, length)
                known[offset : offset + length] = bytes(length)
            elif kind == "read":
                got = await disk.read(offset, length)
                assert len(got) == length
                _assert_known(got, model, known, offset, f"{driver}: read {offset}+{length}")
            else:
                await disk.flush()
        await disk.flush()
    finally:
        await graph.close()

    graph = await Graph.open(parse_spec(spec.read_text(), spec))
    try:
        again = await graph.disks["vm0"].read(0, size)
        _assert_known(again, model, known, 0, f"{driver}: after reopening")
    finally:
        await graph.close()


def _assert_known(got: bytes, model: bytearray, known: bytearray, offset: int, what: str) -> None:
    end = offset + len(got)
    have = np.frombuffer(got, np.uint8)
    want = np.frombuffer(model, np.uint8)[offset:end]
    wrong = np.flatnonzero((have != want) & (np.frombuffer(known, np.uint8)[offset:end] != 0))
    if wrong.size:
        pos = int(wrong[0])
        raise AssertionError(
            f"{what}: byte {offset + pos} is {have[pos]:#x}, expected {want[pos]:#x} "
            f"({wrong.size} bytes differ)"
        )
