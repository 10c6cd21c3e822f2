"""`fusedisk create` and create_qcow2: what they make passes `qemu-img check`, `qemu-img info`
shows the backing chain, and fusedisk and QEMU both read and write it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusedisk.errors import OpenError, SpecError
from fusedisk.formats.qcow2.create import create_qcow2
from tests.qcow2_helpers import (
    MiB,
    assert_clean,
    needs_qemu,
    opened,
    qemu_img,
    qemu_io,
    raw_of,
    run_fusedisk,
)

pytestmark = needs_qemu


def info(image: Path) -> dict:
    return json.loads(qemu_img("info", "--output=json", image).stdout)


@pytest.mark.parametrize(
    "options",
    [
        "",
        "cluster_size=512",
        "cluster_size=2M",
        "compat=0.10",
        "refcount_bits=1",
        "refcount_bits=64,cluster_size=512",
        "extended_l2=on",
        "compression_type=zstd,lazy_refcounts=on",
    ],
)
def test_create_passes_qemu_img_check(tmp_path: Path, options: str) -> None:
    image = tmp_path / "new.qcow2"
    args: list[str | Path] = ["create", "-f", "qcow2", *(["-o", options] if options else [])]
    args += [image, "10G"]
    proc = run_fusedisk(*args)
    assert proc.returncode == 0, proc.stderr
    assert_clean(image)
    meta = info(image)
    assert meta["virtual-size"] == 10 << 30 and meta["format"] == "qcow2"
    qemu_io(image, "write -P 0x42 1m 100k", "read -P 0x42 1m 100k", "read -P 0 9g 1m")


def test_create_backing_chain_shows_in_qemu_img_info(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    assert run_fusedisk("create", "-f", "raw", tmp_path / "base.raw", "4M").returncode == 0
    proc = run_fusedisk(
        "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", tmp_path / "mid.qcow2"
    )
    assert proc.returncode == 0, proc.stderr
    proc = run_fusedisk(
        "create", "-f", "qcow2", "-b", "../mid.qcow2", tmp_path / "sub" / "top.qcow2", "8M"
    )
    assert proc.returncode == 0, proc.stderr
    chain = json.loads(
        qemu_img("info", "--backing-chain", "--output=json", tmp_path / "sub" / "top.qcow2").stdout
    )
    assert [c["format"] for c in chain] == ["qcow2", "qcow2", "raw"]
    assert chain[0]["backing-filename"] == "../mid.qcow2"
    assert chain[0]["backing-filename-format"] == "qcow2"
    assert chain[0]["virtual-size"] == 8 * MiB
    assert chain[1]["virtual-size"] == 4 * MiB  # taken from the backing file
    for image in (tmp_path / "mid.qcow2", tmp_path / "sub" / "top.qcow2"):
        assert_clean(image)


async def test_created_overlay_works_in_fusedisk(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    create_qcow2(base, 2 * MiB, cluster_size=4096)
    qemu_io(base, "write -P 0x05 0 2m")
    top = tmp_path / "top.qcow2"
    create_qcow2(top, None, backing="base.qcow2", backing_fmt="qcow2", extended_l2=True,
                 cluster_size=16384)  # fmt: skip
    async with opened(top) as (_, disk, node):
        assert node.children["backing"].node.driver == "qcow2"
        assert disk.size == 2 * MiB
        await disk.write(1000, b"overlay")
    assert_clean(top)
    data = raw_of(top)
    assert data[1000:1007] == b"overlay" and data[:1000] == b"\x05" * 1000
    assert raw_of(base) == b"\x05" * 2 * MiB


def test_create_refuses_bad_requests(tmp_path: Path) -> None:
    image = tmp_path / "x.qcow2"
    image.write_bytes(b"keep me")
    proc = run_fusedisk("create", "-f", "qcow2", image, "1M")
    assert proc.returncode == 1 and "exists" in proc.stderr
    assert image.read_bytes() == b"keep me"
    for args, reason in [
        (["-o", "cluster_size=1000"], "power of two"),
        (["-o", "nonsense=1"], "unknown option 'nonsense'"),
        (["-o", "compat=0.10,refcount_bits=1"], "version 2"),
        (["-o", "extended_l2=on,cluster_size=4k"], "16K"),
    ]:
        proc = run_fusedisk("create", "-f", "qcow2", *args, tmp_path / "y.qcow2", "1M")
        assert proc.returncode == 1 and reason in proc.stderr, (args, proc.stderr)
    proc = run_fusedisk("create", "-f", "qcow2", tmp_path / "y.qcow2", "lots")
    assert proc.returncode == 1 and "SIZE" in proc.stderr
    proc = run_fusedisk("create", "-f", "raw", "-b", "x", tmp_path / "y.img", "1M")
    assert proc.returncode == 1 and "backing" in proc.stderr
    assert not (tmp_path / "y.qcow2").exists() and not (tmp_path / "y.img").exists()
    with pytest.raises(SpecError, match="a size is needed"):
        create_qcow2(tmp_path / "z.qcow2", None)
    with pytest.raises(OpenError, match=r"missing\.qcow2"):
        create_qcow2(tmp_path / "z.qcow2", None, backing="missing.qcow2")
