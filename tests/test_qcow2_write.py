"""Writes through fusedisk's qcow2 driver, checked against a model and against QEMU's tools:
after close, `qemu-img check` is clean and `qemu-img compare` finds the model."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedisk.formats.qcow2 import Qcow2Node
from tests.qcow2_helpers import (
    KiB,
    MiB,
    assert_clean,
    create,
    needs_qemu,
    opened,
    pattern,
    qemu_img,
    qemu_io,
    raw_of,
)

pytestmark = needs_qemu

SIZE = 4 * MiB
LENGTHS = [1, 511, 512, 4095, 4096, 65535, 65536, 65537, 200 * KiB, MiB - 1, MiB, MiB + 1]

op = st.tuples(
    st.sampled_from(["write", "write", "write", "zero", "discard", "flush", "read"]),
    st.integers(0, SIZE - 1),
    st.sampled_from(LENGTHS),
    st.integers(0, 2**32),
)


async def apply_ops(image: Path, model: bytearray, ops: list, discard_cs: int | None) -> None:
    """Apply ops to the image and the model; discard zeroes whole clusters of `discard_cs`."""
    async with opened(image) as (_, disk, _node):
        for kind, off, n, seed in ops:
            n = min(n, SIZE - off)
            if kind == "write":
                data = pattern(seed, n)
                await disk.write(off, data)
                model[off : off + n] = data
            elif kind == "zero":
                await disk.root.write_zeroes(off, n, seed % 2 == 0)
                model[off : off + n] = bytes(n)
            elif kind == "discard":
                await disk.discard(off, n)
                if discard_cs:  # whole clusters read as zeroes afterwards
                    cs = discard_cs
                    a, z = -(-off // cs) * cs, (off + n) // cs * cs
                    if z > a:
                        model[a:z] = bytes(z - a)
            elif kind == "flush":
                await disk.flush()
            else:
                assert await disk.read(off, n) == bytes(model[off : off + n])
        assert await disk.read(0, SIZE) == bytes(model)


def check_against_model(image: Path, model: bytearray) -> None:
    assert_clean(image)
    ref = image.with_name("model.raw")
    ref.write_bytes(model)
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", image, ref)


def fresh_dir(tmp_path: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=tmp_path))


SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.timeout(120)
@SETTINGS
@given(ops=st.lists(op, min_size=1, max_size=25), options=st.sampled_from(
    [(), ("compat=0.10",), ("cluster_size=512", "refcount_bits=64"), ("extended_l2=on",),
     ("refcount_bits=1",)]))  # fmt: skip
def test_random_writes_on_fresh_images(tmp_path: Path, ops: list, options: tuple) -> None:
    d = fresh_dir(tmp_path)
    image = create(d / "img.qcow2", SIZE, *options)
    model = bytearray(SIZE)
    # discard makes whole clusters read as zeroes here (no backing file)
    trio.run(apply_ops, image, model, ops, 512 if "cluster_size=512" in options else 65536)
    check_against_model(image, model)


@pytest.mark.timeout(120)
@SETTINGS
@given(ops=st.lists(op, min_size=1, max_size=25), v2=st.booleans())
def test_random_writes_with_backing_file(tmp_path: Path, ops: list, v2: bool) -> None:
    d = fresh_dir(tmp_path)
    base = create(d / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x61 0 4m")
    top = create(d / "top.qcow2", None, *(["compat=0.10"] if v2 else []), backing="base.qcow2")
    qemu_io(top, "write -P 0x62 1m 100k")
    model = bytearray(raw_of(top))
    base_before = base.read_bytes()
    # v2 cannot mark a cluster zero over a backing file: discard leaves data as it was
    trio.run(apply_ops, top, model, ops, None if v2 else 65536)
    check_against_model(top, model)
    assert base.read_bytes() == base_before


@pytest.mark.timeout(120)
@settings(SETTINGS, max_examples=8)
@given(ops=st.lists(op, min_size=1, max_size=25))
def test_random_writes_keep_internal_snapshots(tmp_path: Path, ops: list) -> None:
    d = fresh_dir(tmp_path)
    image = create(d / "img.qcow2", SIZE)
    qemu_io(image, "write -P 0x71 0 3m")
    qemu_img("snapshot", "-c", "s1", image)
    qemu_io(image, "write -P 0x72 512k 1m", "write -c -P 0x73 3m 64k")
    qemu_img("snapshot", "-c", "s2", image)
    snaps = {s: raw_of(image, "-l", f"snapshot.name={s}") for s in ("s1", "s2")}
    model = bytearray(raw_of(image))
    trio.run(apply_ops, image, model, ops, 65536)
    check_against_model(image, model)
    for s, data in snaps.items():
        assert raw_of(image, "-l", f"snapshot.name={s}") == data, s


@pytest.mark.timeout(60)
async def test_concurrent_writes_same_and_different_clusters(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", SIZE)
    qemu_io(base, "write -P 0x41 0 4m")
    image = create(tmp_path / "img.qcow2", None, backing="base.qcow2")
    model = bytearray(raw_of(image))
    rnd = random.Random(7)
    # non-overlapping pieces, many in the same clusters, written all at once
    pieces = []
    for slot in range(256):
        off = slot * 16 * KiB + rnd.randrange(0, 8 * KiB)
        pieces.append((off, pattern(slot, rnd.choice([1, 512, 3000, 8 * KiB]))))
    rnd.shuffle(pieces)
    async with opened(image) as (_, disk, node):

        async def put(off: int, data: bytes) -> None:
            await disk.write(off, data)

        async with trio.open_nursery() as nursery:
            for off, data in pieces:
                nursery.start_soon(put, off, data)
                model[off : off + len(data)] = data
            nursery.start_soon(disk.flush)
        assert await disk.read(0, SIZE) == bytes(model)
        # overwrites of allocated clusters take the lock-free path
        stats = node.driver_stats()
        before = stats["allocating_writes"]
        async with trio.open_nursery() as nursery:
            for off, data in pieces[:50]:
                nursery.start_soon(put, off, data[::-1])
                model[off : off + len(data)] = data[::-1]
        assert node.driver_stats()["allocating_writes"] == before
    check_against_model(image, model)


async def test_overwrite_of_allocated_cluster_does_not_wait_on_allocation(
    tmp_path: Path,
) -> None:
    image = create(tmp_path / "img.qcow2", SIZE)
    qemu_io(image, "write -P 0x10 0 64k")
    async with opened(image) as (_, disk, top):
        assert isinstance(top, Qcow2Node)
        node = top
        await node._meta_lock.acquire()  # an allocation holding the metadata lock
        try:
            with trio.fail_after(5):
                await disk.write(100, b"in place")  # must not need the lock
            assert await disk.read(100, 8) == b"in place"
        finally:
            node._meta_lock.release()


@pytest.mark.timeout(60)
async def test_grow_keeps_data_and_zeroes_new_space(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "2M")
    qemu_io(base, "write -P 0x31 0 2m")
    image = create(tmp_path / "img.qcow2", "1000k", "cluster_size=512", backing="base.qcow2")
    qemu_io(image, "write -P 0x32 999k 1k")
    expected = raw_of(image)
    async with opened(image, disk_extra="growable = true") as (_, disk, _node):
        await disk.resize(40 * MiB)  # past what the first L1 table maps
        assert disk.size == 40 * MiB
        assert await disk.read(0, len(expected)) == expected
        assert await disk.read(len(expected), 2 * MiB) == bytes(2 * MiB)
        await disk.write(39 * MiB, b"end")
    assert_clean(image)
    data = raw_of(image)
    assert len(data) == 40 * MiB and data[39 * MiB : 39 * MiB + 3] == b"end"
    assert data[: len(expected)] == expected


async def test_discard_frees_clusters_for_reuse(tmp_path: Path) -> None:
    image = create(tmp_path / "img.qcow2", SIZE)
    async with opened(image) as (_, disk, _node):
        await disk.write(0, b"\x01" * MiB)
        await disk.flush()
        size_after_write = image.stat().st_size
        await disk.discard(0, MiB)
        await disk.flush()  # the refcounts drop once the L2 change is stable
        await disk.write(2 * MiB, b"\x02" * MiB)
        assert await disk.read(0, 4) == bytes(4)
    assert image.stat().st_size == size_after_write  # freed clusters were reused
    assert_clean(image)


async def test_writes_to_compressed_image(tmp_path: Path) -> None:
    src = create(tmp_path / "src.qcow2", SIZE)
    qemu_io(src, "write -P 0x21 0 4m")
    for ctype in ("zlib", "zstd"):
        image = tmp_path / f"{ctype}.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, image)
        model = bytearray(raw_of(image))
        async with opened(image) as (_, disk, _node):
            await disk.write(70000, b"abc")
            model[70000:70003] = b"abc"
            await disk.root.write_zeroes(MiB, 2 * MiB)
            model[MiB : 3 * MiB] = bytes(2 * MiB)
        check_against_model(image, model)


@pytest.mark.timeout(60)
async def test_external_data_file_writes(tmp_path: Path) -> None:
    for raw in (False, True):
        d = tmp_path / f"raw{raw}"
        d.mkdir()
        opts = [f"data_file={d / 'img.data'}"] + (["data_file_raw=on"] if raw else [])
        image = create(d / "img.qcow2", SIZE, *opts)
        model = bytearray(SIZE)
        async with opened(image) as (_, disk, _node):
            for i in range(20):
                off = (i * 197 * KiB) % (SIZE - 70000)
                data = pattern(i, 70000)
                await disk.write(off, data)
                model[off : off + len(data)] = data
            await disk.root.write_zeroes(MiB, 256 * KiB)
            model[MiB : MiB + 256 * KiB] = bytes(256 * KiB)
        check_against_model(image, model)
        if raw:
            assert (d / "img.data").read_bytes() == bytes(model)
