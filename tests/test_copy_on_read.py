"""copy-on-read: reads pull data up into the top image, never over newer guest data.

Chains of qcow2 images are made by qemu-img and checked with qemu-img map,
check and compare; the race with guest writes is checked on a test-only
overlay node whose steps the test controls.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from fusedisk.errors import OpenError
from fusedisk.filters.copy_on_read.node import CopyOnReadNode
from fusedisk.graph.disk import Disk
from fusedisk.graph.extents import Extent, Status, merge_extents
from fusedisk.graph.graph import Graph
from fusedisk.graph.node import Node, Role
from fusedisk.spec import DiskSpec, parse_spec
from tests.conftest import needs, run
from tests.memory_node import Context, MemoryNode

pytestmark = pytest.mark.timeout(60)

KiB, MiB = 1 << 10, 1 << 20
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img and qemu-io are needed",
)


def qemu_io(image: Path, *commands: str) -> None:
    args: list[str] = []
    for c in commands:
        args += ["-c", c]
    run("qemu-io", "-f", "qcow2", *args, image)


def make_chain(tmp_path: Path) -> dict[str, Path]:
    """base <- mid <- top, 4 MiB, each layer holding its own patterns."""
    base, mid, top = tmp_path / "base.qcow2", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0x11 0 1M", "write -P 0x12 3M 256K")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", mid)
    qemu_io(mid, "write -P 0x22 1M 512K", "write -P 0x23 192K 64K")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 0x33 2M 128K", "write -P 0x34 0 64K")
    # the reference: what the whole chain shows, flattened
    run("qemu-img", "convert", "-O", "raw", top, tmp_path / "flat.raw")
    return {"base": base, "mid": mid, "top": top}


def cor_spec(bottom: str | None = None) -> str:
    extra = f'bottom = "{bottom}"\n' if bottom else ""
    return f"""
[nodes.top]
driver = "qcow2"
filename = "top.qcow2"

[nodes.cor]
driver = "copy-on-read"
file = "top"
{extra}
[disks.vm0]
node = "cor"
"""


def depth_of(image: Path) -> list[tuple[int, int, int, bool]]:
    """(start, length, depth, data) of each run of `qemu-img map`."""
    out = json.loads(run("qemu-img", "map", "--output=json", image))
    return [(r["start"], r["length"], r["depth"], r["data"]) for r in out]


def depth_at(runs: list[tuple[int, int, int, bool]], offset: int) -> int:
    for start, length, depth, _ in runs:
        if start <= offset < start + length:
            return depth
    raise AssertionError(offset)


async def read_all(tmp_path: Path, spec: str) -> tuple[bytes, dict]:
    graph = await Graph.open(parse_spec(spec, tmp_path / "spec.toml"))
    disk = graph.disks["vm0"]
    data = b""
    for off in range(0, disk.size, 192 * KiB):  # odd chunks, crossing clusters
        data += await disk.read(off, 192 * KiB)
    stats = graph.nodes["cor"].driver_stats()
    await graph.close()
    return data, stats


@needs_qemu
async def test_reading_everything_leaves_all_data_in_the_top_image(tmp_path):
    images = make_chain(tmp_path)
    flat = (tmp_path / "flat.raw").read_bytes()
    data, stats = await read_all(tmp_path, cor_spec())
    assert data == flat
    assert stats["copied_bytes"] > 0
    runs = depth_of(images["top"])
    for start, _length, depth, has_data in runs:
        assert depth == 0 or not has_data, f"data at {start} still comes from depth {depth}"
    run("qemu-img", "check", images["top"])
    # Dropping the backing file changes nothing: the top image holds it all.
    run("qemu-img", "rebase", "-u", "-b", "", images["top"])
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", images["top"], tmp_path / "flat.raw")


@needs_qemu
async def test_a_second_read_copies_nothing(tmp_path):
    make_chain(tmp_path)
    await read_all(tmp_path, cor_spec())
    _, stats = await read_all(tmp_path, cor_spec())
    assert stats["copied_bytes"] == 0


@needs_qemu
async def test_bottom_limits_what_is_copied(tmp_path):
    images = make_chain(tmp_path)
    flat = (tmp_path / "flat.raw").read_bytes()
    # the mid image is opened implicitly from top's header: node "top.backing"
    data, _ = await read_all(tmp_path, cor_spec(bottom="top.backing"))
    assert data == flat
    runs = depth_of(images["top"])
    assert depth_at(runs, 1 * MiB) == 0  # mid's data was copied up
    assert depth_at(runs, 192 * KiB) == 0
    assert depth_at(runs, 512 * KiB) == 2  # base's data (below bottom) was not
    assert depth_at(runs, 3 * MiB) == 2
    run("qemu-img", "check", images["top"])


@needs_qemu
async def test_writes_pass_straight_through(tmp_path):
    images = make_chain(tmp_path)
    graph = await Graph.open(parse_spec(cor_spec(), tmp_path / "spec.toml"))
    disk = graph.disks["vm0"]
    await disk.write(3 * MiB, b"\x77" * 4096)
    assert await disk.read(3 * MiB, 4096) == b"\x77" * 4096
    assert graph.nodes["cor"].driver_stats()["copied_bytes"] == 0
    await graph.close()
    qemu_io(images["top"], "read -P 0x77 3M 4K")
    qemu_io(images["base"], "read -P 0x12 3M 4K")  # the backing is untouched


@needs_qemu
@pytest.mark.parametrize(
    ("bottom", "words"),
    [("top", "is the top image itself"), ("nowhere", "not in the backing chain")],
)
async def test_bad_bottom_is_refused(tmp_path, bottom, words):
    make_chain(tmp_path)
    with pytest.raises(OpenError, match=words) as info:
        await Graph.open(parse_spec(cor_spec(bottom=bottom), tmp_path / "spec.toml"))
    assert "node 'cor': option 'bottom'" in str(info.value)


# -- serialisation against guest writes, on a test-only overlay -------------------------------


class Overlay(Node):
    """A 512-byte-sector overlay over a backing node, with hooks to pause it."""

    def __init__(self, backing: Node) -> None:
        super().__init__("top", {}, {}, Context())
        self.add_child("backing", Role.BACKING, backing)
        self.size = backing.size
        self.buf = bytearray(self.size)
        self.here = bytearray(self.size // 512)  # 1 = sector allocated in this layer
        self.pause_status: trio.Event | None = None  # block_status answers, then waits on it
        self.pause_read: trio.Event | None = None  # read waits on it once
        self.status_calls = 0

    async def read(self, offset: int, length: int) -> bytes:
        if self.pause_read is not None:
            event, self.pause_read = self.pause_read, None
            await event.wait()
        out = bytearray(await self.children["backing"].read(offset, length))
        for s in range(offset // 512, (offset + length) // 512):
            if self.here[s]:
                out[s * 512 - offset : s * 512 - offset + 512] = self.buf[s * 512 : s * 512 + 512]
        return bytes(out)

    async def write(self, offset: int, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.buf[offset : offset + len(data)] = data
        for s in range(offset // 512, (offset + len(data)) // 512):
            self.here[s] = 1

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        await self.write(offset, bytes(length))

    async def flush(self) -> None:
        pass

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self.status_calls += 1
        out = []
        for s in range(offset // 512, (offset + length) // 512):
            status = Status.DATA | Status.ALLOCATED if self.here[s] else Status.DATA
            out.append(Extent(s * 512, 512, status))
        if self.pause_status is not None:  # answer now, deliver later (a stale answer)
            event, self.pause_status = self.pause_status, None
            await event.wait()
        return merge_extents(out)


async def make_cor() -> tuple[Disk, Overlay, MemoryNode]:
    base = MemoryNode(64 * KiB, align=512, name="base")
    base.buf[:] = b"B" * len(base.buf)
    top = Overlay(base)
    options = {k: o.default for k, o in CopyOnReadNode.all_options().items()}
    cor = CopyOnReadNode("cor", options, {"file": top}, Context())
    await cor.open()
    return Disk(DiskSpec("vm0", "cor"), cor), top, base


async def test_copy_lands_in_the_top_and_not_twice():
    disk, top, _ = await make_cor()
    assert await disk.read(4096, 1024) == b"B" * 1024
    assert top.here[8] and top.here[9] and not top.here[10]
    assert top.buf[4096:5120] == b"B" * 1024
    stats = disk.top.driver_stats()
    await disk.read(4096, 1024)
    assert disk.top.driver_stats()["copy_ops"] == stats["copy_ops"]


async def test_a_guest_write_during_a_copy_waits_and_lands_after_it():
    disk, top, _ = await make_cor()
    gate = top.pause_read = trio.Event()
    results: dict[str, bytes] = {}

    async def reader() -> None:
        results["read"] = await disk.read(0, 2048)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()  # the copy holds its lock, mid-read
        nursery.start_soon(disk.write, 0, b"G" * 1024)
        await trio.testing.wait_all_tasks_blocked()
        assert top.buf[0:1024] == bytes(1024)  # the write waits for the copy
        gate.set()
    assert results["read"] == b"B" * 2048
    assert top.buf[0:1024] == b"G" * 1024  # the newer guest data won
    assert top.buf[1024:2048] == b"B" * 1024


async def test_a_guest_write_before_the_copy_locks_is_not_overwritten():
    disk, top, _ = await make_cor()
    gate = top.pause_status = trio.Event()
    results: dict[str, bytes] = {}

    async def reader() -> None:
        results["read"] = await disk.read(0, 2048)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()  # paused in the first block_status
        await disk.write(0, b"G" * 1024)  # lands before the copy takes its lock
        gate.set()
    assert top.buf[0:1024] == b"G" * 1024
    assert results["read"][1024:] == b"B" * 1024
    assert disk.top.driver_stats()["skipped_bytes"] == 1024


# -- through a real mount --------------------------------------------------------------------


@pytest.mark.mount
@needs_qemu
@pytest.mark.timeout(120)
def test_reading_through_the_mount_fills_the_top_image(tmp_path, write_spec, mount):
    images = make_chain(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    images_b = make_chain(other)
    spec = (
        cor_spec()
        + """
[nodes.top2]
driver = "qcow2"
filename = "other/top.qcow2"

[nodes.cor2]
driver = "copy-on-read"
file = "top2"
bottom = "top2.backing"

[disks.vm1]
node = "cor2"
"""
    )
    m = mount(write_spec(spec))
    flat = (tmp_path / "flat.raw").read_bytes()
    for disk in ("vm0.img", "vm1.img"):
        with open(m.path(disk), "rb", buffering=0) as f:
            assert f.read() == flat
    m.stop()
    runs = depth_of(images["top"])
    assert all(depth == 0 or not has_data for _, _, depth, has_data in runs)
    run("qemu-img", "check", images["top"])
    run("qemu-img", "rebase", "-u", "-b", "", images["top"])
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", images["top"], tmp_path / "flat.raw")
    # with bottom = the middle image, the base image's data stayed below
    runs = depth_of(images_b["top"])
    assert depth_at(runs, 1 * MiB) == 0
    assert depth_at(runs, 512 * KiB) == 2
    run("qemu-img", "check", images_b["top"])


@pytest.mark.mount
@needs_qemu
@needs("losetup", "mkfs.ext4", "fsck.ext4")
@pytest.mark.timeout(120)
def test_throttle_over_copy_on_read_over_qcow2_carries_a_file_system(tmp_path, write_spec, mount):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
    qemu_io(base, "write -P 0x5a 0 8M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    spec = """
[nodes.top]
driver = "qcow2"
filename = "top.qcow2"

[nodes.cor]
driver = "copy-on-read"
file = "top"

[nodes.thr]
driver = "throttle"
file = "cor"
iops-total = 20000
bps-total = "400M"

[disks.vm0]
node = "thr"
"""
    m = mount(write_spec(spec))
    loop = run("losetup", "--find", "--show", m.path("vm0.img")).strip()
    try:
        run("dd", f"if={loop}", "of=/dev/null", "bs=1M", "count=4")  # reads base data: copies
        run("mkfs.ext4", "-q", "-F", loop)
        run("fsck.ext4", "-f", "-n", loop)
    finally:
        subprocess.run(["losetup", "-d", loop])
    stats = json.loads(m.path("vm0", "nodes", "cor", "stats").read_text())
    thr = json.loads(m.path("vm0", "nodes", "thr", "stats").read_text())
    m.stop()
    assert stats["copied_bytes"] >= 4 * MiB
    assert thr["requests"] > 0
    run("qemu-img", "check", top)
    # the file system is in the image: fsck it again through qemu's own reading of the chain
    run("qemu-img", "convert", "-O", "raw", top, tmp_path / "fs.raw")
    run("fsck.ext4", "-f", "-n", tmp_path / "fs.raw")
