"""commit, stream and revert through a real mount, with the guest writing, across
remounts and crashes, and cancelled jobs that leave the disk as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import threading

import pytest
import trio

from fusedisk.graph.commit import start_commit
from fusedisk.graph.graph import Graph
from fusedisk.graph.snapshot import take_snapshot
from fusedisk.spec import parse_spec
from tests.conftest import needs, write_at
from tests.test_quorum_mount import SEED_TREE
from tests.test_snapshot import SPEC, qemu_img

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180), needs("qemu-img")]

MiB = 1 << 20


def read_all(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def control(m, name: str, text: str = "") -> None:
    m.path("vm0", name).write_text(f"{text}\n")


def job(m) -> dict:
    return json.loads(m.path("vm0", "job").read_text())


def wait_job(m) -> dict:
    control(m, "job", "wait")  # returns when the job has ended; an error if it failed
    state = job(m)
    assert state["state"] == "done", state
    return state


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


def make_disk(images, size: str = "64M") -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(images / "d0.qcow2"), size)


class Writer(threading.Thread):
    """Random 64 KiB writes to the disk until stopped, into a model of its content."""

    def __init__(self, path, model: bytearray) -> None:
        super().__init__()
        self.path, self.model, self.stop = path, model, threading.Event()
        self.writes = 0

    def run(self) -> None:
        rng = random.Random(6)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            while not self.stop.is_set() or self.writes < 64:
                offset = rng.randrange(len(self.model) // 65536) * 65536
                data = rng.randbytes(65536)
                os.pwrite(fd, data, offset)
                self.model[offset : offset + 65536] = data
                self.writes += 1
            os.fsync(fd)
        finally:
            os.close(fd)


def test_commit_while_a_writer_writes_keeps_every_write(tmp_path, images, write_spec, mount):
    make_disk(images)
    spec = write_spec(SPEC)
    m = mount(spec)
    disk = m.path("vm0.img")
    assert job(m)["state"] == "none"
    write_at(disk, 0, os.urandom(16 * MiB))
    control(m, "snapshot", "s1")
    write_at(disk, 16 * MiB, os.urandom(32 * MiB))  # the overlay holds 32 MiB to commit
    model = bytearray(read_all(disk))
    writer = Writer(disk, model)
    writer.start()
    try:
        control(m, "commit")  # returns once the job runs
        state = wait_job(m)
    finally:
        writer.stop.set()
        writer.join()
    assert state["kind"] == "commit" and state["done_bytes"] >= 32 * MiB
    assert read_all(disk) == model  # the writes during the commit are in the result
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0"
    assert not (images / "d0.s1.qcow2").exists()
    assert m.path("vm0", "snapshot").read_text() == ""  # committed: no longer a snapshot
    shutil.copyfile(disk, tmp_path / "content.raw")
    m.stop()
    qemu_img("check", str(images / "d0.qcow2"))
    qemu_img("compare", "-f", "qcow2", "-F", "raw", str(images / "d0.qcow2"),
             str(tmp_path / "content.raw"))  # fmt: skip

    m2 = mount(spec, name="mnt2")  # the commit survives a remount and a crash
    assert os.readlink(m2.path("vm0", "root")) == "nodes/d0"
    assert read_all(m2.path("vm0.img")) == model
    write_at(m2.path("vm0.img"), 0, b"after" * 1000)  # the base is writable again
    model[0:5000] = b"after" * 1000
    m2.crash()
    m3 = mount(spec, name="mnt3")
    assert read_all(m3.path("vm0.img")) == model


def test_several_snapshots_then_commit_down_to_the_base(tmp_path, images, write_spec, mount):
    make_disk(images, "32M")
    spec = write_spec(SPEC)
    m = mount(spec)
    disk = m.path("vm0.img")
    for i, name in enumerate(["s1", "s2", "s3"]):
        write_at(disk, i * 4 * MiB, bytes([0x10 + i]) * (6 * MiB))  # overlapping layers
        control(m, "snapshot", name)
    write_at(disk, 20 * MiB, b"top" * 100000)
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0.s3"
    content = read_all(disk)
    control(m, "commit", "s1")  # every layer down to the bases of s1
    state = wait_job(m)
    assert state["layers"] == [["d0.s3", "d0.s2", "d0.s1"]]
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0"
    assert sorted(os.listdir(m.path("vm0", "nodes"))) == ["d0", "d0.file"]
    assert sorted(p.name for p in images.iterdir()) == ["d0.qcow2"]
    assert read_all(disk) == content
    (tmp_path / "content.raw").write_bytes(content)
    m.stop()
    qemu_img("check", str(images / "d0.qcow2"))
    qemu_img("compare", "-f", "qcow2", "-F", "raw", str(images / "d0.qcow2"),
             str(tmp_path / "content.raw"))  # fmt: skip
    m2 = mount(spec, name="mnt2")
    assert read_all(m2.path("vm0.img")) == content


@needs("qemu-img", "qemu-io")
def test_commit_and_revert_on_the_seed_tree_act_below_the_quorum(tmp_path, write_spec, mount):
    for i in range(3):
        qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / f"d{i}.qcow2"), "16M")
    (tmp_path / "key").write_bytes(b"seed tree passphrase")
    spec = write_spec(SEED_TREE)
    m = mount(spec)
    disk = m.path("vm0.img")
    write_at(disk, 0, b"A" * (2 * MiB))
    control(m, "snapshot", "s1")
    write_at(disk, MiB, b"B" * (2 * MiB))
    control(m, "snapshot", "s2")
    write_at(disk, 2 * MiB, b"C" * MiB)
    control(m, "revert")  # the newest snapshot: C is gone, B stays
    expect = b"A" * MiB + b"B" * (2 * MiB)
    assert read_all(disk)[: 3 * MiB] == expect
    nodes = m.path("vm0", "nodes")
    assert os.readlink(nodes / "q" / "children" / "children.1") == "../../d1.s2"
    control(m, "commit", "s1")
    wait_job(m)
    for i in range(3):
        assert os.readlink(nodes / "q" / "children" / f"children.{i}") == f"../../d{i}"
    assert json.loads((nodes / "q" / "status").read_text())["state"] == "healthy"
    content = read_all(disk)
    assert content[: 3 * MiB] == expect
    m.stop()
    for i in range(3):
        qemu_img("check", "-q", str(tmp_path / f"d{i}.qcow2"))
        assert not (tmp_path / f"d{i}.s1.qcow2").exists()
    for i in (1, 2):
        qemu_img("compare", "-q", str(tmp_path / "d0.qcow2"), str(tmp_path / f"d{i}.qcow2"))
    m2 = mount(spec, name="mnt2")
    assert read_all(m2.path("vm0.img")) == content


def test_stream_makes_the_overlay_standalone(tmp_path, images, write_spec, mount):
    make_disk(images, "32M")
    spec = write_spec(SPEC)
    m = mount(spec)
    disk = m.path("vm0.img")
    write_at(disk, 0, os.urandom(8 * MiB))
    control(m, "snapshot", "s1")
    write_at(disk, 4 * MiB, os.urandom(8 * MiB))
    control(m, "snapshot", "s2")
    write_at(disk, 10 * MiB, os.urandom(MiB))
    content = read_all(disk)
    writer_model = bytearray(content)
    writer = Writer(disk, writer_model)  # the guest writes while the stream runs
    writer.start()
    try:
        control(m, "stream")
        state = wait_job(m)
    finally:
        writer.stop.set()
        writer.join()
    content = bytes(writer_model)
    assert state["kind"] == "stream" and state["target"] == "d0.s2"
    nodes = m.path("vm0", "nodes")
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0.s2"
    assert sorted(os.listdir(nodes / "d0.s2" / "children")) == ["file"]
    assert sorted(os.listdir(nodes)) == ["d0.s2", "d0.s2.file"]
    assert m.path("vm0", "snapshot").read_text() == ""  # no point to go back to any more
    assert read_all(disk) == content
    (tmp_path / "content.raw").write_bytes(content)
    m.stop()
    overlay = str(images / "d0.s2.qcow2")
    info = json.loads(qemu_img("info", "--output=json", overlay))
    assert "backing-filename" not in info and "full-backing-filename" not in info
    qemu_img("check", overlay)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", overlay, str(tmp_path / "content.raw"))
    m2 = mount(spec, name="mnt2")
    assert read_all(m2.path("vm0.img")) == content
    m2.crash()
    m3 = mount(spec, name="mnt3")
    assert read_all(m3.path("vm0.img")) == content


def test_revert_throws_away_what_was_written_since_the_snapshot(
    tmp_path, images, write_spec, mount
):
    make_disk(images, "16M")
    spec = write_spec(SPEC)
    m = mount(spec)
    disk = m.path("vm0.img")
    write_at(disk, 0, b"old" * 100000)
    control(m, "snapshot", "s1")
    write_at(disk, 0, b"N" * 4096)
    write_at(disk, 8 * MiB, b"N" * MiB)
    control(m, "snapshot", "s2")
    write_at(disk, 12 * MiB, b"M" * MiB)
    with pytest.raises(OSError) as err:
        control(m, "revert", "s1")  # s1's overlay is covered by s2's
    assert err.value.errno == errno.EINVAL
    control(m, "revert", "s2")
    data = read_all(disk)
    assert data[12 * MiB : 13 * MiB] == bytes(MiB)  # since s2: gone
    assert data[:4096] == b"N" * 4096 and data[8 * MiB : 9 * MiB] == b"N" * MiB
    assert data[4096:300000] == (b"old" * 100000)[4096:]  # older data intact
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0.s2"
    write_at(disk, 12 * MiB, b"R" * 4096)  # the fresh overlay takes writes
    content = read_all(disk)
    m.stop()
    qemu_img("check", str(images / "d0.s2.qcow2"))
    chain = json.loads(qemu_img("info", "--output=json", "--backing-chain",
                                str(images / "d0.s2.qcow2")))  # fmt: skip
    assert [os.path.basename(c["filename"]) for c in chain] == [
        "d0.s2.qcow2", "d0.s1.qcow2", "d0.qcow2"]  # fmt: skip
    m2 = mount(spec, name="mnt2")
    assert read_all(m2.path("vm0.img")) == content
    m2.crash()
    m3 = mount(spec, name="mnt3")
    assert read_all(m3.path("vm0.img")) == content


def test_a_cancelled_job_leaves_the_disk_as_it_was(tmp_path, images, write_spec, mount):
    # A large sparse disk: scanning it takes the jobs seconds, so `cancel` finds them running.
    make_disk(images, "64G")
    spec = write_spec(SPEC)
    m = mount(spec)
    disk = m.path("vm0.img")
    write_at(disk, 0, os.urandom(4 * MiB))
    control(m, "snapshot", "s1")
    write_at(disk, 2 * MiB, os.urandom(4 * MiB))
    write_at(disk, 40 << 30, b"far" * 1000)
    head = read_all_range(disk, 0, 8 * MiB)
    for kind in ("stream", "commit"):
        control(m, kind)
        with pytest.raises(OSError):
            control(m, "snapshot", "no")  # no graph change while a job runs
        control(m, "job", "cancel")
        state = job(m)
        assert state["kind"] == kind and state["state"] == "cancelled", state
        assert os.readlink(m.path("vm0", "root")) == "nodes/d0.s1"
        link = os.readlink(m.path("vm0", "nodes", "d0.s1", "children", "backing"))
        assert link == "../../d0"
        assert read_all_range(disk, 0, 8 * MiB) == head
        assert read_all_range(disk, 40 << 30, 3000) == b"far" * 1000
    with pytest.raises(OSError):
        control(m, "job", "wait")  # the last job was cancelled
    write_at(disk, 5 * MiB, b"x" * MiB)  # the disk still takes writes, into the overlay
    head = read_all_range(disk, 0, 8 * MiB)
    m.stop()
    for name in ("d0.qcow2", "d0.s1.qcow2"):
        qemu_img("check", str(images / name))
    m2 = mount(spec, name="mnt2")
    assert read_all_range(m2.path("vm0.img"), 0, 8 * MiB) == head
    assert m2.path("vm0", "snapshot").read_text().startswith("s1\t")


def read_all_range(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# -- the same jobs on a graph without FUSE, stopped at chosen points ---------------------------


async def _graph_with_a_snapshot(tmp_path, images):
    make_disk(images, "16M")
    graph = await Graph.open(parse_spec(SPEC, tmp_path / "spec.toml"))
    disk = graph.disks["vm0"]
    await disk.write(0, b"A" * (8 * MiB))
    await take_snapshot(graph, disk, disk.root, "s1")
    await disk.write(0, b"B" * (8 * MiB))
    return graph, disk


async def _until(job, done_bytes: int) -> None:
    while job.done_bytes < done_bytes and job.state == "running":
        await trio.sleep(0)  # the job yields between chunks


async def test_writes_to_ranges_already_copied_reach_the_base(tmp_path, images):
    graph, disk = await _graph_with_a_snapshot(tmp_path, images)
    job = await start_commit(graph, disk, "")
    await _until(job, 4 * MiB)
    assert job.state == "running"
    await disk.write(0, b"C" * MiB)  # copied already: the final pass must copy it again
    await disk.write(12 * MiB, b"D" * MiB)  # not in the overlay when the copy began
    await job.over.wait()
    assert job.state == "done", job.error
    expect = b"C" * MiB + b"B" * (7 * MiB) + bytes(4 * MiB) + b"D" * MiB + bytes(3 * MiB)
    assert disk.top.name == "d0"
    assert await disk.read(0, 16 * MiB) == expect
    await graph.close()
    qemu_img("check", str(images / "d0.qcow2"))
    assert not (images / "d0.s1.qcow2").exists()


async def test_a_commit_cancelled_midway_changes_nothing_and_can_run_again(tmp_path, images):
    graph, disk = await _graph_with_a_snapshot(tmp_path, images)
    jobs = graph.jobs
    job = await start_commit(graph, disk, "")
    await _until(job, 2 * MiB)
    await jobs.control(disk, "cancel")
    assert job.state == "cancelled"
    assert disk.top.name == "d0.s1" and graph.nodes["d0"].read_only
    assert graph.nodes["d0.file"].read_only
    assert await disk.read(0, 8 * MiB) == b"B" * (8 * MiB)
    job = await start_commit(graph, disk, "")
    await jobs.control(disk, "wait")
    assert disk.top.name == "d0" and not graph.nodes["d0"].read_only
    assert await disk.read(0, 8 * MiB) == b"B" * (8 * MiB)
    await graph.close()
    qemu_img("check", str(images / "d0.qcow2"))


def test_commit_refuses_a_base_the_spec_declares_read_only(tmp_path, images, write_spec, mount):
    make_disk(images, "16M")
    m = mount(write_spec(SPEC.replace('driver = "qcow2"', 'driver = "qcow2"\nread-only = true')))
    control(m, "snapshot", "s1")  # a writable overlay on a read-only golden image
    write_at(m.path("vm0.img"), 0, b"g" * 65536)
    before = digest(images / "d0.qcow2")
    with pytest.raises(OSError):
        control(m, "commit")
        control(m, "job", "wait")
    state = job(m)
    assert state["state"] == "failed" and "read-only in the spec" in state["error"]
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0.s1"
    assert digest(images / "d0.qcow2") == before
