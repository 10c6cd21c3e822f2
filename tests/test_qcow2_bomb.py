"""Compressed-cluster bombs: a few KiB of stored stream that inflate far past the cluster
size never make the daemon hold more than a cluster (before, a zstd cluster of 8 KiB
grew the daemon by 256 MiB per read)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from fusedisk.formats.qcow2.layout import compressed_geometry
from tests.conftest import read_at
from tests.mounting import Mount
from tests.qcow2_helpers import MiB, create, header_field, needs_qemu, patch, qemu_io

pytestmark = [needs_qemu, pytest.mark.mount, pytest.mark.timeout(120)]

CS = 65536
SPEC = """
[nodes.d0]
driver = "qcow2"
filename = "bomb.qcow2"
read-only = true

[disks.vm0]
node = "d0"
"""


def zstd_bomb(size: int) -> bytes:
    return zstandard.ZstdCompressor(level=19).compress(bytes(size))


def deflate_bomb(size: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    chunk = bytes(1 << 20)
    return b"".join(c.compress(chunk) for _ in range(size >> 20)) + c.flush()


def bomb_image(d: Path, compression: str, stream: bytes) -> Path:
    """An image whose guest cluster 0 is a compressed cluster holding `stream`."""
    image = create(d / "bomb.qcow2", "1M", f"compression_type={compression}")
    qemu_io(image, f"write -c -P 0x11 0 {CS}")
    l1 = header_field(image, 40, ">Q")
    l2 = header_field(image, l1, ">Q") & 0x00FF_FFFF_FFFF_FE00
    at = -(-os.path.getsize(image) // CS) * CS
    with open(image, "r+b") as f:
        f.seek(at)
        f.write(stream.ljust(-(-len(stream) // 512) * 512, b"\0"))
    x, mask = compressed_geometry(16)
    sectors = -(-len(stream) // 512)
    assert sectors - 1 <= mask, "the bomb must fit a compressed descriptor"
    patch(image, l2, ">Q", (1 << 62) | ((sectors - 1) << x) | at)
    return image


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize(("compression", "make"), [("zstd", zstd_bomb), ("zlib", deflate_bomb)])
def test_a_compressed_bomb_reads_one_cluster_and_never_more(
    tmp_path: Path,
    write_spec: Callable[..., Path],
    mount: Callable[..., Mount],
    compression: str,
    make: Callable[[int], bytes],
) -> None:
    inflated = 256 * MiB if compression == "zstd" else 64 * MiB
    stream = make(inflated)
    assert len(stream) < 128 * 1024 < inflated
    bomb_image(tmp_path, compression, stream)
    m = mount(write_spec(SPEC))
    assert m.proc is not None
    before = peak_rss(m.proc.pid)
    # As QEMU does, the first cluster of the stream is the cluster's content.
    assert read_at(m.path("vm0.img"), 0, CS) == bytes(CS)
    grew = peak_rss(m.proc.pid) - before
    print(f"{compression} bomb of {len(stream)} bytes: the daemon grew by {grew >> 10} KiB")
    assert grew < 32 * MiB, f"the daemon grew by {grew >> 20} MiB reading one cluster"
