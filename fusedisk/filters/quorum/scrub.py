"""The quorum's Scrubber (graph/node.py): vote a range and rewrite every loser.

The graph's scrub job (graph/children.py) runs it chunk by chunk over the disk;
each chunk holds the node's own range lock, the one guest writes take, so no
write interleaves the vote and the repair.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fusedisk.filters.quorum.health import describe_undecided
from fusedisk.graph.extents import Status

if TYPE_CHECKING:
    from fusedisk.filters.quorum.node import QuorumNode


class QuorumScrub:
    """The Scrubber of one quorum node."""

    def __init__(self, node: QuorumNode) -> None:
        self.node = node

    def scrub_report(self) -> dict[str, Any]:
        return {"mismatched_ranges": 0, "bytes_rewritten": 0, "read_errors": 0,
                "unrecoverable": []}  # fmt: skip

    def _totals(self) -> tuple[int, int]:
        """Read errors and bytes rewritten so far, over every child."""
        states = self.node.child_state.values()
        return sum(s.read_errors for s in states), sum(s.bytes_rewritten for s in states)

    async def scrub_chunk(self, offset: int, length: int, report: dict[str, Any]) -> None:
        """Vote [offset, offset+length) under the node's range lock and rewrite every
        loser; ranges every voter reads as zeroes are skipped."""
        lock = self.node.copy_lock
        token = await lock.acquire(offset, offset + length)
        try:
            await self._scrub_locked(offset, length, report)
        finally:
            lock.release(token)

    async def _scrub_locked(self, offset: int, length: int, report: dict[str, Any]) -> None:
        q = self.node
        voters = q._voters()
        if len(voters) < q.threshold:
            raise q.health.quorum_lost(
                f"scrub {offset}+{length}",
                f"{len(voters)} children in service, {q.threshold} needed",
            )
        errors, rewritten = self._totals()
        for ext in await q._block_status(offset, length, majority=False):
            if ext.status & Status.ZERO:
                continue
            what = f"scrub {ext.offset}+{ext.length}"
            verdict = await q._vote_locked(voters, ext.offset, ext.length, what, True)
            report["mismatched_ranges"] += sum(len(r) for r in verdict.wrong.values())
            if verdict.undecided:
                q.health.quorum_lost(what, describe_undecided(verdict))
                lost = report["unrecoverable"]
                lost.extend(f"{o}+{k}" for o, k in verdict.undecided[: 64 - len(lost)])
        errors_now, rewritten_now = self._totals()
        report["read_errors"] += errors_now - errors
        report["bytes_rewritten"] += rewritten_now - rewritten
