"""Corrupt qcow2 images are refused with a sentence naming the image and what is wrong;
nothing is written to them (bytes and mtime unchanged), nothing hangs or crashes."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from fusedisk.errors import FuseDiskError
from tests.qcow2_helpers import (
    MiB,
    create,
    file_state,
    header_field,
    needs_qemu,
    opened,
    patch,
    qemu_img,
    qemu_io,
)

pytestmark = needs_qemu

CS = 65536


def good_image(d: Path) -> Path:
    image = create(d / "img.qcow2", "4M")
    qemu_io(image, "write -P 0x11 0 4m")
    return image


def l1_offset(image: Path) -> int:
    return header_field(image, 40, ">Q")


def first_l2(image: Path) -> int:
    return header_field(image, l1_offset(image), ">Q") & 0x00FF_FFFF_FFFF_FE00


def reftable_offset(image: Path) -> int:
    return header_field(image, 48, ">Q")


def truncated(image: Path) -> None:
    os.truncate(image, 2 * MiB)


def truncated_to_header(image: Path) -> None:
    os.truncate(image, 100)


def l1_unaligned(image: Path) -> None:
    patch(image, 40, ">Q", l1_offset(image) + 8)


def l1_past_end(image: Path) -> None:
    patch(image, 40, ">Q", 1 << 40)


def l2_past_end(image: Path) -> None:
    patch(image, l1_offset(image), ">Q", (1 << 63) | (1 << 40))


def l2_unaligned(image: Path) -> None:
    patch(image, l1_offset(image), ">Q", (1 << 63) | (first_l2(image) + 512))


def reftable_past_end(image: Path) -> None:
    patch(image, 48, ">Q", 1 << 40)


def refblock_unaligned(image: Path) -> None:
    entry = header_field(image, reftable_offset(image), ">Q")
    patch(image, reftable_offset(image), ">Q", entry + 512)


def l1_overlaps_reftable(image: Path) -> None:
    patch(image, 40, ">Q", reftable_offset(image))


def l2_is_the_l1_table(image: Path) -> None:
    patch(image, l1_offset(image), ">Q", (1 << 63) | l1_offset(image))


def data_overlaps_l1(image: Path) -> None:
    patch(image, first_l2(image), ">Q", (1 << 63) | l1_offset(image))


def data_unaligned(image: Path) -> None:
    entry = header_field(image, first_l2(image), ">Q")
    patch(image, first_l2(image), ">Q", entry + 4096)


def absurd_size(image: Path) -> None:
    patch(image, 24, ">Q", 1 << 60)  # the L1 table is far too small for it


def absurd_l1_size(image: Path) -> None:
    patch(image, 36, ">I", 0xFFFFFFF0)


def absurd_cluster_bits(image: Path) -> None:
    patch(image, 20, ">I", 31)


def absurd_reftable(image: Path) -> None:
    patch(image, 56, ">I", 0x7FFFFFFF)


def bad_magic(image: Path) -> None:
    patch(image, 0, ">I", 0x12345678)


def backing_name_outside(image: Path) -> None:
    patch(image, 8, ">Q", CS - 4)
    patch(image, 16, ">I", 100)


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated file": (truncated, "past the end of the file"),
    "file shorter than a header": (truncated_to_header, "qcow2"),
    "L1 offset unaligned": (l1_unaligned, "not cluster-aligned"),
    "L1 offset past the end": (l1_past_end, "past the end"),
    "L2 offset past the end": (l2_past_end, "past the end"),
    "L2 offset unaligned": (l2_unaligned, "unaligned"),
    "refcount table past the end": (reftable_past_end, "past the end"),
    "refcount block unaligned": (refblock_unaligned, "unaligned"),
    "L1 overlaps refcount table": (l1_overlaps_reftable, "overlaps"),
    "L2 table is the L1 table": (l2_is_the_l1_table, "overlaps"),
    "data cluster overlaps L1": (data_overlaps_l1, "overlaps metadata"),
    "data cluster unaligned": (data_unaligned, "unaligned"),
    "absurd virtual size": (absurd_size, "too small for the virtual size"),
    "absurd L1 size": (absurd_l1_size, "absurdly large"),
    "absurd cluster bits": (absurd_cluster_bits, "cluster_bits 31"),
    "absurd refcount table": (absurd_reftable, "absurdly large"),
    "bad magic": (bad_magic, "not a qcow2 image"),
    "backing name outside cluster 0": (backing_name_outside, "backing file name"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(CASES))
async def test_corrupt_image_is_refused_untouched(tmp_path: Path, case: str) -> None:
    damage, reason = CASES[case]
    image = good_image(tmp_path)
    damage(image)
    before = file_state(image)
    with pytest.raises(FuseDiskError) as info:
        async with opened(image) as (_, disk, _):  # read-write: still nothing is written
            await disk.read(0, disk.size)
    message = str(info.value)
    assert str(image) in message, message
    assert reason in message, message
    assert file_state(image) == before


@pytest.mark.timeout(30)
async def test_backing_chain_loop_is_refused(tmp_path: Path) -> None:
    a = create(tmp_path / "a.qcow2", "1M")
    b = create(tmp_path / "b.qcow2", None, backing="a.qcow2")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)
    before = (file_state(a), file_state(b))
    with pytest.raises(FuseDiskError, match="backing chain loops") as info:
        async with opened(b):
            pass
    assert str(a) in str(info.value) and str(b) in str(info.value)
    assert (file_state(a), file_state(b)) == before


@pytest.mark.timeout(30)
async def test_self_backing_is_refused(tmp_path: Path) -> None:
    a = create(tmp_path / "a.qcow2", "1M")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", a)
    with pytest.raises(FuseDiskError, match="loops"):
        async with opened(a, read_only=True):
            pass


async def test_missing_backing_file_names_it(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "1M")
    top = create(tmp_path / "top.qcow2", None, backing="base.qcow2")
    base.unlink()
    with pytest.raises(FuseDiskError, match=r"base\.qcow2"):
        async with opened(top):
            pass


async def test_l2_table_beyond_the_cache_is_checked_when_loaded(tmp_path: Path) -> None:
    image = create(tmp_path / "img.qcow2", "64M", "cluster_size=4k")
    qemu_io(image, "write -P 0x11 0 64m")
    # the last L2 table: its first entry now points past the end of the file
    l1 = l1_offset(image)
    l1_size = header_field(image, 36, ">I")
    last_l2 = header_field(image, l1 + 8 * (l1_size - 1), ">Q") & 0x00FF_FFFF_FFFF_FE00
    patch(image, last_l2, ">Q", (1 << 63) | (1 << 45))
    before = file_state(image)
    async with opened(image, extra='l2-cache-size = "16K"') as (_, disk, _):
        assert await disk.read(0, 4) == b"\x11" * 4
        with pytest.raises(FuseDiskError, match="past the end of the file"):
            await disk.read((l1_size - 1) * 512 * 4096, 4096)
        with pytest.raises(FuseDiskError, match="past the end of the file"):
            await disk.write((l1_size - 1) * 512 * 4096, b"x")
    # only the dirty bit was set and cleared: the tables are as they were
    data = image.read_bytes()
    assert struct.unpack_from(">Q", data, last_l2)[0] == (1 << 63) | (1 << 45)
    assert len(data) == before[2]
