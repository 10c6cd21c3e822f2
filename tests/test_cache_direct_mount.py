"""`cache.direct` (O_DIRECT on the host file) through a real mount: unaligned guest
requests reach an aligned host file intact, and QEMU's tools accept the images."""

from __future__ import annotations

import json
import os
import random

import pytest

from tests.conftest import run
from tests.qcow2_helpers import MiB, assert_clean, create, needs_qemu, pattern, qemu_img

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

SPEC = """
[nodes.d0]
driver = "{fmt}"
file = {{ driver = "file", filename = "{image}", cache.direct = true, aio = "{aio}" }}

[disks.vm0]
node = "d0"
"""


def random_writes(path, model: bytearray, count: int) -> None:
    """Writes of awkward sizes at awkward offsets, fsync'd now and then, as a guest does."""
    rnd = random.Random(5)
    size = len(model)
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(count):
            off = rnd.randrange(size)
            n = min(size - off, rnd.choice([1, 511, 512, 4095, 4096, 65537, MiB]))
            data = pattern(i, n)
            os.pwrite(fd, data, off)
            model[off : off + n] = data
            if i % 25 == 24:
                os.fsync(fd)
        assert os.pread(fd, size, 0) == bytes(model)
    finally:
        os.close(fd)


AIO = pytest.mark.parametrize("aio", ["threads", "io_uring"])


@AIO
def test_raw_on_o_direct_keeps_every_byte(tmp_path, write_spec, mount, aio) -> None:
    model = bytearray(os.urandom(8 * MiB))
    (tmp_path / "d0.img").write_bytes(model)
    m = mount(write_spec(SPEC.format(fmt="raw", image="d0.img", aio=aio)))
    stats = json.loads(m.path("vm0", "nodes", "d0.file", "stats").read_text())
    assert stats["request_alignment"] >= 512
    options = m.path("vm0", "nodes", "d0.file", "options")
    assert (options / "cache.direct").read_text() == "true\n"
    assert (options / "aio").read_text() == f"{aio}\n"
    random_writes(m.path("vm0.img"), model, 100)
    run("dd", f"if={m.path('vm0.img')}", "of=/dev/null", "bs=1M", "iflag=direct")
    stats = json.loads(m.path("vm0", "nodes", "d0.file", "stats").read_text())
    assert stats["inline_reads"] == 0
    assert stats["uring_submitted" if aio == "io_uring" else "pool_calls"] > 100
    m.stop()
    assert (tmp_path / "d0.img").read_bytes() == bytes(model)


@needs_qemu
@AIO
def test_qcow2_on_o_direct_stays_clean_for_qemu(tmp_path, write_spec, mount, aio) -> None:
    image = create(tmp_path / "d0.qcow2", "8M")
    model = bytearray(8 * MiB)
    m = mount(write_spec(SPEC.format(fmt="qcow2", image=image.name, aio=aio)))
    random_writes(m.path("vm0.img"), model, 100)
    m.stop()
    assert_clean(image)
    (tmp_path / "model.raw").write_bytes(model)
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", image, tmp_path / "model.raw")


@needs_qemu
def test_files_named_in_the_header_inherit_the_cache_options(tmp_path, write_spec, mount) -> None:
    """As QEMU's backing children inherit cache.direct and cache.no-flush: a backing chain
    opened from headers (base <- mid <- top) uses O_DIRECT all the way down."""
    base, mid, top = (tmp_path / f"{n}.qcow2" for n in ("base", "mid", "top"))
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    spec = (
        f'[nodes.d0]\ndriver = "qcow2"\nfile = {{ driver = "file", filename = "{top}", '
        'cache.direct = true, cache.no-flush = true }\n[disks.vm0]\nnode = "d0"\n'
    )
    m = mount(write_spec(spec))
    nodes = m.path("vm0", "nodes")
    leaves = ["d0.file", "d0.backing.file", "d0.backing.backing.file"]
    for leaf in leaves:
        assert (nodes / leaf / "options" / "cache.direct").read_text().strip() == "true", leaf
        assert (nodes / leaf / "options" / "cache.no-flush").read_text().strip() == "true", leaf
        assert json.loads((nodes / leaf / "stats").read_text())["request_alignment"] > 1, leaf
    with open(m.path("vm0.img"), "rb") as f:
        assert f.read(65536) == bytes([7]) * 65536
