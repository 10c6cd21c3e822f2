"""The `file` leaf and the `raw` format, at node level through a Graph."""

from __future__ import annotations

import os

import pytest

from fusedisk.errors import OpenError, ReadOnly
from fusedisk.graph.extents import Status
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec
from tests.conftest import make_image

MiB = 1 << 20


async def open_graph(tmp_path, nodes: str, top: str = "d0") -> Graph:
    text = f'{nodes}\n[disks.vm0]\nnode = "{top}"\n'
    return await Graph.open(parse_spec(text, tmp_path / "spec.toml"))


async def test_block_status_reports_holes_as_zero(tmp_path):
    image = make_image(tmp_path / "d0.img", 4 * MiB)
    with open(image, "r+b") as f:
        f.seek(MiB)
        f.write(b"x" * MiB)
    graph = await open_graph(tmp_path, '[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"')
    try:
        extents = await graph.disks["vm0"].root.block_status(0, 4 * MiB)
        data = [(e.offset, e.length) for e in extents if e.status & Status.DATA]
        assert data == [(MiB, MiB)]
        assert sum(e.length for e in extents) == 4 * MiB
        assert all(e.status & Status.ALLOCATED for e in extents)
    finally:
        await graph.close()


async def test_discard_and_write_zeroes_unmap_punch_holes(tmp_path):
    image = make_image(tmp_path / "d0.img", 4 * MiB, b"\xaa")
    os.sync()
    graph = await open_graph(tmp_path, '[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"')
    try:
        root = graph.disks["vm0"].root
        before = os.stat(image).st_blocks
        await root.write_zeroes(MiB, MiB, unmap=True)
        await root.write_zeroes(2 * MiB, 4096, unmap=False)
        await root.discard(3 * MiB, MiB)
        assert os.stat(image).st_blocks < before - (MiB // 512)
        assert await root.read(MiB, MiB) == bytes(MiB)
        assert await root.read(2 * MiB, 4097) == bytes(4096) + b"\xaa"
    finally:
        await graph.close()


async def test_raw_window_maps_offsets_and_refuses_to_outgrow_it(tmp_path):
    make_image(tmp_path / "d0.img", 2 * MiB)
    graph = await open_graph(
        tmp_path, '[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"\noffset = "1M"\nsize = 4096'
    )
    try:
        disk = graph.disks["vm0"]
        assert disk.size == 4096
        await disk.write(0, b"w" * 4096)
        await disk.flush()  # the host file shows acknowledged writes once flushed
        assert (tmp_path / "d0.img").read_bytes()[MiB : MiB + 4097] == b"w" * 4096 + b"\0"
        extents = await disk.root.block_status(0, 4096)
        assert extents[0].offset == 0 and extents[-1].end == 4096
        with pytest.raises(Exception, match="cannot be resized"):
            await disk.root.truncate(8192)
    finally:
        await graph.close()


async def test_raw_window_past_the_end_is_refused_at_open(tmp_path):
    make_image(tmp_path / "d0.img", MiB)
    with pytest.raises(OpenError, match="node 'd0': option 'offset'"):
        await open_graph(tmp_path, '[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"\noffset = "2M"')


async def test_read_only_file_opens_read_only_and_refuses_writes(tmp_path):
    image = make_image(tmp_path / "d0.img", MiB)
    image.chmod(0o444)
    graph = await open_graph(
        tmp_path,
        '[nodes.d0]\ndriver = "raw"\nfile = { driver = "file", filename = "d0.img", '
        '"read-only" = true }',
    )
    try:
        assert graph.nodes["d0"].read_only  # inherited from its file
        with pytest.raises(ReadOnly):
            await graph.disks["vm0"].write(0, b"x")
    finally:
        await graph.close()


async def test_growable_disk_grows_with_truncate(tmp_path):
    make_image(tmp_path / "d0.img", MiB)
    text = '[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"\n[disks.vm0]\nnode = "d0"\n'
    graph = await Graph.open(parse_spec(text + "growable = true\n", tmp_path / "spec.toml"))
    try:
        disk = graph.disks["vm0"]
        await disk.resize(2 * MiB)
        assert disk.size == 2 * MiB and (tmp_path / "d0.img").stat().st_size == 2 * MiB
        with pytest.raises(Exception, match="shrinking"):
            await disk.resize(MiB)
    finally:
        await graph.close()


async def test_flush_without_writes_skips_fdatasync(tmp_path):
    make_image(tmp_path / "d0.img", MiB)
    graph = await open_graph(tmp_path, '[nodes.d0]\ndriver = "raw"\nfilename = "d0.img"')
    try:
        node = graph.nodes["d0.file"]
        await graph.disks["vm0"].flush()
        assert node._flushed_gen == 0  # nothing written, nothing synced
        await graph.disks["vm0"].write(0, b"x")
        await graph.disks["vm0"].flush()
        assert node._flushed_gen == node._write_gen == 1
    finally:
        await graph.close()
