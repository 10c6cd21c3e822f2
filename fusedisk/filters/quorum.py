"""Driver `quorum`: N sibling children holding the same disk, reads decided by vote.

QEMU's quorum driver is the model for the options and the vote; fusedisk adds
what QEMU lacks: per-child states, a background scrub, and replacing a child
with a resync from the quorum while guest I/O continues.

Reads (read-pattern = quorum) go to every voting child at once.  Identical
results return at once (one memcmp per child).  Otherwise the range is voted
block by block (VOTE_BLOCK bytes, aligned to the disk): each child's block is
hashed with xxh3_128, the largest group wins if it has `vote-threshold`
members and no other group is as large; a block without such a winner fails
the read with EIO, never with guessed data.  Voting per block means two
children corrupted in different places still yield a correct read.

    read ──► all voters ──► identical? ──yes──► return
                               │ no (or a child failed)
                               ▼
             lock the range (no write may interleave), read again,
             vote per block ──► losers counted, rewritten (rewrite-corrupted)
                            ──► a block without quorum: EIO, range logged

The second read under the range lock matters: a read that races a guest
write can see some children before the write and some after, which is not a
corruption; repairing from it would undo the write on a child.

Writes, write-zeroes and discards hold the same range lock (overlapping guest
writes are serialised so every child applies them in the same order) and go
to every child in service at once; they succeed if `vote-threshold` children
succeed.  A child whose write, write-zeroes or flush fails leaves service
(state `failed`): its content is no longer known, so it is neither read nor
written until it is replaced.  Discard is done as write-zeroes with unmap on
every child, so the siblings keep reading the same bytes.

Scrub and replace are jobs of the graph engine (graph/children.py): the node
only offers its ChildSet capability (a vote-and-repair step, a resync step,
and attach / detach / promote / demote of a child); the graph's copy loop runs
the steps chunk by chunk under this node's range lock, and the switch to a
new child is a graph transaction under drain, recorded in the change log.

Child states: healthy (in service, no trouble seen), degraded (in service,
has returned errors or wrong data), failed (out of service), resyncing (a
replacement being filled from the quorum: written by guest writes, never
read until its resync completes).
"""

from __future__ import annotations

import errno as _errno
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import trio
import xxhash

from fusedisk.errors import ControlError, IOFailure, OpenError
from fusedisk.graph.edge import Edge, RangeLock
from fusedisk.graph.extents import Extent, Status, merge_extents
from fusedisk.graph.node import ChildSlot, Control, GraphOp, Node, NodeContext, Role
from fusedisk.graph.options import REQUIRED, Option, option_table

log = logging.getLogger("fusedisk")

#: the unit of a vote: children are compared and repaired in blocks of this size
VOTE_BLOCK = 4096
#: the unit of background work (scrub, resync): held under the range lock
JOB_CHUNK = 1 << 20
#: concurrent (nursery) requests after which children are probed again (see _each)
PROBE_EVERY = 4096
#: per child, read errors (and votes lost) logged before the rest are only counted
READ_ERRORS_LOGGED = 5
MISMATCHES_LOGGED = 20

HEALTHY = "healthy"
DEGRADED = "degraded"
FAILED = "failed"
RESYNCING = "resyncing"

Range = tuple[int, int]  # (offset, length)


# -- the vote (pure: no I/O) ---------------------------------------------------


@dataclass
class Verdict:
    """The result of voting on one range read from several children.

    `wrong` holds, per child that answered, the ranges where it lost the vote;
    `undecided` the ranges no group won.  Children that failed to answer are
    not in `wrong`: the caller knows them.
    """

    offset: int
    length: int
    data: bytes  # the winning bytes; undecided ranges hold zeroes
    wrong: dict[str, list[Range]] = field(default_factory=dict)
    undecided: list[Range] = field(default_factory=list)

    def decided(self) -> list[Range]:
        """The complement of `undecided` within the range."""
        out: list[Range] = []
        pos = self.offset
        for off, n in self.undecided:
            if off > pos:
                out.append((pos, off - pos))
            pos = off + n
        if pos < self.offset + self.length:
            out.append((pos, self.offset + self.length - pos))
        return out


def _add_range(ranges: list[Range], off: int, n: int) -> None:
    """Append, merging with the previous range when contiguous."""
    if ranges and ranges[-1][0] + ranges[-1][1] == off:
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
    else:
        ranges.append((off, n))


def vote(
    offset: int, results: Mapping[str, bytes], threshold: int, block: int = VOTE_BLOCK
) -> Verdict:
    """Vote per `block` (aligned to absolute offsets) among the children's results.

    A block's winner is the largest group of identical contents if it has at
    least `threshold` members and no other group is as large.
    """
    names = list(results)
    length = len(results[names[0]]) if names else 0
    if len(names) < threshold or not names:
        return Verdict(offset, length, bytes(length), {}, [(offset, length)] if length else [])
    first = results[names[0]]
    if all(results[n] == first for n in names[1:]):
        return Verdict(offset, length, first)
    verdict = Verdict(offset, length, b"")
    out = bytearray(length)
    end = offset + length
    pos = offset
    while pos < end:
        stop = min(end, (pos // block + 1) * block)
        a, b = pos - offset, stop - offset
        pieces = {n: results[n][a:b] for n in names}
        p0 = pieces[names[0]]
        if all(pieces[n] == p0 for n in names[1:]):
            out[a:b] = p0
            pos = stop
            continue
        groups: dict[int, list[str]] = {}
        for n in names:
            groups.setdefault(xxhash.xxh3_128_intdigest(pieces[n]), []).append(n)
        ranked = sorted(groups.values(), key=len, reverse=True)
        best = ranked[0]
        if len(best) >= threshold and (len(ranked) == 1 or len(ranked[1]) < len(best)):
            out[a:b] = pieces[best[0]]
            for group in ranked[1:]:
                for n in group:
                    _add_range(verdict.wrong.setdefault(n, []), pos, stop - pos)
        else:
            _add_range(verdict.undecided, pos, stop - pos)
        pos = stop
    # Where one child won everywhere, its bytes are the answer: no copy.
    if not verdict.undecided:
        for n in names:
            if n not in verdict.wrong:
                verdict.data = results[n]
                return verdict
    verdict.data = bytes(out)
    return verdict


def zero_majority(
    offset: int, length: int, answers: list[list[Extent]], threshold: int, voters: int
) -> list[Extent]:
    """Block status of the quorum: a piece reads as zeroes only where at least
    `threshold` children, and more than half of the voters, say so."""
    end = offset + length
    cuts = {offset, end}
    for extents in answers:
        for e in extents:
            cuts.update(c for c in (e.offset, e.end) if offset < c < end)
    points = sorted(cuts)
    out: list[Extent] = []
    for start, stop in pairwise(points):
        votes = 0
        for extents in answers:
            for e in extents:
                if e.offset <= start and stop <= e.end:
                    if e.status & Status.ZERO:
                        votes += 1
                    break
        zero = votes >= threshold and votes * 2 > voters
        status = (Status.ZERO if zero else Status.DATA) | Status.ALLOCATED
        out.append(Extent(start, stop - start, status))
    return merge_extents(out)


# -- per-child bookkeeping -------------------------------------------------------


@dataclass
class ChildState:
    state: str = HEALTHY
    read_errors: int = 0
    write_errors: int = 0
    flush_errors: int = 0
    mismatches: int = 0
    bytes_rewritten: int = 0
    last_error: str = ""
    mismatch_events: int = 0  # votes this child lost (to limit the log)
    writes_mirrored: int = 0  # guest writes that reached it while resyncing

    @property
    def votes(self) -> bool:
        return self.state in (HEALTHY, DEGRADED)

    @property
    def written(self) -> bool:
        return self.state != FAILED

    def as_dict(self, node: str) -> dict[str, Any]:
        return {
            "node": node,
            "state": self.state,
            "read_errors": self.read_errors,
            "write_errors": self.write_errors,
            "flush_errors": self.flush_errors,
            "mismatches": self.mismatches,
            "bytes_rewritten": self.bytes_rewritten,
            "last_error": self.last_error,
        }


# -- the node ---------------------------------------------------------------------


class QuorumNode(Node):
    driver = "quorum"
    summary = "N sibling children holding the same disk; reads decided by vote"
    option_specs = option_table(
        Option(
            "vote-threshold",
            "int",
            REQUIRED,
            "children that must agree on a read, and succeed on a write (1..N)",
            minimum=1,
        ),
        Option(
            "read-pattern",
            "str",
            "quorum",
            "quorum: read every child and vote; fifo: read the first child that answers",
            choices=("quorum", "fifo"),
        ),
        Option(
            "rewrite-corrupted",
            "bool",
            False,
            "rewrite children that lost a vote (or failed a read) with the winning data",
            runtime=True,
        ),
    )
    child_slots = (ChildSlot("children", Role.CHILDREN, many=True),)
    graph_op = GraphOp.FANOUT

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        children: Mapping[str, Node | list[Node]],
        context: NodeContext,
    ) -> None:
        super().__init__(name, options, children, context)
        self.threshold = int(self.options["vote-threshold"])
        self.fifo = self.options.get("read-pattern", "quorum") == "fifo"
        self.child_state: dict[str, ChildState] = {}
        self.quorum_losses = 0
        self.last_quorum_loss = ""
        #: guest writes take it per range; a scrub or resync chunk holds it (graph/copy.py)
        self.copy_lock = RangeLock()
        self._yielding: set[str] = set()  # children seen yielding to trio (see _each)
        self._concurrent_requests = 0

    # -- life cycle ---------------------------------------------------------------

    async def open(self) -> None:
        await super().open()
        edges = self.edges_with_role(Role.CHILDREN)
        n = len(edges)
        if not 1 <= self.threshold <= n:
            raise OpenError(
                f"node '{self.name}': option 'vote-threshold': {self.threshold} is not "
                f"between 1 and the number of children ({n})"
            )
        if self.fifo and self.options.get("rewrite-corrupted"):
            raise OpenError(
                f"node '{self.name}': option 'rewrite-corrupted': needs read-pattern = "
                "'quorum' (a fifo read has nothing to compare)"
            )
        sizes = {e.node.size for e in edges}
        if len(sizes) > 1:
            listed = ", ".join(f"'{e.node.name}' {e.node.size}" for e in edges)
            raise OpenError(
                f"node '{self.name}': option 'children': the children differ in size "
                f"({listed} bytes); they must hold the same disk"
            )
        self.size = edges[0].node.size
        self.request_alignment = max(e.node.request_alignment for e in edges)
        self.child_state = {e.name: ChildState() for e in edges}

    async def apply_option(self, name: str, value: Any) -> None:
        if name == "rewrite-corrupted" and value and self.fifo:
            raise ControlError(
                f"node '{self.name}': option 'rewrite-corrupted': needs read-pattern = 'quorum'"
            )

    # -- which children do what -----------------------------------------------------

    def _voters(self) -> list[Edge]:
        return [e for e in self.children.values() if self.child_state[e.name].votes]

    def _targets(self) -> list[Edge]:
        """Children a write goes to: those in service and any being resynced."""
        return [e for e in self.children.values() if self.child_state[e.name].written]

    def _child_failed(self, edge: Edge, what: str, exc: BaseException) -> None:
        st = self.child_state[edge.name]
        st.last_error = f"{what}: {exc}"
        if st.state != FAILED:
            st.state = FAILED
            log.error(
                "node '%s': child %s ('%s') leaves service: %s failed: %s",
                self.name, edge.name, edge.node.name, what, exc,
            )  # fmt: skip

    def _read_error(self, edge: Edge, what: str, exc: BaseException) -> None:
        st = self.child_state[edge.name]
        st.read_errors += 1
        st.last_error = f"{what}: {exc}"
        if st.state == HEALTHY:
            st.state = DEGRADED
        if st.read_errors <= READ_ERRORS_LOGGED:
            log.warning(
                "node '%s': child %s ('%s'): %s failed: %s%s",
                self.name, edge.name, edge.node.name, what, exc,
                " (further read errors are only counted)"
                if st.read_errors == READ_ERRORS_LOGGED else "",
            )  # fmt: skip

    def _quorum_lost(self, what: str, detail: str) -> IOFailure:
        self.quorum_losses += 1
        self.last_quorum_loss = f"{what}: {detail}"
        log.error("node '%s': quorum lost: %s: %s", self.name, what, detail)
        return IOFailure(f"node '{self.name}': quorum lost: {what}: {detail}", _errno.EIO)

    # -- running a request on several children -------------------------------------

    async def _each(self, edges: list[Edge], request: Callable[[Edge], Awaitable[None]]) -> None:
        """Run `request` (which catches its own errors) on every edge, concurrently.

        Children that answer without yielding to trio (a file in the page cache:
        pread is done inline) are simply called one after another: they block
        the event loop anyway, so a nursery would add its cost (tens of µs per
        request) and no overlap.  A child seen yielding (a thread, a network
        wait, a throttle) switches the node to a nursery; the record is
        forgotten every PROBE_EVERY concurrent requests, to look again.
        """
        if len(edges) > 1 and not self._yielding:
            task = trio.lowlevel.current_task()
            if hasattr(task, "_schedule_points"):  # trio's count of a task's yields
                for edge in edges:
                    before = task._schedule_points
                    await request(edge)
                    if task._schedule_points != before:
                        self._yielding.add(edge.name)
                return
        if len(edges) == 1:
            await request(edges[0])
            return
        self._concurrent_requests += 1
        if self._concurrent_requests % PROBE_EVERY == 0:
            self._yielding.clear()
        async with trio.open_nursery() as nursery:
            for edge in edges:
                nursery.start_soon(request, edge)

    # -- reads ------------------------------------------------------------------------

    async def _read_all(self, edges: list[Edge], offset: int, length: int) -> dict[str, Any]:
        """Every edge's answer (bytes or the exception), read concurrently."""
        results: dict[str, Any] = {}

        async def one(edge: Edge) -> None:
            try:
                results[edge.name] = await edge.read(offset, length)
            except Exception as e:
                results[edge.name] = e

        await self._each(edges, one)
        return results

    async def read(self, offset: int, length: int) -> bytes:
        if self.fifo:
            return await self._read_fifo(offset, length)
        return await self._read_quorum(offset, length)

    async def _read_fifo(self, offset: int, length: int) -> bytes:
        what = f"read {offset}+{length}"
        for edge in self._voters():
            try:
                return await edge.read(offset, length)
            except Exception as e:
                self._read_error(edge, what, e)
        raise self._quorum_lost(what, "no child could read it")

    async def _read_quorum(self, offset: int, length: int) -> bytes:
        voters = self._voters()
        what = f"read {offset}+{length}"
        if len(voters) < self.threshold:
            raise self._quorum_lost(
                what, f"{len(voters)} children in service, {self.threshold} needed"
            )
        results = await self._read_all(voters, offset, length)
        good = [r for r in results.values() if isinstance(r, bytes)]
        if good and all(r == good[0] for r in good[1:]):
            if len(good) == len(results):
                return good[0]
            if len(good) >= self.threshold and not self.options.get("rewrite-corrupted"):
                # Some children failed, the others agree: nothing to repair.
                for edge in voters:
                    if not isinstance(results[edge.name], bytes):
                        self._read_error(edge, what, results[edge.name])
                return good[0]
        # Errors or disagreement: decide under the range lock, with a fresh read.
        token = await self.copy_lock.acquire(offset, offset + length)
        try:
            verdict = await self._vote_locked(
                self._voters(), offset, length, what, self.options.get("rewrite-corrupted", False)
            )
        finally:
            self.copy_lock.release(token)
        if verdict.undecided:
            raise self._quorum_lost(what, self._describe_undecided(verdict))
        return verdict.data

    @staticmethod
    def _describe_undecided(verdict: Verdict) -> str:
        shown = ", ".join(f"{o}+{n}" for o, n in verdict.undecided[:8])
        more = len(verdict.undecided) - 8
        return f"no {VOTE_BLOCK}-byte block quorum at {shown}" + (
            f" and {more} more ranges" if more > 0 else ""
        )

    async def _vote_locked(
        self, voters: list[Edge], offset: int, length: int, what: str, repair: bool
    ) -> Verdict:
        """Read from `voters`, vote, count losers and (if `repair`) rewrite them.

        The caller holds the range lock, so no guest write interleaves.
        """
        results = await self._read_all(voters, offset, length)
        answers: dict[str, bytes] = {}
        failed: list[Edge] = []
        for edge in voters:
            r = results[edge.name]
            if isinstance(r, bytes):
                answers[edge.name] = r
            else:
                self._read_error(edge, what, r)
                failed.append(edge)
        verdict = vote(offset, answers, self.threshold)
        by_name = {e.name: e for e in voters}
        for name, ranges in verdict.wrong.items():
            st = self.child_state[name]
            st.mismatches += len(ranges)
            if st.state == HEALTHY:
                st.state = DEGRADED
            st.mismatch_events += 1
            if st.mismatch_events <= MISMATCHES_LOGGED:
                shown = ", ".join(f"{o}+{n}" for o, n in ranges[:8])
                log.warning(
                    "node '%s': child %s ('%s') returned wrong data (%s) at %s%s%s",
                    self.name, name, by_name[name].node.name, what, shown,
                    "; rewriting it" if repair and not self.read_only else "",
                    " (further mismatches are only counted)"
                    if st.mismatch_events == MISMATCHES_LOGGED else "",
                )  # fmt: skip
        if repair and not self.read_only:
            for name, ranges in verdict.wrong.items():
                await self._rewrite(by_name[name], verdict, ranges)
            decided = verdict.decided()
            for edge in failed:
                await self._rewrite(edge, verdict, decided)
        return verdict

    async def _rewrite(self, edge: Edge, verdict: Verdict, ranges: list[Range]) -> None:
        st = self.child_state[edge.name]
        for off, n in ranges:
            if st.state == FAILED:
                return
            a = off - verdict.offset
            try:
                await edge.write(off, verdict.data[a : a + n])
            except Exception as e:
                st.write_errors += 1
                self._child_failed(edge, f"rewrite {off}+{n}", e)
                return
            st.bytes_rewritten += n

    # -- writes -------------------------------------------------------------------------

    async def _fan_out(
        self, what: str, kind: str, request: Callable[[Edge], Awaitable[None]]
    ) -> None:
        """Run `request` on every target at once; enough in-service successes or EIO."""
        targets = self._targets()
        voting = {e.name for e in targets if self.child_state[e.name].votes}
        if len(voting) < self.threshold:
            raise self._quorum_lost(
                what, f"{len(voting)} children in service, {self.threshold} needed"
            )
        ok: list[str] = []

        async def one(edge: Edge) -> None:
            try:
                await request(edge)
            except Exception as e:
                st = self.child_state[edge.name]
                if kind == "flush":
                    st.flush_errors += 1
                else:
                    st.write_errors += 1
                self._child_failed(edge, what, e)
            else:
                ok.append(edge.name)
                if edge.name not in voting:
                    self.child_state[edge.name].writes_mirrored += 1

        await self._each(targets, one)
        done = sum(1 for name in ok if name in voting)
        if done < self.threshold:
            raise self._quorum_lost(what, f"{done} children succeeded, {self.threshold} needed")

    async def _locked_fan_out(
        self, offset: int, length: int, what: str, request: Callable[[Edge], Awaitable[None]]
    ) -> None:
        token = await self.copy_lock.acquire(offset, offset + length)
        try:
            await self._fan_out(what, "write", request)
        finally:
            self.copy_lock.release(token)

    async def write(self, offset: int, data: bytes) -> None:
        await self._locked_fan_out(
            offset, len(data), f"write {offset}+{len(data)}", lambda e: e.write(offset, data)
        )

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        await self._locked_fan_out(
            offset,
            length,
            f"write-zeroes {offset}+{length}",
            lambda e: e.write_zeroes(offset, length, unmap),
        )

    async def discard(self, offset: int, length: int) -> None:
        # As write-zeroes with unmap: a child that cannot discard would keep its
        # old bytes while its siblings read zeroes, and the next read would
        # report a mismatch that is not one.
        await self._locked_fan_out(
            offset,
            length,
            f"discard {offset}+{length}",
            lambda e: e.write_zeroes(offset, length, True),
        )

    async def flush(self) -> None:
        await self._fan_out("flush", "flush", lambda e: e.flush())

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self._block_status(offset, length, majority=True)

    async def _block_status(self, offset: int, length: int, majority: bool) -> list[Extent]:
        """Voted block status; with majority=False a piece is zero only if every
        voter says so (what a scrub may skip)."""
        voters = self._voters()
        answers: list[list[Extent]] = []

        async def one(edge: Edge) -> None:
            try:
                answers.append(await edge.block_status(offset, length))
            except Exception:
                answers.append([])

        await self._each(voters, one)
        if majority:
            return zero_majority(offset, length, answers, self.threshold, len(voters))
        n = len(voters)
        return zero_majority(offset, length, answers, max(n, 1), 1 if n else 0)

    # -- the ChildSet capability (graph/node.py): scrub and replace run as graph jobs --

    def child_set(self) -> QuorumNode:
        return self

    def scrub_report(self) -> dict[str, Any]:
        return {"mismatched_ranges": 0, "bytes_rewritten": 0, "read_errors": 0,
                "unrecoverable": []}  # fmt: skip

    def _totals(self, counter: str) -> int:
        return sum(getattr(s, counter) for s in self.child_state.values())

    async def scrub_chunk(self, offset: int, length: int, report: dict[str, Any]) -> None:
        """Vote [offset, offset+length) and rewrite every loser (the caller holds
        `copy_lock` on the range); ranges every voter reads as zeroes are skipped."""
        voters = self._voters()
        if len(voters) < self.threshold:
            raise self._quorum_lost(
                f"scrub {offset}+{length}",
                f"{len(voters)} children in service, {self.threshold} needed",
            )
        errors, rewritten = self._totals("read_errors"), self._totals("bytes_rewritten")
        for ext in await self._block_status(offset, length, majority=False):
            if ext.status & Status.ZERO:
                continue
            what = f"scrub {ext.offset}+{ext.length}"
            verdict = await self._vote_locked(voters, ext.offset, ext.length, what, True)
            report["mismatched_ranges"] += sum(len(r) for r in verdict.wrong.values())
            if verdict.undecided:
                self._quorum_lost(what, self._describe_undecided(verdict))
                lost = report["unrecoverable"]
                lost.extend(f"{o}+{k}" for o, k in verdict.undecided[: 64 - len(lost)])
        report["read_errors"] += self._totals("read_errors") - errors
        report["bytes_rewritten"] += self._totals("bytes_rewritten") - rewritten

    def _find_child(self, ref: str) -> Edge:
        slots = [e for e in self.children.values() if self.child_state[e.name].state != RESYNCING]
        for edge in slots:
            if ref in (edge.name, edge.node.name):
                return edge
        names = ", ".join(f"{e.name} ('{e.node.name}')" for e in slots)
        raise ControlError(
            f"node '{self.name}': replace: '{ref}' is not one of its children: {names}"
        )

    def check_replace(self, old_ref: str, node: Node) -> Edge:
        """The slot `old_ref` names, if `node` can be resynced to take its place.

        The old child keeps serving (if it still can) until the new one is in
        sync, so the resync needs a quorum of the children in service now.
        """
        old = self._find_child(old_ref)
        if len(self._voters()) < self.threshold:
            raise ControlError(
                f"node '{self.name}': replace: only {len(self._voters())} children in service, "
                f"{self.threshold} needed to resync a new one"
            )
        problem = ""
        if node.size != self.size:
            problem = f"its size is {node.size} bytes, the quorum's {self.size}"
        elif node.read_only:
            problem = "it is read-only"
        if problem:
            raise ControlError(f"node '{self.name}': replace: spare '{node.name}': {problem}")
        return old

    def attach_resync(self, old_ref: str, node: Node) -> tuple[Edge, Edge]:
        """(Drained) add `node` as a write-only child to take the place of `old_ref`."""
        old = self.check_replace(old_ref, node)
        temp = f"{old.name}.new"
        self.child_state[temp] = ChildState(state=RESYNCING)
        edge = self.add_child(temp, Role.CHILDREN, node)
        log.info("node '%s': replacing %s ('%s') with '%s': resync started",
                 self.name, old.name, old.node.name, node.name)  # fmt: skip
        return old, edge

    def detach_resync(self, temp: Edge) -> None:
        if self.children.get(temp.name) is temp:
            del self.children[temp.name]
            del self.child_state[temp.name]
            temp.detach()

    def resync_writes(self, temp: Edge) -> int:
        st = self.child_state.get(temp.name)
        return st.writes_mirrored if st is not None else 0

    async def resync_chunk(self, temp: Edge, offset: int, length: int) -> None:
        """Copy the voted data of the range into `temp` (the caller holds `copy_lock`);
        ranges a majority reads as zeroes are written as zeroes with unmap."""
        self._check_new_child(temp)
        voters = self._voters()
        for ext in await self._block_status(offset, length, majority=True):
            if ext.status & Status.ZERO:
                await temp.write_zeroes(ext.offset, ext.length, True)
                continue
            what = f"resync {ext.offset}+{ext.length}"
            verdict = await self._vote_locked(
                voters, ext.offset, ext.length, what, bool(self.options.get("rewrite-corrupted"))
            )
            if verdict.undecided:
                raise self._quorum_lost(what, self._describe_undecided(verdict))
            await temp.write(ext.offset, verdict.data)

    def _check_new_child(self, temp: Edge) -> None:
        st = self.child_state[temp.name]
        if st.state == FAILED:
            raise IOFailure(
                f"node '{self.name}': replace: the new child '{temp.node.name}' failed: "
                f"{st.last_error}"
            )

    def promote(self, slot: Edge, temp: Edge) -> None:
        """(Drained) the slot's edge points at the resynced node, its state afresh."""
        self._check_new_child(temp)  # a guest write may have failed on it
        new = temp.node
        self.detach_resync(temp)
        slot.replace(new)
        self.child_state[slot.name] = ChildState()
        log.info("node '%s': %s is now '%s' (resynced)", self.name, slot.name, new.name)

    def demote(self, slot: Edge, temp: Edge, old: Node) -> None:
        """Undo `promote`: the old node back in its slot, the new one resyncing again."""
        new = slot.node
        slot.replace(old)
        self.child_state[temp.name] = ChildState(state=RESYNCING)
        self.children[temp.name] = temp
        temp.node = new
        new.parents.append(temp)

    # -- control files -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        voters = len(self._voters())
        states = [s.state for s in self.child_state.values()]
        if voters < self.threshold:
            overall = FAILED
        elif all(s == HEALTHY for s in states):
            overall = HEALTHY
        else:
            overall = DEGRADED
        return {
            "state": overall,
            "vote-threshold": self.threshold,
            "read-pattern": "fifo" if self.fifo else "quorum",
            "rewrite-corrupted": bool(self.options.get("rewrite-corrupted")),
            "children_in_service": voters,
            "quorum_losses": self.quorum_losses,
            "last_quorum_loss": self.last_quorum_loss,
            "children": {
                e.name: self.child_state[e.name].as_dict(e.node.name)
                for e in self.children.values()
            },
        }

    def _read_status(self) -> str:
        return json.dumps(self.status(), indent=2, sort_keys=True) + "\n"

    def controls(self) -> dict[str, Control]:
        return {
            "status": Control(self._read_status, None, "per-child state and error counters (JSON)"),
        }

    def driver_stats(self) -> dict[str, Any]:
        return {
            "quorum_losses": self.quorum_losses,
            "mismatches": sum(s.mismatches for s in self.child_state.values()),
            "bytes_rewritten": sum(s.bytes_rewritten for s in self.child_state.values()),
        }
