"""qcow2 images made by qemu-img and filled by qemu-io read through fusedisk exactly as
`qemu-img convert -O raw` reads them; block status per layer; header features."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fusedisk.errors import NotSupported, OpenError, ReadOnly
from fusedisk.graph.extents import Status
from tests.qcow2_helpers import (
    KiB,
    MiB,
    create,
    file_state,
    needs_qemu,
    opened,
    patch,
    qemu_img,
    qemu_io,
    raw_of,
)

pytestmark = needs_qemu

FILL = (
    "write -P 0x11 0 300k",
    "write -P 0x22 1m 1m",
    "write -P 0x33 2500k 7k",
    "write -z 3m 128k",
    "write -P 0x44 3200k 100",
)


def plain(*options: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        image = create(d / "img.qcow2", "4M", *options)
        qemu_io(image, *FILL)
        return image

    return make


def compressed(ctype: str) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        src = plain()(d)
        out = d / "c.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, out)
        qemu_io(out, "write -P 0x55 64k 4k")  # one cluster no longer compressed
        return out

    return make


#: the chain's base lies above the top image's folder (where its spec is): allowed explicitly
ANYWHERE = 'backing-files = "any"'


def chain(d: Path) -> Path:
    """A 3-deep chain with relative backing names across folders."""
    (d / "a").mkdir()
    (d / "a" / "b").mkdir()
    base = create(d / "base.qcow2", "4M")
    qemu_io(base, "write -P 0x01 0 4m")
    mid = create(d / "a" / "mid.qcow2", None, backing="../base.qcow2")
    qemu_io(mid, "write -P 0x02 1m 1m", "write -z 1536k 64k")
    top = create(d / "a" / "b" / "top.qcow2", None, backing="../mid.qcow2")
    qemu_io(top, "write -P 0x03 1100k 10k", "write -P 0x04 3m 5")
    return top


def raw_backing(d: Path) -> Path:
    base = d / "base.raw"
    base.write_bytes(b"\x07" * (3 * MiB))  # smaller than the overlay
    top = create(d / "top.qcow2", "4M", backing="base.raw", backing_fmt="raw")
    qemu_io(top, "write -P 0x08 64k 64k")
    return top


def data_file(raw: bool) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        opts = [f"data_file={d / 'img.data'}"] + (["data_file_raw=on"] if raw else [])
        image = create(d / "img.qcow2", "4M", *opts)
        qemu_io(image, *FILL)
        return image

    return make


def snapshots(d: Path) -> Path:
    image = create(d / "img.qcow2", "4M")
    qemu_io(image, "write -P 0x11 0 2m")
    qemu_img("snapshot", "-c", "s1", image)
    qemu_io(image, "write -P 0x22 512k 1m")
    qemu_img("snapshot", "-c", "s2", image)
    qemu_io(image, "write -P 0x33 1m 64k", "write -z 0 64k")
    return image


CASES = {
    "v2": plain("compat=0.10"),
    "v3-64k": plain(),
    "512b-clusters": plain("cluster_size=512"),
    "2m-clusters": plain("cluster_size=2M"),
    "refcount-1": plain("refcount_bits=1"),
    "refcount-64": plain("refcount_bits=64"),
    "extended-l2": plain("extended_l2=on"),
    "extended-l2-16k": plain("extended_l2=on", "cluster_size=16k"),
    "deflate": compressed("zlib"),
    "zstd": compressed("zstd"),
    "chain-3-deep": chain,
    "raw-backing": raw_backing,
    "data-file": data_file(False),
    "data-file-raw": data_file(True),
    "snapshots": snapshots,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
async def test_reads_as_qemu_img_convert(tmp_path: Path, case: str) -> None:
    image = CASES[case](tmp_path)
    expected = raw_of(image)
    before = file_state(image)
    async with opened(image, read_only=True, extra=ANYWHERE) as (_, disk, _node):
        assert disk.size == len(expected)
        assert await disk.read(0, disk.size) == expected
        # odd offsets and lengths across cluster and subcluster boundaries
        for off, n in [(1, 511), (65535, 2), (300 * KiB - 7, 9000), (2 * MiB - 1, 70000)]:
            assert await disk.read(off, n) == expected[off : off + n], (off, n)
    assert file_state(image) == before


async def test_backing_chain_appears_as_backing_children(tmp_path: Path) -> None:
    top = chain(tmp_path)
    async with opened(top, read_only=True, extra=ANYWHERE) as (graph, _, node):
        mid = node.children["backing"]
        assert mid.role == "backing"
        base = mid.node.children["backing"].node
        assert base.driver == "qcow2" and "backing" not in base.children
        assert node.children["file"].node.options["filename"] == str(top)
        assert base.read_only and mid.node.read_only
        assert set(graph.nodes) >= {"d0", "d0.backing", "d0.backing.backing"}


async def test_block_status_reports_allocation_per_layer(tmp_path: Path) -> None:
    top = chain(tmp_path)
    async with opened(top, read_only=True, extra=ANYWHERE) as (_, _, node):
        ext = await node.block_status(0, 4 * MiB)
        assert sum(e.length for e in ext) == 4 * MiB

        def status_at(off: int) -> Status:
            return next(e.status for e in ext if e.offset <= off < e.end)

        assert status_at(1100 * KiB) == Status.DATA | Status.ALLOCATED  # top's own cluster
        assert status_at(0) == Status.DATA  # from the base, not allocated in top
        assert not status_at(1536 * KiB) & Status.ALLOCATED  # the mid layer's zero cluster
        assert status_at(1536 * KiB) & Status.ZERO
        mid = node.children["backing"].node
        mid_ext = await mid.block_status(1536 * KiB, 64 * KiB)
        assert mid_ext[0].status == Status.ZERO | Status.ALLOCATED


async def test_spec_backing_overrides_header(tmp_path: Path) -> None:
    other = tmp_path / "other.raw"
    other.write_bytes(b"\x09" * (4 * MiB))
    top = raw_backing(tmp_path)
    text = f"""
[nodes.alt]
driver = "file"
filename = "{other.name}"

[nodes.d0]
driver = "qcow2"
filename = "{top.name}"
backing = "alt"
read-only = true

[disks.vm0]
node = "d0"
"""
    async with opened(top, spec_text=text) as (_, disk, node):
        assert node.children["backing"].node.name == "alt"
        assert await disk.read(0, 4) == b"\x09" * 4
        assert await disk.read(64 * KiB, 4) == b"\x08" * 4


async def test_backing_null_reads_zeroes_where_unallocated(tmp_path: Path) -> None:
    # `backing = ""` in a spec (QEMU's backing=null); set here as the spec layer will
    top = raw_backing(tmp_path)
    async with opened(top, read_only=True, options={"backing": None}) as (_, disk, node):
        assert "backing" not in node.children
        assert await disk.read(0, 4) == bytes(4)
        assert await disk.read(64 * KiB, 4) == b"\x08" * 4


async def test_unknown_incompatible_bit_is_refused_by_name(tmp_path: Path) -> None:
    image = plain()(tmp_path)
    patch(image, 72, ">Q", 1 << 40)
    before = file_state(image)
    with pytest.raises(NotSupported, match=r"img\.qcow2.*bit 40"):
        async with opened(image):
            pass
    assert file_state(image) == before


async def test_corrupt_bit_opens_read_only_only(tmp_path: Path) -> None:
    image = plain()(tmp_path)
    expected = raw_of(image)
    patch(image, 72, ">Q", 2)
    before = file_state(image)
    with pytest.raises(OpenError, match="marked corrupt"):
        async with opened(image):
            pass
    async with opened(image, read_only=True) as (_, disk, _):
        assert await disk.read(0, disk.size) == expected
        with pytest.raises(ReadOnly):
            await disk.write(0, b"x")
    assert file_state(image) == before


async def test_encrypted_images_are_refused(tmp_path: Path) -> None:
    image = plain()(tmp_path)
    patch(image, 32, ">I", 2)
    with pytest.raises(NotSupported, match="encrypted"):
        async with opened(image, read_only=True):
            pass


@pytest.mark.timeout(60)
async def test_dirty_image_from_qemu_lazy_refcounts_is_repaired(tmp_path: Path) -> None:
    image = create(tmp_path / "img.qcow2", "4M", "lazy_refcounts=on")
    # qemu-io kills itself after writing: the image stays dirty, refcounts stale
    import subprocess

    subprocess.run(
        ["qemu-io", "-c", "write -P 0x5a 0 1m", "-c", "sigraise 9", str(image)],
        capture_output=True,
    )
    assert qemu_img("info", image).stdout  # still an image
    dirty_bit = image.read_bytes()[79] & 1
    assert dirty_bit, "qemu-io left the image clean; the test needs a dirty one"
    async with opened(image) as (_, disk, node):
        assert await disk.read(0, 4) == b"\x5a" * 4
        assert node.driver_stats()["repairs"] == 1
    from tests.qcow2_helpers import assert_clean

    assert_clean(image)
    assert image.read_bytes()[79] & 1 == 0
