"""The quorum driver at node level: votes, repair, failing children, scrub, replace.

Children are in-memory nodes (corrupted by editing their buffers, failing by a
flag), or file/raw/faults trees opened through a Graph.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fusedisk.errors import ControlError, IOFailure, OpenError
from fusedisk.filters.quorum.node import QuorumNode
from fusedisk.filters.quorum.vote import VOTE_BLOCK, vote
from fusedisk.fuse.tree import ControlTree, DirEntry, FileEntry, LinkEntry
from fusedisk.graph.changes import Change
from fusedisk.graph.disk import Disk
from fusedisk.graph.edge import Edge
from fusedisk.graph.extents import Status
from fusedisk.graph.graph import Graph
from fusedisk.graph.jobs import Jobs
from fusedisk.graph.node import Node, Role
from fusedisk.spec import DiskSpec, parse_spec
from tests.conftest import make_image
from tests.memory_node import Context, MemoryNode

SIZE = 4 << 20
MiB = 1 << 20


class FlakyNode(MemoryNode):
    """A memory node whose reads, writes or flushes can be made to fail."""

    def __init__(self, size: int, name: str) -> None:
        super().__init__(size, name=name)
        self.fail_reads = False
        self.fail_writes = False
        self.fail_flushes = False
        self.closed = False

    async def read(self, offset: int, length: int) -> bytes:
        if self.fail_reads:
            raise IOFailure(f"node '{self.name}': injected read error")
        return await super().read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        if self.fail_writes:
            raise IOFailure(f"node '{self.name}': injected write error")
        await super().write(offset, data)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if self.fail_writes:
            raise IOFailure(f"node '{self.name}': injected write error")
        await super().write_zeroes(offset, length, unmap)

    async def flush(self) -> None:
        if self.fail_flushes:
            raise IOFailure(f"node '{self.name}': injected flush error")
        await super().flush()

    async def close(self) -> None:
        self.closed = True


def options(threshold: int = 2, pattern: str = "quorum", rewrite: bool = False) -> dict[str, Any]:
    return {
        "vote-threshold": threshold,
        "read-pattern": pattern,
        "rewrite-corrupted": rewrite,
        "read-only": False,
    }


class JobHost:
    """The graph as scrub and replace jobs see it: one disk over the quorum, spares
    made on demand, a change log in memory."""

    def __init__(self, q: QuorumNode, spares: dict[str, Node]) -> None:
        self.nodes: dict[str, Node] = {}
        self.disk = Disk(DiskSpec("vm0", "q"), q)
        self.disks = {"vm0": self.disk}
        self.jobs = Jobs(self)
        self.spares = spares
        self.changes: list[dict[str, Any]] = []  # the records, as JSON
        self.controls = ControlTree(self).child_jobs(self.disk, q)  # type: ignore[arg-type]

    def commit_record(self, record: Change) -> None:
        self.changes.append(record.to_json())

    def disks_of(self, nodes: list[Node]) -> list[Disk]:
        return [self.disk]

    async def open_spare(self, name: str) -> Node:
        if name not in self.spares:
            raise OpenError(f"there is no node named '{name}' in the spec")
        return self.spares[name]

    async def remove_node(self, node: Node) -> None:
        await node.close()


HOSTS: dict[int, JobHost] = {}


def ctl(q: QuorumNode, name: str) -> FileEntry:
    """A control file of the quorum: `status` is its own, `scrub` and `replace` the graph's."""
    if name in ("scrub", "replace"):
        return HOSTS[id(q)].controls[name]  # type: ignore[return-value]
    control = q.controls()[name]
    return FileEntry(control.read, control.write)


async def make_quorum(
    n: int = 3, size: int = SIZE, spares: dict[str, Node] | None = None, **kw: Any
) -> tuple[QuorumNode, Disk, list[FlakyNode]]:
    """A quorum of memory nodes under a disk (requests go through its gate, as a
    guest's do: graph changes drain it)."""
    kids = [FlakyNode(size, f"m{i}") for i in range(n)]
    q = QuorumNode("q", options(**kw), {"children": list(kids)}, Context())
    await q.open()
    HOSTS[id(q)] = host = JobHost(q, spares or {})
    return q, host.disk, kids


def status(q: QuorumNode) -> dict[str, Any]:
    return json.loads(q.controls()["status"].read())


def child(q: QuorumNode, i: int) -> dict[str, Any]:
    return status(q)["children"][f"children.{i}"]


def pattern(seed: int, n: int) -> bytes:
    return (seed.to_bytes(4, "little") * (n // 4 + 1))[:n]


# -- the vote itself ---------------------------------------------------------------


def test_vote_identical_results_are_returned_as_they_are():
    data = os.urandom(3 * VOTE_BLOCK)
    verdict = vote(0, {"a": data, "b": bytes(data), "c": bytes(data)}, 2)
    assert verdict.data is data and not verdict.wrong and not verdict.undecided


def test_vote_is_per_block_so_two_children_wrong_in_different_places_still_agree():
    good = os.urandom(4 * VOTE_BLOCK)
    a = bytearray(good)
    a[10] ^= 1
    b = bytearray(good)
    b[3 * VOTE_BLOCK + 5] ^= 0x80
    verdict = vote(0, {"a": bytes(a), "b": bytes(b), "c": good}, 2)
    assert verdict.data == good
    assert verdict.wrong == {"a": [(0, VOTE_BLOCK)], "b": [(3 * VOTE_BLOCK, VOTE_BLOCK)]}
    assert not verdict.undecided


def test_vote_blocks_are_aligned_to_the_disk_not_to_the_request():
    good = os.urandom(VOTE_BLOCK)
    bad = bytearray(good)
    bad[-1] ^= 1
    offset = VOTE_BLOCK - 100  # the request straddles a block boundary
    verdict = vote(offset, {"a": bytes(bad), "b": good, "c": good}, 2)
    assert verdict.wrong == {"a": [(VOTE_BLOCK, VOTE_BLOCK - 100)]}


def test_vote_without_a_large_enough_group_decides_nothing():
    verdict = vote(0, {"a": b"x" * 10, "b": b"y" * 10, "c": b"z" * 10}, 2)
    assert verdict.undecided == [(0, 10)]
    # a tie between two groups that both reach the threshold is not a decision
    verdict = vote(0, {"a": b"x" * 10, "b": b"x" * 10, "c": b"y" * 10, "d": b"y" * 10}, 2)
    assert verdict.undecided == [(0, 10)]


def test_vote_with_fewer_answers_than_the_threshold_decides_nothing():
    assert vote(0, {"a": b"x" * 10}, 2).undecided == [(0, 10)]


# -- open ------------------------------------------------------------------------------


async def test_a_threshold_above_the_number_of_children_is_refused():
    kids = [MemoryNode(SIZE, name=f"m{i}") for i in range(3)]
    q = QuorumNode("q", options(threshold=4), {"children": kids}, Context())
    with pytest.raises(OpenError, match=r"node 'q': option 'vote-threshold': 4 .* \(3\)"):
        await q.open()


async def test_children_of_different_sizes_are_refused():
    kids = [MemoryNode(SIZE, name="m0"), MemoryNode(SIZE, name="m1"), MemoryNode(SIZE // 2)]
    q = QuorumNode("q", options(), {"children": kids}, Context())
    with pytest.raises(OpenError, match="option 'children': the children differ in size"):
        await q.open()


async def test_rewrite_corrupted_needs_the_quorum_read_pattern():
    kids = [MemoryNode(SIZE, name=f"m{i}") for i in range(3)]
    q = QuorumNode("q", options(pattern="fifo", rewrite=True), {"children": kids}, Context())
    with pytest.raises(OpenError, match="option 'rewrite-corrupted'"):
        await q.open()


async def test_size_and_alignment_come_from_the_children():
    kids = [MemoryNode(SIZE, align=a, name=f"m{a}") for a in (1, 512, 4096)]
    q = QuorumNode("q", options(), {"children": kids}, Context())
    await q.open()
    assert q.size == SIZE and q.request_alignment == 4096
    assert list(q.children) == ["children.0", "children.1", "children.2"]


# -- reads and writes --------------------------------------------------------------------


async def test_writes_reach_every_child_and_identical_reads_return():
    q, top, kids = await make_quorum()
    data = os.urandom(100_000)
    await top.write(12345, data)
    for k in kids:
        assert bytes(k.buf[12345 : 12345 + len(data)]) == data
    assert await top.read(12345, len(data)) == data
    assert all(len([r for r in k.requests if r[0] == "read"]) == 1 for k in kids)
    assert status(q)["state"] == "healthy"


async def test_a_corrupted_child_is_outvoted_and_reported():
    q, top, kids = await make_quorum()
    data = os.urandom(64 * 1024)
    await top.write(0, data)
    kids[1].buf[5000] ^= 0xFF
    assert await top.read(0, len(data)) == data
    st = child(q, 1)
    assert st["state"] == "degraded" and st["mismatches"] == 1 and st["bytes_rewritten"] == 0
    assert child(q, 0)["state"] == "healthy"
    assert kids[1].buf[5000] != data[5000]  # not repaired without rewrite-corrupted
    assert status(q)["state"] == "degraded"


async def test_a_disagreement_gone_on_the_re_read_is_counted_apart():
    q, top, kids = await make_quorum(rewrite=True)
    data = os.urandom(2 * VOTE_BLOCK)
    await top.write(0, data)
    honest_read = kids[1].read
    reads = 0

    async def read(offset: int, length: int) -> bytes:
        nonlocal reads
        reads += 1
        out = bytearray(await honest_read(offset, length))
        if reads == 1:  # wrong on the first read only
            out[VOTE_BLOCK + 5] ^= 1
        return bytes(out)

    kids[1].read = read  # type: ignore[method-assign]
    assert await top.read(0, len(data)) == data
    st = child(q, 1)
    assert st["transient_mismatches"] == 1 and st["mismatches"] == 0
    assert st["state"] == "healthy" and st["bytes_rewritten"] == 0
    assert child(q, 0)["transient_mismatches"] == 0
    # a lasting corruption is counted as a mismatch, not as transient
    kids[2].buf[3] ^= 1
    assert await top.read(0, len(data)) == data
    assert child(q, 2)["mismatches"] == 1 and child(q, 2)["transient_mismatches"] == 0


async def test_rewrite_corrupted_repairs_the_losing_child():
    q, top, kids = await make_quorum(rewrite=True)
    data = os.urandom(64 * 1024)
    await top.write(0, data)
    kids[2].buf[VOTE_BLOCK * 3 + 7] ^= 1
    assert await top.read(0, len(data)) == data
    assert bytes(kids[2].buf[: len(data)]) == data
    st = child(q, 2)
    assert st["mismatches"] == 1 and st["bytes_rewritten"] == VOTE_BLOCK


async def test_two_children_wrong_in_different_blocks_still_read_right():
    _q, top, kids = await make_quorum(rewrite=True)
    data = os.urandom(8 * VOTE_BLOCK)
    await top.write(0, data)
    kids[0].buf[1] ^= 1
    kids[1].buf[6 * VOTE_BLOCK] ^= 1
    assert await top.read(0, len(data)) == data
    assert all(bytes(k.buf[: len(data)]) == data for k in kids)


async def test_without_a_majority_the_read_fails_and_returns_nothing_wrong(caplog):
    q, top, kids = await make_quorum(threshold=2)
    await top.write(0, pattern(1, 8192))
    kids[0].buf[100] ^= 1
    kids[1].buf[100] ^= 2
    with pytest.raises(IOFailure) as err:
        await top.read(0, 8192)
    assert err.value.errno == 5
    assert "quorum lost" in caplog.text and "0+4096" in caplog.text
    assert status(q)["quorum_losses"] == 1
    # the other block still reads
    assert await top.read(4096, 4096) == pattern(1, 8192)[4096:]


async def test_a_threshold_of_three_refuses_a_two_to_one_vote():
    _q, top, kids = await make_quorum(threshold=3)
    await top.write(0, b"a" * 4096)
    kids[2].buf[0] = 0
    with pytest.raises(IOFailure):
        await top.read(0, 4096)


async def test_a_child_failing_reads_is_counted_and_the_others_answer():
    q, top, kids = await make_quorum()
    data = os.urandom(8192)
    await top.write(0, data)
    kids[0].fail_reads = True
    assert await top.read(0, 8192) == data
    st = child(q, 0)
    assert st["read_errors"] == 1 and st["state"] == "degraded"


async def test_with_rewrite_a_read_error_is_repaired_by_writing_the_block_back():
    q, top, kids = await make_quorum(rewrite=True)
    data = os.urandom(8192)
    await top.write(0, data)
    kids[0].fail_reads = True
    kids[0].buf[0:8192] = bytes(8192)
    assert await top.read(0, 8192) == data
    assert bytes(kids[0].buf[:8192]) == data
    assert child(q, 0)["bytes_rewritten"] == 8192


async def test_a_child_failing_writes_leaves_service_and_is_no_longer_read():
    q, top, kids = await make_quorum()
    kids[1].fail_writes = True
    data = os.urandom(4096)
    await top.write(0, data)
    assert child(q, 1)["state"] == "failed" and child(q, 1)["write_errors"] == 1
    kids[1].requests.clear()
    assert await top.read(0, 4096) == data
    await top.write(4096, data)
    await top.flush()
    assert kids[1].requests == [] and kids[1].flushes == 0
    s = status(q)
    assert s["state"] == "degraded" and s["children_in_service"] == 2


async def test_two_of_three_children_failing_means_eio_for_writes_and_reads():
    q, top, kids = await make_quorum()
    kids[0].fail_writes = kids[1].fail_writes = True
    with pytest.raises(IOFailure, match="quorum lost: write 0\\+4096"):
        await top.write(0, b"x" * 4096)
    assert status(q)["state"] == "failed"
    with pytest.raises(IOFailure, match="1 children in service, 2 needed"):
        await top.read(0, 4096)


async def test_flush_failures_are_counted_and_a_majority_suffices():
    q, top, kids = await make_quorum()
    await top.write(0, b"x")
    kids[2].fail_flushes = True
    await top.flush()
    assert child(q, 2)["flush_errors"] == 1 and child(q, 2)["state"] == "failed"
    assert kids[0].flushes == 1


async def test_discard_zeroes_every_child_so_they_keep_agreeing():
    _q, top, kids = await make_quorum()
    await top.write(0, b"\xff" * 65536)
    await top.discard(4096, 8192)
    for k in kids:
        assert bytes(k.buf[4096 : 4096 + 8192]) == bytes(8192)
        assert k.buf[4095] == 0xFF and k.buf[12288] == 0xFF
    await top.write_zeroes(0, 100, False)
    assert all(bytes(k.buf[:100]) == bytes(100) for k in kids)
    assert await top.read(0, 65536) == bytes(100) + b"\xff" * 3996 + bytes(8192) + (
        b"\xff" * (65536 - 12288)
    )


async def test_fifo_reads_the_first_child_and_the_next_on_error():
    q, top, kids = await make_quorum(pattern="fifo")
    data = os.urandom(4096)
    await top.write(0, data)
    for k in kids:
        k.requests.clear()
    assert await top.read(0, 4096) == data
    assert [len(k.requests) for k in kids] == [1, 0, 0]
    kids[0].fail_reads = True
    kids[1].buf[0] ^= 1  # fifo does not compare: it trusts the first answer
    got = await top.read(0, 4096)
    assert got[1:] == data[1:] and got[0] == data[0] ^ 1
    assert child(q, 0)["read_errors"] == 1


async def test_block_status_is_zero_only_where_a_majority_reads_zeroes():
    class Holey(FlakyNode):
        zero_from = 0

        async def block_status(self, offset, length):
            from fusedisk.graph.extents import Extent

            cut = max(offset, min(offset + length, self.zero_from))
            out = []
            if cut > offset:
                out.append(Extent(offset, cut - offset, Status.DATA | Status.ALLOCATED))
            if offset + length > cut:
                out.append(Extent(cut, offset + length - cut, Status.ZERO | Status.ALLOCATED))
            return out

    kids = [Holey(SIZE, f"h{i}") for i in range(3)]
    for k, cut in zip(kids, (MiB, 2 * MiB, 3 * MiB), strict=True):
        k.zero_from = cut
    q = QuorumNode("q", options(), {"children": list(kids)}, Context())
    await q.open()
    extents = await Edge(None, "root", Role.ROOT, q).block_status(0, SIZE)
    assert [(e.offset, e.length, e.status) for e in extents] == [
        (0, 2 * MiB, Status.DATA | Status.ALLOCATED),
        (2 * MiB, 2 * MiB, Status.ZERO | Status.ALLOCATED),
    ]


async def test_a_read_racing_a_write_is_not_taken_for_a_corruption():
    """A read that sees one child after a write and two before it must not
    'repair' the first child back to the old data."""
    q, top, kids = await make_quorum(rewrite=True)
    old, new = b"o" * 4096, b"n" * 4096
    await top.write(0, old)
    gate = trio.Event()
    kids[1].gate = kids[2].gate = gate
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(top.write, 0, new)
        await trio.testing.wait_all_tasks_blocked()
        assert bytes(kids[0].buf[:4096]) == new  # the write reached one child so far

        async def reader() -> None:
            got.append(await top.read(0, 4096))

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert got == [new]
    assert all(bytes(k.buf[:4096]) == new for k in kids)
    assert all(child(q, i)["mismatches"] == 0 for i in range(3))


async def test_overlapping_writes_land_in_the_same_order_on_every_child():
    _q, top, kids = await make_quorum()
    gate = trio.Event()
    kids[0].gate = gate  # child 0 is slow for the first write
    async with trio.open_nursery() as nursery:
        nursery.start_soon(top.write, 0, b"1" * 4096)
        await trio.testing.wait_all_tasks_blocked()
        kids[0].gate = None
        nursery.start_soon(top.write, 0, b"2" * 4096)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert all(bytes(k.buf[:4096]) == b"2" * 4096 for k in kids)


# -- scrub --------------------------------------------------------------------------------


async def test_scrub_repairs_what_no_read_touched():
    q, top, kids = await make_quorum()
    await top.write(0, pattern(7, SIZE))
    kids[0].buf[3 * MiB + 17] ^= 1
    kids[2].buf[100] ^= 1
    await ctl(q, "scrub").write("wait")
    assert all(bytes(k.buf) == pattern(7, SIZE) for k in kids)
    report = json.loads(ctl(q, "scrub").read())
    assert report["state"] == "done" and report["progress"] == 1.0
    assert report["mismatched_ranges"] == 2 and report["bytes_rewritten"] == 2 * VOTE_BLOCK
    assert report["unrecoverable"] == []
    assert child(q, 0)["mismatches"] == 1 and child(q, 0)["bytes_rewritten"] == VOTE_BLOCK


async def test_scrub_reports_ranges_without_quorum_and_repairs_the_rest(caplog):
    q, top, kids = await make_quorum()
    await top.write(0, pattern(3, SIZE))
    kids[0].buf[MiB] ^= 1
    kids[1].buf[MiB] ^= 2
    kids[1].buf[2 * MiB] ^= 2
    await ctl(q, "scrub").write("wait")  # it reports what it cannot repair, no error
    report = json.loads(ctl(q, "scrub").read())
    assert report["unrecoverable"] == [f"{MiB}+4096"]
    assert (
        bytes(kids[1].buf[2 * MiB : 2 * MiB + 4096]) == pattern(3, SIZE)[2 * MiB : 2 * MiB + 4096]
    )
    assert "quorum lost: scrub" in caplog.text


async def test_scrub_runs_in_the_background_while_guest_io_continues():
    q, top, kids = await make_quorum(size=16 * MiB)
    await top.write(0, pattern(1, 16 * MiB))
    kids[1].buf[15 * MiB] ^= 1
    await ctl(q, "scrub").write("")  # returns once started
    assert json.loads(ctl(q, "scrub").read())["state"] == "running"
    with pytest.raises(ControlError, match="a scrub is running on node 'q'"):
        await ctl(q, "scrub").write("")
    writes = 0
    while json.loads(ctl(q, "scrub").read())["state"] == "running":
        off = (writes * 7919 * 4096) % (16 * MiB - 8192)
        await top.write(off, pattern(writes, 8192))
        assert await top.read(off, 8192) == pattern(writes, 8192)
        writes += 1
    assert writes > 3
    assert bytes(kids[0].buf) == bytes(kids[1].buf) == bytes(kids[2].buf)
    await q.close()


async def test_close_cancels_a_running_scrub():
    q, _top, _kids = await make_quorum(size=64 * MiB)
    await ctl(q, "scrub").write("")
    await HOSTS[id(q)].jobs.aclose()
    report = json.loads(ctl(q, "scrub").read())
    assert report["state"] in ("cancelled", "done")


# -- replace -----------------------------------------------------------------------------


async def test_replace_resyncs_a_spare_and_puts_it_in_service():
    spare = FlakyNode(SIZE, "spare")
    q, top, kids = await make_quorum(spares={"spare": spare})
    data = pattern(5, SIZE)
    await top.write(0, data)
    kids[1].fail_writes = True
    await top.write(0, data[:4096])
    assert child(q, 1)["state"] == "failed"
    await ctl(q, "replace").write("children.1 spare wait")
    assert q.children["children.1"].node is spare
    assert list(q.children) == ["children.0", "children.1", "children.2"]
    assert bytes(spare.buf) == data
    assert kids[1].closed and kids[1].parents == []
    assert spare.parents == [q.children["children.1"]]
    s = status(q)
    assert s["state"] == "healthy" and s["children"]["children.1"]["node"] == "spare"
    report = json.loads(ctl(q, "replace").read())
    assert report["state"] == "done" and report["old"] == "m1" and report["new"] == "spare"


async def test_replace_under_a_writer_ends_with_identical_children():
    spare = FlakyNode(16 * MiB, "spare")
    q, top, kids = await make_quorum(size=16 * MiB, spares={"spare": spare})
    await top.write(0, pattern(9, 16 * MiB))
    kids[0].fail_reads = kids[0].fail_writes = True
    await top.write(0, b"x")
    await ctl(q, "replace").write("m0 spare")  # by node name; returns once started
    report = json.loads(ctl(q, "replace").read())
    assert report["state"] == "running"
    assert status(q)["children"]["children.0.new"]["state"] == "resyncing"
    n = 0
    while json.loads(ctl(q, "replace").read())["state"] == "running":
        off = (n * 104729 * 512) % (16 * MiB - 65536)
        await top.write(off, pattern(n + 100, 65536))
        n += 1
        # a resyncing child is written by the guest but never read
        assert not [r for r in spare.requests if r[0] == "read"]
    assert n > 3
    report = json.loads(ctl(q, "replace").read())
    assert report["state"] == "done" and report["guest_writes_mirrored"] > 0
    assert bytes(spare.buf) == bytes(kids[1].buf) == bytes(kids[2].buf)
    assert status(q)["state"] == "healthy"


async def test_replace_refuses_unknown_children_bad_spares_and_a_second_job():
    small = FlakyNode(SIZE // 2, "small")
    q, _top, _kids = await make_quorum(spares={"small": small, "ok": FlakyNode(SIZE, "ok")})
    replace = ctl(q, "replace")
    with pytest.raises(ControlError, match=r"'children\.7' is not one of its children"):
        await replace.write("children.7 ok")
    with pytest.raises(ControlError, match="no node named 'nope'"):
        await replace.write("children.0 nope")
    with pytest.raises(ControlError, match="its size is"):
        await replace.write("children.0 small")
    assert small.closed
    with pytest.raises(ControlError, match="write 'OLD NEW'"):
        await replace.write("children.0")
    await replace.write("children.0 ok")
    with pytest.raises(ControlError, match="a replace is running on node 'q'"):
        await ctl(q, "scrub").write("")
    await q.close()


async def test_a_failing_spare_abandons_the_replace_and_the_old_child_stays():
    spare = FlakyNode(SIZE, "spare")
    spare.fail_writes = True
    q, _top, kids = await make_quorum(spares={"spare": spare})
    with pytest.raises(ControlError, match="replace failed"):
        await ctl(q, "replace").write("children.2 spare wait")
    assert q.children["children.2"].node is kids[2]
    assert list(q.children) == ["children.0", "children.1", "children.2"]
    assert spare.closed and spare.parents == []


async def test_a_replace_whose_record_fails_puts_the_failed_child_back_as_failed():
    # The switch is undone when its change-log record cannot be written; the old
    # child must come back in the state it left (failed: its data is stale), not
    # as a fresh, healthy voter.
    spare = FlakyNode(SIZE, "spare")
    q, top, kids = await make_quorum(spares={"spare": spare}, pattern="fifo")
    await top.write(0, pattern(5, SIZE))
    kids[0].fail_writes = True
    await top.write(0, b"new")  # children.0 leaves service with the old bytes
    assert child(q, 0)["state"] == "failed"
    host = HOSTS[id(q)]

    def full_disk(record: Change) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    host.commit_record = full_disk  # type: ignore[method-assign]
    with pytest.raises(ControlError, match="replace failed"):
        await ctl(q, "replace").write("children.0 spare wait")
    assert q.children["children.0"].node is kids[0] and host.changes == []
    assert child(q, 0)["state"] == "failed"
    assert await top.read(0, 3) == b"new"  # a fifo read skips the stale child


class BadStart(FlakyNode):
    """A spare whose writes to its first block fail once `armed`."""

    armed = False

    async def write(self, offset: int, data: bytes) -> None:
        if self.armed and offset < VOTE_BLOCK:
            raise IOFailure(f"node '{self.name}': injected write error at {offset}")
        await super().write(offset, data)


async def test_a_guest_write_the_spare_fails_during_the_copy_abandons_the_replace():
    # The copy has passed offset 0, so only the guest's write reaches the spare
    # there; the quorum takes the spare out of service and goes on, and the job
    # must notice (the spare misses that write) rather than swap it in.
    spare = BadStart(16 * MiB, "spare")
    q, disk, kids = await make_quorum(size=16 * MiB, spares={"spare": spare})
    host = HOSTS[id(q)]
    await disk.write(0, pattern(4, 16 * MiB))
    await ctl(q, "replace").write("children.1 spare")
    job = host.jobs.last_owned[("q", "replace")]
    while job.done_bytes < MiB:
        await trio.sleep(0)
    spare.armed = True
    await disk.write(0, b"guest")  # the voters take it
    assert status(q)["children"]["children.1.new"]["state"] == "failed"
    while job.state == "running":
        await trio.sleep(0)
    assert job.state == "failed" and "new child 'spare' failed 1 writes" in job.error
    assert list(q.children) == ["children.0", "children.1", "children.2"]
    assert q.children["children.1"].node is kids[1] and host.changes == []
    assert spare.closed and spare.parents == []
    assert await disk.read(0, 5) == b"guest"


async def test_the_child_set_adds_and_deletes_children_in_slot_order():
    # What replace is made of (graph/children.py): a non-voting child is written and
    # never read; a voter deleted and added back comes back in the state it had.
    q, top, kids = await make_quorum()
    cs = q.child_set()
    spare = FlakyNode(SIZE, "spare")
    kids[1].fail_writes = True
    await top.write(0, b"x")
    assert child(q, 1)["state"] == "failed"
    with pytest.raises(ControlError, match=r"already has a child 'children\.1'"):
        cs.add_child(spare, "children.1", True)
    with pytest.raises(ControlError, match="has 4096 bytes"):
        cs.add_child(FlakyNode(4096, "tiny"), "children.1.new", False)
    temp = cs.add_child(spare, "children.1.new", False)
    assert list(q.children) == ["children.0", "children.1", "children.1.new", "children.2"]
    assert status(q)["children"]["children.1.new"]["state"] == "resyncing"
    await top.write(0, b"y")
    assert await top.read(0, 1) == b"y" and bytes(spare.buf[:1]) == b"y"
    assert not [r for r in spare.requests if r[0] == "read"]
    cs.del_child(q.children["children.1"])
    assert kids[1].parents == [] and "children.1" not in status(q)["children"]
    cs.add_child(kids[1], "children.1", True)
    assert list(q.children) == ["children.0", "children.1", "children.1.new", "children.2"]
    assert child(q, 1)["state"] == "failed"  # not a fresh voter: its data is stale
    cs.del_child(temp)
    cs.del_child(temp)  # deleting twice does nothing
    assert spare.parents == [] and list(q.children) == ["children.0", "children.1", "children.2"]


async def test_a_cancelled_replace_detaches_the_spare_and_records_nothing():
    spare = FlakyNode(16 * MiB, "spare")
    q, disk, kids = await make_quorum(size=16 * MiB, spares={"spare": spare})
    host = HOSTS[id(q)]
    await disk.write(0, pattern(4, 16 * MiB))
    await ctl(q, "replace").write("children.1 spare")
    job = host.jobs.last_owned[("q", "replace")]
    while job.done_bytes == 0:
        await trio.sleep(0)
    await host.jobs.control(disk, "cancel")  # `echo cancel > vm0/job`
    assert job.state == "cancelled"
    assert list(q.children) == ["children.0", "children.1", "children.2"]
    assert q.children["children.1"].node is kids[1] and status(q)["state"] == "healthy"
    assert spare.closed and spare.parents == [] and host.changes == []
    await disk.write(0, b"after")  # the quorum serves on, without the spare
    assert bytes(kids[1].buf[:5]) == b"after" and bytes(spare.buf[:5]) != b"after"


async def test_replace_needs_a_quorum_to_copy_from():
    q, top, kids = await make_quorum(spares={"s": FlakyNode(SIZE, "s")})
    kids[0].fail_writes = kids[1].fail_writes = True
    with pytest.raises(IOFailure):
        await top.write(0, b"x")
    with pytest.raises(ControlError, match="only 1 children in service, 2 needed"):
        await ctl(q, "replace").write("children.0 s")


# -- through a Graph: file, raw and faults children, spare from the spec ----------------

GRAPH_SPEC = """
[nodes.c1-file]
driver = "file"
filename = "c1.img"

[nodes.c1-faults]
driver = "faults"
file = "c1-file"

[nodes.q]
driver = "quorum"
vote-threshold = 2
rewrite-corrupted = true
children = [
    { driver = "raw", filename = "c0.img" },
    { driver = "raw", file = "c1-faults" },
    { driver = "raw", filename = "c2.img" },
]

[nodes.spare]
driver = "raw"
filename = "spare.img"

[disks.vm0]
node = "q"
"""


async def test_graph_replace_with_a_spare_of_the_spec(tmp_path: Path):
    for name in ("c0", "c1", "c2", "spare"):
        make_image(tmp_path / f"{name}.img", SIZE)
    spec = parse_spec(GRAPH_SPEC, tmp_path / "spec.toml")
    graph = await Graph.open(spec)
    try:
        disk = graph.disks["vm0"]
        q = graph.nodes["q"]
        assert isinstance(q, QuorumNode)
        data = pattern(11, SIZE)
        await disk.write(0, data)
        faults = graph.nodes["c1-faults"]
        await faults.set_option("error-writes", "true")
        await disk.write(0, data[:4096])
        assert status(q)["children"]["children.1"]["state"] == "failed"
        old = q.children["children.1"].node
        replace = ControlTree(graph).resolve(("vm0", "nodes", "q", "replace"))
        assert isinstance(replace, FileEntry) and replace.write is not None
        await replace.write("children.1 spare wait")
        assert q.children["children.1"].node is graph.nodes["spare"]
        assert old.name not in graph.nodes  # closed and forgotten
        assert faults.name not in graph.nodes
        await disk.flush()
        for name in ("c0", "c2", "spare"):
            assert (tmp_path / f"{name}.img").read_bytes() == data
        # the control tree shows the new sibling relations
        tree = ControlTree(graph)
        sib = tree.resolve(("vm0", "nodes", "spare", "siblings"))
        assert isinstance(sib, DirEntry)
        assert sorted(sib.list()) == ["q.children.0", "q.children.2"]
        link = sib.list()["q.children.0"]
        assert isinstance(link, LinkEntry) and link.target == "../../q.children.0"
    finally:
        await graph.close()


async def test_graph_spare_in_use_is_refused(tmp_path: Path):
    for name in ("c0", "c1", "c2", "spare"):
        make_image(tmp_path / f"{name}.img", SIZE)
    graph = await Graph.open(parse_spec(GRAPH_SPEC, tmp_path / "spec.toml"))
    try:
        replace = ControlTree(graph).resolve(("vm0", "nodes", "q", "replace"))
        assert isinstance(replace, FileEntry) and replace.write is not None
        with pytest.raises(ControlError, match="already in use"):
            await replace.write("children.1 q.children.0")
    finally:
        await graph.close()


async def test_background_work_pauses_while_the_disk_is_drained():
    q, _top, kids = await make_quorum(size=16 * MiB)
    disk = HOSTS[id(q)].disk
    await disk.write(0, pattern(2, 16 * MiB))
    kids[2].buf[15 * MiB] ^= 1
    await ctl(q, "scrub").write("")
    await trio.sleep(0)
    async with disk.drained():
        job = HOSTS[id(q)].jobs.last_owned[("q", "scrub")]
        assert job is not None and job.state == "running"
        before = job.done_bytes
        for _ in range(50):
            await trio.sleep(0)
        assert job.done_bytes == before
    await ctl(q, "scrub").write("wait")
    assert bytes(kids[2].buf) == pattern(2, 16 * MiB)
    assert kids[0].flushes >= 1  # the drain flushed through the quorum


async def test_rewrite_corrupted_changes_at_run_time_but_not_under_fifo():
    q, top, kids = await make_quorum()
    await q.set_option("rewrite-corrupted", "true")
    await top.write(0, b"a" * 4096)
    kids[0].buf[0] = 0
    assert await top.read(0, 4096) == b"a" * 4096
    assert kids[0].buf[0] == ord("a")
    fifo, _, _ = await make_quorum(pattern="fifo")
    with pytest.raises(ControlError, match="needs read-pattern"):
        await fifo.set_option("rewrite-corrupted", "true")
