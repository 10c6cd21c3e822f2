"""Dedup among the other drivers: luks below it, throttle above it, a qcow2 overlay
above it (how a snapshot stacks), a quorum of dedup nodes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fusedisk.formats.dedup import DedupNode
from fusedisk.graph.graph import Graph
from fusedisk.graph.registry import drivers
from fusedisk.spec import parse_spec
from tests.test_dedup_io import MiB, make_children

pytestmark = pytest.mark.timeout(60)


def needs_drivers(*names: str) -> pytest.MarkDecorator:
    missing = [n for n in names if n not in drivers()]
    return pytest.mark.skipif(bool(missing), reason=f"drivers missing: {missing}")


async def open_spec(folder: Path, text: str) -> Graph:
    return await Graph.open(parse_spec(text, folder / "spec.toml"))


@needs_drivers("luks", "throttle")
async def test_luks_below_dedup_still_dedups_and_hides_the_data(tmp_path):
    (tmp_path / "vm0.key").write_bytes(b"correct horse")
    with open(tmp_path / "data.luks", "wb") as f:
        f.truncate(2 * MiB + 8 * MiB)
    luks = (
        '{ driver = "luks", key-file = "vm0.key", format = true, pbkdf2-iterations = 1000, '
        'file = { driver = "file", filename = "data.luks" } }'
    )
    # A new LUKS payload decrypts to noise: zero it so that dedup may format it.
    graph = await open_spec(tmp_path, f'[nodes]\nc = {luks}\n[disks.vm0]\nnode = "c"\n')
    await graph.disks["vm0"].root.write_zeroes(0, 8 * MiB)
    await graph.close()
    (tmp_path / "meta.img").touch()
    text = f"""
[nodes.dd]
driver = "dedup"
format = true
size = "16M"
metadata = {{ driver = "file", filename = "meta.img" }}
data = {luks}

[nodes.thr]
driver = "throttle"
file = "dd"
bps-total = "1G"

[disks.vm0]
node = "thr"
"""
    blob = random.Random(1).randbytes(MiB)
    graph = await open_spec(tmp_path, text)
    try:
        disk = graph.disks["vm0"]
        for i in range(4):
            await disk.write(i * 2 * MiB, blob)
        await disk.flush()
        node = graph.nodes["dd"]
        assert isinstance(node, DedupNode)
        assert node.driver_stats()["dedup_ratio"] == 4.0
        assert node.children["data"].node.driver == "luks"
    finally:
        await graph.close()
    assert blob[:4096] not in (tmp_path / "data.luks").read_bytes()  # encrypted
    graph = await open_spec(tmp_path, text)
    try:
        for i in range(4):
            assert await graph.disks["vm0"].read(i * 2 * MiB, MiB) == blob
    finally:
        await graph.close()


@needs_drivers("qcow2")
async def test_a_qcow2_overlay_above_dedup_keeps_the_dedup_image_unchanged(tmp_path):
    from fusedisk.formats.qcow2.create import create_qcow2

    make_children(tmp_path)
    blob = random.Random(2).randbytes(MiB)
    base = """
[nodes.dd]
driver = "dedup"
format = true
size = "16M"
metadata = { driver = "file", filename = "meta.img" }
data = { driver = "file", filename = "data.img" }
"""
    graph = await open_spec(tmp_path, base + '[disks.vm0]\nnode = "dd"\n')
    await graph.disks["vm0"].write(0, blob)
    await graph.close()
    create_qcow2(tmp_path / "top.qcow2", 16 * MiB)
    text = (
        base
        + """
[nodes.top]
driver = "qcow2"
filename = "top.qcow2"
backing = "dd"

[disks.vm0]
node = "top"
"""
    )
    graph = await open_spec(tmp_path, text)
    try:
        disk = graph.disks["vm0"]
        assert await disk.read(0, MiB) == blob  # through the overlay, from dedup
        await disk.write(4096, b"new" * 100)
        await disk.flush()
        assert graph.nodes["dd"].driver_stats()["logical_bytes_used"] == MiB
    finally:
        await graph.close()
    graph = await open_spec(tmp_path, base + '[disks.vm0]\nnode = "dd"\n')
    try:
        assert await graph.disks["vm0"].read(0, MiB) == blob  # the base did not change
    finally:
        await graph.close()


@needs_drivers("quorum")
async def test_a_quorum_of_dedup_nodes(tmp_path):
    nodes = []
    for i in range(3):
        (tmp_path / f"m{i}.img").touch()
        (tmp_path / f"d{i}.img").touch()
        nodes.append(f"""
[nodes.dd{i}]
driver = "dedup"
format = true
size = "8M"
metadata = {{ driver = "file", filename = "m{i}.img" }}
data = {{ driver = "file", filename = "d{i}.img" }}
""")
    text = (
        "".join(nodes)
        + """
[nodes.q]
driver = "quorum"
children = ["dd0", "dd1", "dd2"]
vote-threshold = 2

[disks.vm0]
node = "q"
"""
    )
    blob = random.Random(3).randbytes(MiB)
    graph = await open_spec(tmp_path, text)
    try:
        disk = graph.disks["vm0"]
        for i in range(4):
            await disk.write(i * MiB, blob)
        await disk.flush()
        for i in range(4):
            assert await disk.read(i * MiB, MiB) == blob
        for i in range(3):
            assert graph.nodes[f"dd{i}"].driver_stats()["dedup_ratio"] == 4.0
    finally:
        await graph.close()
