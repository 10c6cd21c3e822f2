"""Opening, formatting and checking dedup images; corrupt metadata is refused with a
clear error and nothing written; the `fusedisk dedup` command."""

from __future__ import annotations

import hashlib
import logging
import random
import struct
from pathlib import Path

import pytest

from fusedisk.cli import main as cli
from fusedisk.errors import CorruptImage, OpenError
from fusedisk.formats.dedup import DedupNode
from fusedisk.formats.dedup.index import ContentIndex
from fusedisk.formats.dedup.layout import (
    BUCKET_HEADER,
    PAGE,
    Superblock,
    TxnHeader,
    pick_superblock,
    txn_checksum,
    txn_set_checksum,
)
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec
from tests.test_dedup_io import BS, MiB, abandon, dedup_disk, open_dedup, pattern_block, spec_text

pytestmark = pytest.mark.timeout(60)


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in ("meta.img", "data.img")
    }


def superblock(folder: Path) -> Superblock:
    raw = (folder / "meta.img").read_bytes()
    sb, _ = pick_superblock([raw[:PAGE], raw[PAGE : 2 * PAGE]])
    assert sb is not None
    return sb


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


async def make_image(folder: Path, blocks: int = 16) -> list[bytes]:
    """A closed image with `blocks` blocks of data, each twice (at 0 and at 1 MiB)."""
    contents = [pattern_block(k + 1) for k in range(blocks)]
    async with dedup_disk(folder) as (disk, _):
        await disk.write(0, b"".join(contents))
        await disk.write(MiB, b"".join(contents))
    return contents


async def refused(folder: Path, match: str, **kw: object) -> OpenError:
    before = fingerprint(folder)
    with pytest.raises(OpenError, match=match) as info:
        graph = await open_dedup(folder, **kw)
        await graph.close()
    assert fingerprint(folder) == before, "a refused image was written to"
    return info.value


# -- formatting ----------------------------------------------------------------------------


async def test_format_refuses_a_child_holding_data(tmp_path):
    (tmp_path / "meta.img").touch()
    (tmp_path / "data.img").write_bytes(b"\0" * 8192 + b"x" + b"\0" * 4095)
    err = await refused(tmp_path, r"child 'data' \(node 'dd.data'\) is not empty \(it holds data\)")
    assert "format = true only formats empty children" in str(err)


async def test_format_refuses_a_child_holding_another_format(tmp_path):
    (tmp_path / "meta.img").write_bytes(b"QFI\xfb" + bytes(PAGE))
    (tmp_path / "data.img").touch()
    await refused(tmp_path, r"child 'metadata' .* not empty \(it holds a qcow2 image\)")


async def test_format_accepts_children_that_read_as_zeroes(tmp_path):
    with open(tmp_path / "meta.img", "wb") as f:
        f.truncate(3 * MiB)
    (tmp_path / "data.img").write_bytes(bytes(64 * 1024))
    async with dedup_disk(tmp_path) as (disk, _):
        await disk.write(0, pattern_block(1))
        assert await disk.read(0, BS) == pattern_block(1)


async def test_without_format_an_empty_child_is_refused(tmp_path):
    (tmp_path / "meta.img").touch()
    (tmp_path / "data.img").touch()
    text = spec_text().replace("format = true", "format = false")
    with pytest.raises(OpenError, match="holds no dedup image; set format = true"):
        await Graph.open(parse_spec(text, tmp_path / "spec.toml"))
    assert (tmp_path / "meta.img").stat().st_size == 0


async def test_format_true_opens_an_existing_image_as_it_is(tmp_path):
    contents = await make_image(tmp_path)
    async with dedup_disk(tmp_path) as (disk, _):
        assert await disk.read(MiB, len(contents) * BS) == b"".join(contents)
    await refused(tmp_path, "option 'size': the image .* was formatted with 16777216 bytes",
                  size=32 * MiB)  # fmt: skip
    await refused(tmp_path, "option 'block-size': .* formatted with 4096", bs=8192)


async def test_block_size_is_chosen_at_format_time(tmp_path):
    async with dedup_disk(tmp_path, bs=65536) as (disk, node):
        assert node.request_alignment == 65536
        await disk.write(100, b"x")  # read-modify-write of a 64 KiB block by the edge
        await disk.write(65536, b"x".rjust(101, b"\0"))
        assert node.driver_stats()["physical_bytes_used"] == 65536  # the same block
    assert superblock(tmp_path).block_size == 65536


# -- corrupt metadata: a clear error, nothing written ----------------------------------------


async def test_bad_magic_is_refused(tmp_path):
    await make_image(tmp_path)
    patch(tmp_path / "meta.img", 0, b"XXXXXXXX")
    patch(tmp_path / "meta.img", PAGE, b"XXXXXXXX")
    text = spec_text().replace("format = true", "format = false")
    before = fingerprint(tmp_path)
    with pytest.raises(OpenError, match="holds no dedup image"):
        await Graph.open(parse_spec(text, tmp_path / "spec.toml"))
    await refused(tmp_path, r"is not empty \(it holds data\)")  # format = true: not reformatted
    assert fingerprint(tmp_path) == before


async def test_a_torn_superblock_slot_falls_back_to_the_other(tmp_path):
    contents = await make_image(tmp_path)
    sb = superblock(tmp_path)
    patch(tmp_path / "meta.img", (sb.epoch % 2) * PAGE + 100, b"\xff")
    async with dedup_disk(tmp_path) as (disk, _):
        assert await disk.read(0, len(contents) * BS) == b"".join(contents)


async def test_both_superblock_slots_bad_is_refused(tmp_path):
    await make_image(tmp_path)
    patch(tmp_path / "meta.img", 100, b"\xff")
    patch(tmp_path / "meta.img", PAGE + 100, b"\xff")
    with pytest.raises(CorruptImage, match=r"no valid dedup superblock \(slot 0: bad checksum"):
        await open_dedup(tmp_path)


async def test_truncated_metadata_is_refused(tmp_path):
    await make_image(tmp_path)
    sb = superblock(tmp_path)
    with open(tmp_path / "meta.img", "r+b") as f:
        f.truncate(sb.metadata_size - PAGE)
    before = fingerprint(tmp_path)
    with pytest.raises(CorruptImage, match=r"child 'metadata' .* is truncated: it has \d+ bytes"):
        await open_dedup(tmp_path)
    assert fingerprint(tmp_path) == before


async def test_an_index_entry_out_of_range_is_refused(tmp_path):
    await make_image(tmp_path)
    sb = superblock(tmp_path)
    block = pattern_block(99)
    digest = ContentIndex.hash(block)
    bucket = int.from_bytes(digest[8:16], "little") % sb.index_buckets
    page = bytearray(PAGE)
    page[8:12] = struct.pack("<I", 1)  # one entry
    page[BUCKET_HEADER : BUCKET_HEADER + 8] = digest[:8]
    struct.pack_into("<Q", page, BUCKET_HEADER + 8, sb.physical_blocks + 10)
    patch(tmp_path / "meta.img", sb.index_offset + bucket * PAGE, ContentIndex.seal(page))
    before = fingerprint(tmp_path)
    async with dedup_disk(tmp_path) as (disk, node):
        with pytest.raises(CorruptImage, match=f"index bucket {bucket} slot 0 points to physical "
                           f"block {sb.physical_blocks + 9}, past the"):  # fmt: skip
            await disk.write(4 * MiB, block)
        report = await node.check()
        assert report.status == "corrupt"
        assert any(f"index bucket {bucket} slot 0" in e for e in report.errors)
    assert fingerprint(tmp_path) == before


async def test_a_map_entry_out_of_range_is_refused(tmp_path):
    await make_image(tmp_path)
    sb = superblock(tmp_path)
    patch(tmp_path / "meta.img", sb.map_offset + 3 * 8, struct.pack("<Q", sb.physical_blocks + 7))
    before = fingerprint(tmp_path)
    async with dedup_disk(tmp_path) as (disk, node):
        with pytest.raises(CorruptImage, match="map entry of logical block 3 points to physical"):
            await disk.read(0, BS)
        report = await node.check()
        assert any("logical block 3 maps to physical block" in e for e in report.errors)
    assert fingerprint(tmp_path) == before


async def test_a_journal_naming_a_page_outside_its_regions_is_refused(tmp_path):
    graph = await open_dedup(tmp_path)
    await graph.disks["vm0"].write(0, pattern_block(1))
    await graph.disks["vm0"].flush()
    await abandon(graph)  # a crash: the transaction is only in the journal
    sb = superblock(tmp_path)
    raw = bytearray((tmp_path / "meta.img").read_bytes())
    at = sb.journal_offset
    hdr = TxnHeader.unpack(bytes(raw[at : at + PAGE]))
    assert hdr is not None and hdr.n_pages > 0
    struct.pack_into("<Q", raw, at + PAGE, 1)  # the first key: the second superblock slot
    head = bytearray(raw[at : at + PAGE])
    txn_set_checksum(head, txn_checksum(head, raw[at + PAGE : at + hdr.total_pages * PAGE]))
    raw[at : at + PAGE] = head
    (tmp_path / "meta.img").write_bytes(raw)
    before = fingerprint(tmp_path)
    with pytest.raises(CorruptImage, match="journal transaction 0 names metadata page 1"):
        await open_dedup(tmp_path)
    assert fingerprint(tmp_path) == before


# -- after a crash ---------------------------------------------------------------------------


async def test_open_after_a_crash_replays_the_journal(tmp_path, caplog):
    graph = await open_dedup(tmp_path)
    disk = graph.disks["vm0"]
    await disk.write(0, pattern_block(1) * 3 + pattern_block(2))
    await disk.flush()
    await disk.write(8 * BS, pattern_block(3))  # never flushed: may be lost
    await abandon(graph)
    caplog.set_level(logging.INFO, logger="fusedisk")
    async with dedup_disk(tmp_path) as (disk, node):
        assert "replayed 1 journal transactions" in caplog.text
        assert await disk.read(0, 4 * BS) == pattern_block(1) * 3 + pattern_block(2)
        assert (await node.check()).status == "clean"


async def test_a_read_only_open_after_a_crash_writes_nothing(tmp_path):
    graph = await open_dedup(tmp_path)
    await graph.disks["vm0"].write(0, pattern_block(1) * 2)
    await graph.disks["vm0"].flush()
    await abandon(graph)
    before = fingerprint(tmp_path)
    text = spec_text().replace("format = true", "read-only = true")
    graph = await Graph.open(parse_spec(text, tmp_path / "spec.toml"))
    try:
        assert await graph.disks["vm0"].read(0, 2 * BS) == pattern_block(1) * 2
        node = graph.nodes["dd"]
        assert isinstance(node, DedupNode)
        assert (await node.check()).status == "clean"
    finally:
        await graph.close()
    assert fingerprint(tmp_path) == before


# -- the check finds what is wrong ------------------------------------------------------------


def test_check_command_reports_leaks_and_corruption(tmp_path, capsys):
    import trio

    trio.run(make_image, tmp_path)
    meta, data = str(tmp_path / "meta.img"), str(tmp_path / "data.img")
    assert cli(["dedup", "check", "--metadata", meta, "--data", data]) == 0
    assert "status: clean" in capsys.readouterr().out
    sb = superblock(tmp_path)
    refcount_at = sb.pbt_offset + 5 * 32
    original = (tmp_path / "meta.img").read_bytes()[refcount_at : refcount_at + 8]
    patch(tmp_path / "meta.img", refcount_at, struct.pack("<Q", 3))  # 2 references
    assert cli(["dedup", "check", "--metadata", meta, "--data", data]) == 3
    assert (
        "physical block 5 has refcount 3 but 2 logical blocks map to it" in capsys.readouterr().out
    )
    patch(tmp_path / "meta.img", refcount_at, struct.pack("<Q", 1))
    assert cli(["dedup", "check", "--metadata", meta, "--data", data]) == 2
    patch(tmp_path / "meta.img", refcount_at, original)
    patch(tmp_path / "data.img", 7 * BS + 9, b"\x00\x01")
    assert cli(["dedup", "check", "--metadata", meta, "--data", data, "--quick"]) == 0
    assert cli(["dedup", "check", "--metadata", meta, "--data", data]) == 2
    assert "physical block 7: its data does not match its hash" in capsys.readouterr().out


def test_create_command_makes_an_image_and_never_replaces_one(tmp_path, capsys):
    meta, data = str(tmp_path / "m.img"), str(tmp_path / "d.img")
    args = ["dedup", "create", "--metadata", meta, "--data", data, "--size", "64M"]
    assert cli([*args, "--block-size", "8K"]) == 0
    assert cli(["dedup", "check", "--metadata", meta, "--data", data]) == 0
    assert cli(args) == 1
    assert "already holds a dedup image" in capsys.readouterr().err
    sb, _ = pick_superblock([(tmp_path / "m.img").read_bytes()[i * PAGE : (i + 1) * PAGE]
                             for i in range(2)])  # fmt: skip
    assert sb is not None and sb.block_size == 8192 and sb.logical_size == 64 * MiB
    other = tmp_path / "full.img"
    other.write_bytes(random.Random(1).randbytes(8192))
    assert cli(["dedup", "create", "--metadata", str(tmp_path / "m2.img"), "--data",
                str(other), "--size", "1M"]) == 1  # fmt: skip
    assert "not empty" in capsys.readouterr().err
    assert not (tmp_path / "m2.img").exists()  # what create made is removed again
