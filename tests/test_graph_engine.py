"""The graph engine without FUSE: claims refuse overlapping operations with EBUSY, a
transaction whose record cannot be written is undone, and a record the next mount
would refuse is never written."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import trio

from fusedisk.errors import ControlError, SpecError
from fusedisk.graph.changes import Change, state_path
from fusedisk.graph.children import ReplaceChange
from fusedisk.graph.commit import start_commit
from fusedisk.graph.graph import Graph
from fusedisk.graph.jobs import Busy, Job, JobError
from fusedisk.graph.snapshot import take_snapshot
from fusedisk.graph.stream import StreamChange
from fusedisk.graph.transaction import Step, Transaction
from fusedisk.spec import parse_spec
from tests.conftest import needs, run

pytestmark = needs("qemu-img")

MiB = 1 << 20

SPEC = """
[nodes.d0]
driver = "qcow2"
filename = "d0.qcow2"

[nodes.e0]
driver = "qcow2"
filename = "e0.qcow2"

[disks.vm0]
node = "d0"
growable = true

[disks.vm1]
node = "e0"
"""


async def open_graph(tmp_path: Path) -> Graph:
    for name in ("d0", "e0"):
        run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / f"{name}.qcow2", "8M")
    return await Graph.open(parse_spec(SPEC, tmp_path / "spec.toml"))


class Holding(Job):
    """A background job that holds its claim until told to finish."""

    kind = "hold"
    background = True

    def __init__(self, graph: Graph, disk_name: str) -> None:
        super().__init__(graph, graph.disks[disk_name])
        self.release = trio.Event()

    def claims(self) -> list:
        return [self.disk.top]

    async def run(self) -> None:
        await self.release.wait()


async def test_an_operation_on_a_claimed_node_is_refused_with_ebusy(tmp_path: Path):
    graph = await open_graph(tmp_path)
    try:
        vm0, vm1 = graph.disks["vm0"], graph.disks["vm1"]
        job = await graph.jobs.start(Holding(graph, "vm0"))
        with pytest.raises(Busy, match=r"disk 'vm0': snapshot refused: a hold .* node 'd0'") as e:
            await take_snapshot(graph, vm0, vm0.root, "s1")
        assert e.value.errno == errno.EBUSY
        with pytest.raises(Busy):
            await vm0.resize(16 * MiB)
        assert not (tmp_path / "d0.s1.qcow2").exists()  # refused before anything was made
        await take_snapshot(graph, vm1, vm1.root, "t1")  # another disk: no overlap
        job.release.set()
        await graph.jobs.wait(job)
        await take_snapshot(graph, vm0, vm0.root, "s1")  # free again
        assert vm0.top.name == "d0.s1"
    finally:
        await graph.close()


async def test_a_transaction_whose_record_fails_is_undone(tmp_path: Path):
    graph = await open_graph(tmp_path)
    try:
        disk = graph.disks["vm0"]
        done: list[str] = []

        def fail(record: Change) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        graph.commit_record = fail  # type: ignore[method-assign]
        txn = Transaction(graph, [disk], "test")
        steps = [
            Step(lambda: done.append("a"), lambda: done.append("undo a")),
            Step(lambda: done.append("b"), lambda: done.append("undo b")),
        ]
        with pytest.raises(OSError):
            await txn.apply(steps, StreamChange("vm0", "d0"))
        assert done == ["a", "b", "undo b", "undo a"]
        assert not txn.committed
        assert disk.drains == 1  # the steps ran drained, and the gate is open again
        await disk.write(0, b"x" * 512)
    finally:
        await graph.close()


async def test_a_snapshot_whose_record_fails_leaves_the_graph_and_files_as_they_were(
    tmp_path: Path,
):
    graph = await open_graph(tmp_path)
    try:
        disk = graph.disks["vm0"]
        real = graph.commit_record

        def fail(record: Change) -> None:
            raise OSError(errno.EIO, "Input/output error")

        graph.commit_record = fail  # type: ignore[method-assign]
        with pytest.raises(JobError, match="snapshot failed: Input/output error") as err:
            await take_snapshot(graph, disk, disk.root, "s1")  # one sentence, the host's errno
        assert err.value.errno == errno.EIO
        assert disk.top.name == "d0" and not disk.top.read_only
        assert "d0.s1" not in graph.nodes and not (tmp_path / "d0.s1.qcow2").exists()
        await disk.write(0, b"y" * 512)
        graph.commit_record = real  # type: ignore[method-assign]
        await take_snapshot(graph, disk, disk.root, "s1")
        assert disk.top.name == "d0.s1"
    finally:
        await graph.close()


async def test_a_record_the_next_mount_would_refuse_is_never_written(tmp_path: Path):
    graph = await open_graph(tmp_path)
    try:
        disk = graph.disks["vm0"]
        await take_snapshot(graph, disk, disk.root, "s1")
        before = state_path(graph.spec.path).read_text()
        bad = ReplaceChange("q", "spare0", "d0", "")
        with pytest.raises(SpecError, match="recorded replacement of node 'spare0'"):
            graph.commit_record(bad)
        assert state_path(graph.spec.path).read_text() == before
    finally:
        await graph.close()


async def test_a_commit_is_one_record_and_ends_the_snapshot(tmp_path: Path):
    graph = await open_graph(tmp_path)
    try:
        disk = graph.disks["vm0"]
        await take_snapshot(graph, disk, disk.root, "s1")
        await disk.write(0, b"z" * MiB)
        job = await start_commit(graph, disk, "")
        await graph.jobs.wait(job)
        records = json.loads(state_path(graph.spec.path).read_text())["changes"]
        assert [r["op"] for r in records] == ["snapshot", "commit"]
        with pytest.raises(ControlError, match="has no snapshot"):
            await start_commit(graph, disk, "")
    finally:
        await graph.close()
