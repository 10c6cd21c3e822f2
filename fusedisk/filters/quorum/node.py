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
corruption; repairing from it would undo the write on a child.  A child that
lost the first vote but not the second is only counted (transient_mismatches).

Writes, write-zeroes and discards hold the same range lock (overlapping guest
writes are serialised so every child applies them in the same order) and go
to every child in service at once; they succeed if `vote-threshold` children
succeed.  A child whose write, write-zeroes or flush fails leaves service
(state `failed`): its content is no longer known, so it is neither read nor
written until it is replaced.  Discard is done as write-zeroes with unmap on
every child, so the siblings keep reading the same bytes.

Scrub and replace are jobs of the graph engine (graph/children.py): the node
only offers a Scrubber (vote and repair one range, under its range lock:
scrub.py) and a ChildSet (add and delete a child, voting or not: children.py).
A replacement is the graph's copy job, which reads this node (voted reads)
into the spare added as a non-voting child, then swaps the children in one
graph transaction under drain, recorded in the change log.
Child states, counters and the `status` file are kept in health.py; running one
request on several children at once in fanout.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fusedisk.errors import ControlError, OpenError
from fusedisk.filters.quorum.children import QuorumChildren
from fusedisk.filters.quorum.fanout import FanOut
from fusedisk.filters.quorum.health import ChildState, QuorumHealth, describe_undecided
from fusedisk.filters.quorum.scrub import QuorumScrub
from fusedisk.filters.quorum.vote import Verdict, vote, zero_majority
from fusedisk.graph.edge import Edge, RangeLock
from fusedisk.graph.extents import Extent
from fusedisk.graph.node import (
    ChildSet,
    ChildSlot,
    Control,
    GraphOp,
    Node,
    NodeContext,
    Role,
    Scrubber,
)
from fusedisk.graph.options import REQUIRED, Option, option_table

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
        Option(
            "max-read-errors",
            "int",
            0,
            "take a child out of service after this many failed or outvoted reads "
            "(md's max_read_errors; 0: never)",
            minimum=0,
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
        self.health = QuorumHealth(name, int(self.options.get("max-read-errors", 0)))
        #: guest writes take it per range; a scrub chunk and a re-vote hold it
        self.copy_lock = RangeLock()
        self._children_set = QuorumChildren(self)
        self._scrubber = QuorumScrub(self)
        #: runs one request on several children at once (fanout.py)
        self.fanout = FanOut()

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
        self.health.states = {e.name: ChildState() for e in edges}

    @property
    def child_state(self) -> dict[str, ChildState]:
        return self.health.states

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

    # -- reads ------------------------------------------------------------------------

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
                self.health.read_error(edge, what, e)
        raise self.health.quorum_lost(what, "no child could read it")

    async def _read_quorum(self, offset: int, length: int) -> bytes:
        voters = self._voters()
        what = f"read {offset}+{length}"
        if len(voters) < self.threshold:
            raise self.health.quorum_lost(
                what, f"{len(voters)} children in service, {self.threshold} needed"
            )
        results = await self.fanout.read_all(voters, offset, length)
        good = [r for r in results.values() if isinstance(r, bytes)]
        agree = all(r == good[0] for r in good[1:])
        if good and agree:
            if len(good) == len(results):
                return good[0]
            if len(good) >= self.threshold and not self.options.get("rewrite-corrupted"):
                # Some children failed, the others agree: nothing to repair.
                for edge in voters:
                    if not isinstance(results[edge.name], bytes):
                        self.health.read_error(edge, what, results[edge.name])
                return good[0]
        # Errors or disagreement: decide under the range lock, with a fresh read.
        token = await self.copy_lock.acquire(offset, offset + length)
        try:
            verdict = await self._vote_locked(
                self._voters(), offset, length, what, self.options.get("rewrite-corrupted", False)
            )
        finally:
            self.copy_lock.release(token)
        if not agree:
            answers = {name: r for name, r in results.items() if isinstance(r, bytes)}
            self.health.count_not_repeated(vote(offset, answers, self.threshold), verdict)
        if verdict.undecided:
            raise self.health.quorum_lost(what, describe_undecided(verdict))
        return verdict.data

    async def _vote_locked(
        self, voters: list[Edge], offset: int, length: int, what: str, repair: bool
    ) -> Verdict:
        """Read from `voters`, vote, count losers and (if `repair`) rewrite them.

        The caller holds the range lock, so no guest write interleaves.
        """
        results = await self.fanout.read_all(voters, offset, length)
        answers: dict[str, bytes] = {}
        failed: list[Edge] = []
        for edge in voters:
            r = results[edge.name]
            if isinstance(r, bytes):
                answers[edge.name] = r
            else:
                self.health.read_error(edge, what, r)
                failed.append(edge)
        verdict = vote(offset, answers, self.threshold)
        by_name = {e.name: e for e in voters}
        for name, ranges in verdict.wrong.items():
            self.health.lost_vote(by_name[name], ranges, what, repair and not self.read_only)
        if repair and not self.read_only:
            await self.health.repair(verdict, by_name, failed)
        return verdict

    # -- writes -------------------------------------------------------------------------

    async def _fan_out(
        self, what: str, kind: str, request: Callable[[Edge], Awaitable[None]]
    ) -> None:
        """Run `request` on every target at once; enough in-service successes or EIO."""
        targets = self._targets()
        voting = {e.name for e in targets if self.child_state[e.name].votes}
        if len(voting) < self.threshold:
            raise self.health.quorum_lost(
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
                self.health.child_failed(edge, what, e)
            else:
                ok.append(edge.name)
                if edge.name not in voting:
                    self.child_state[edge.name].writes_mirrored += 1

        await self.fanout.each(targets, one)
        done = sum(1 for name in ok if name in voting)
        if done < self.threshold:
            raise self.health.quorum_lost(
                what, f"{done} children succeeded, {self.threshold} needed"
            )

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

        await self.fanout.each(voters, one)
        if majority:
            return zero_majority(offset, length, answers, self.threshold, len(voters))
        n = len(voters)
        return zero_majority(offset, length, answers, max(n, 1), 1 if n else 0)

    # -- capabilities: scrub and replace run as graph jobs ------------------------------

    def child_set(self) -> ChildSet:
        return self._children_set

    def scrubber(self) -> Scrubber:
        return self._scrubber

    # -- control files -----------------------------------------------------------------

    def _read_status(self) -> str:
        settings = {
            "vote-threshold": self.threshold,
            "read-pattern": "fifo" if self.fifo else "quorum",
            "rewrite-corrupted": bool(self.options.get("rewrite-corrupted")),
        }
        return self.health.status_text(self.children.values(), settings)

    def controls(self) -> dict[str, Control]:
        return {
            "status": Control(self._read_status, None, "per-child state and error counters (JSON)"),
        }

    def driver_stats(self) -> dict[str, Any]:
        return {
            **self.health.stats(),
            "child_reads_in_flight": self.fanout.reads_in_flight,
            "peak_child_reads_in_flight": self.fanout.peak_reads_in_flight,
        }
