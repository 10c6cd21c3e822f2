"""The quorum's ChildSet (graph/node.py): what it offers the graph's scrub and
replace jobs (graph/children.py) — vote and repair a range, resync a range into
a new child, attach / detach / promote / demote a child.  The graph runs the
copy loop, the drain and the change-log record; this only knows the children.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fusedisk.errors import ControlError, IOFailure
from fusedisk.filters.quorum.health import FAILED, RESYNCING, ChildState, describe_undecided
from fusedisk.graph.edge import Edge, RangeLock
from fusedisk.graph.extents import Status
from fusedisk.graph.node import Node, Role

if TYPE_CHECKING:
    from fusedisk.filters.quorum.node import QuorumNode

log = logging.getLogger("fusedisk")


class QuorumChildren:
    """The ChildSet of one quorum node."""

    def __init__(self, node: QuorumNode) -> None:
        self.node = node
        #: the state a slot had before `promote`, which `demote` puts back
        self._before_promote: dict[str, ChildState] = {}

    @property
    def copy_lock(self) -> RangeLock:
        """The node's write lock: a chunk of scrub or resync holds it exclusively."""
        return self.node.copy_lock

    def scrub_report(self) -> dict[str, Any]:
        return {"mismatched_ranges": 0, "bytes_rewritten": 0, "read_errors": 0,
                "unrecoverable": []}  # fmt: skip

    def _totals(self) -> tuple[int, int]:
        """Read errors and bytes rewritten so far, over every child."""
        states = self.node.child_state.values()
        return sum(s.read_errors for s in states), sum(s.bytes_rewritten for s in states)

    async def scrub_chunk(self, offset: int, length: int, report: dict[str, Any]) -> None:
        """Vote [offset, offset+length) and rewrite every loser (the caller holds
        `copy_lock` on the range); ranges every voter reads as zeroes are skipped."""
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

    def _find_child(self, ref: str) -> Edge:
        q = self.node
        slots = [e for e in q.children.values() if q.child_state[e.name].state != RESYNCING]
        for edge in slots:
            if ref in (edge.name, edge.node.name):
                return edge
        names = ", ".join(f"{e.name} ('{e.node.name}')" for e in slots)
        raise ControlError(f"node '{q.name}': replace: '{ref}' is not one of its children: {names}")

    def check_replace(self, old_ref: str, node: Node) -> Edge:
        """The slot `old_ref` names, if `node` can be resynced to take its place.

        The old child keeps serving (if it still can) until the new one is in
        sync, so the resync needs a quorum of the children in service now.
        """
        q = self.node
        old = self._find_child(old_ref)
        if len(q._voters()) < q.threshold:
            raise ControlError(
                f"node '{q.name}': replace: only {len(q._voters())} children in service, "
                f"{q.threshold} needed to resync a new one"
            )
        problem = ""
        if node.size != q.size:
            problem = f"its size is {node.size} bytes, the quorum's {q.size}"
        elif node.read_only:
            problem = "it is read-only"
        if problem:
            raise ControlError(f"node '{q.name}': replace: spare '{node.name}': {problem}")
        return old

    def attach_resync(self, old_ref: str, node: Node) -> tuple[Edge, Edge]:
        """(Drained) add `node` as a write-only child to take the place of `old_ref`."""
        q = self.node
        old = self.check_replace(old_ref, node)
        temp = f"{old.name}.new"
        q.child_state[temp] = ChildState(state=RESYNCING)
        edge = q.add_child(temp, Role.CHILDREN, node)
        log.info("node '%s': replacing %s ('%s') with '%s': resync started",
                 q.name, old.name, old.node.name, node.name)  # fmt: skip
        return old, edge

    def detach_resync(self, temp: Edge) -> None:
        q = self.node
        if q.children.get(temp.name) is temp:
            del q.children[temp.name]
            del q.child_state[temp.name]
            temp.detach()

    def resync_writes(self, temp: Edge) -> int:
        q = self.node
        st = q.child_state.get(temp.name)
        return st.writes_mirrored if st is not None else 0

    async def resync_chunk(self, temp: Edge, offset: int, length: int) -> None:
        """Copy the voted data of the range into `temp` (the caller holds `copy_lock`);
        ranges a majority reads as zeroes are written as zeroes with unmap."""
        q = self.node
        self._check_new_child(temp)
        voters = q._voters()
        for ext in await q._block_status(offset, length, majority=True):
            if ext.status & Status.ZERO:
                await temp.write_zeroes(ext.offset, ext.length, True)
                continue
            what = f"resync {ext.offset}+{ext.length}"
            verdict = await q._vote_locked(
                voters, ext.offset, ext.length, what, bool(q.options.get("rewrite-corrupted"))
            )
            if verdict.undecided:
                raise q.health.quorum_lost(what, describe_undecided(verdict))
            await temp.write(ext.offset, verdict.data)

    def _check_new_child(self, temp: Edge) -> None:
        q = self.node
        st = q.child_state[temp.name]
        if st.state == FAILED:
            raise IOFailure(
                f"node '{q.name}': replace: the new child '{temp.node.name}' failed: "
                f"{st.last_error}"
            )

    def promote(self, slot: Edge, temp: Edge) -> None:
        """(Drained) the slot's edge points at the resynced node, its state afresh."""
        q = self.node
        self._check_new_child(temp)  # a guest write may have failed on it
        new = temp.node
        self.detach_resync(temp)
        slot.replace(new)
        self._before_promote[slot.name] = q.child_state[slot.name]
        q.child_state[slot.name] = ChildState()
        log.info("node '%s': %s is now '%s' (resynced)", q.name, slot.name, new.name)

    def demote(self, slot: Edge, temp: Edge, old: Node) -> None:
        """Undo `promote`: the old node back in its slot in the state it had (a failed
        child stays failed: its data is stale), the new one resyncing again."""
        q = self.node
        new = slot.node
        slot.replace(old)
        q.child_state[slot.name] = self._before_promote.pop(slot.name)
        q.child_state[temp.name] = ChildState(state=RESYNCING)
        q.children[temp.name] = temp
        temp.node = new
        new.parents.append(temp)
