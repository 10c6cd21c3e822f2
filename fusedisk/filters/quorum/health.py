"""What a quorum node knows of its children's health, how it shows it, and
the repair of a child that lost a vote.

Kept apart from the node (filters/quorum/node.py), which only votes and fans
requests out: here are the per-child states and counters, the log lines
(limited per child, so a child that goes bad cannot flood the log), the
quorum-loss errors and the `status` control file rendered from all of it.

Child states: healthy (in service, no trouble seen), degraded (in service,
has returned errors or wrong data), failed (out of service: a write, flush or
rewrite failed, so its content is no longer known), resyncing (a replacement
being filled from the quorum: written by guest writes, never read until its
resync completes).
"""

from __future__ import annotations

import errno as _errno
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fusedisk.errors import IOFailure
from fusedisk.filters.quorum.vote import VOTE_BLOCK, Range, Verdict
from fusedisk.graph.edge import Edge

log = logging.getLogger("fusedisk")

HEALTHY = "healthy"
DEGRADED = "degraded"
FAILED = "failed"
RESYNCING = "resyncing"

#: per child, read errors (and votes lost) logged before the rest are only counted
READ_ERRORS_LOGGED = 5
MISMATCHES_LOGGED = 20


@dataclass
class ChildState:
    state: str = HEALTHY
    read_errors: int = 0
    write_errors: int = 0
    flush_errors: int = 0
    mismatches: int = 0
    bytes_rewritten: int = 0
    last_error: str = ""
    transient_mismatches: int = 0  # votes lost on a first read, not on the re-read
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
            "transient_mismatches": self.transient_mismatches,
            "bytes_rewritten": self.bytes_rewritten,
            "last_error": self.last_error,
        }


def describe_undecided(verdict: Verdict) -> str:
    """The ranges no group won, for an error sentence (the first eight shown)."""
    shown = ", ".join(f"{o}+{n}" for o, n in verdict.undecided[:8])
    more = len(verdict.undecided) - 8
    return f"no {VOTE_BLOCK}-byte block quorum at {shown}" + (
        f" and {more} more ranges" if more > 0 else ""
    )


class QuorumHealth:
    """The per-child states and counters of one quorum node (keyed by edge name)."""

    def __init__(self, node: str, max_read_errors: int = 0) -> None:
        self.node = node
        #: bad reads (failed or outvoted) after which a child leaves service; 0: never
        self.max_read_errors = max_read_errors
        self.states: dict[str, ChildState] = {}
        self.quorum_losses = 0
        self.last_quorum_loss = ""

    def child_failed(self, edge: Edge, what: str, exc: BaseException) -> None:
        """Take the child out of service: after a failed write its content is unknown."""
        st = self.states[edge.name]
        st.last_error = f"{what}: {exc}"
        if st.state != FAILED:
            st.state = FAILED
            log.error(
                "node '%s': child %s ('%s') leaves service: %s failed: %s",
                self.node, edge.name, edge.node.name, what, exc,
            )  # fmt: skip

    def read_error(self, edge: Edge, what: str, exc: BaseException) -> None:
        """Count a failed read; the child stays in service (its content is intact)."""
        st = self.states[edge.name]
        st.read_errors += 1
        st.last_error = f"{what}: {exc}"
        if st.state == HEALTHY:
            st.state = DEGRADED
        if st.read_errors <= READ_ERRORS_LOGGED:
            log.warning(
                "node '%s': child %s ('%s'): %s failed: %s%s",
                self.node, edge.name, edge.node.name, what, exc,
                " (further read errors are only counted)"
                if st.read_errors == READ_ERRORS_LOGGED else "",
            )  # fmt: skip
        self._past_read_limit(edge, st)

    def lost_vote(self, edge: Edge, ranges: list[Range], what: str, repairing: bool) -> None:
        """Count the ranges where the child lost a vote, repaired or not."""
        st = self.states[edge.name]
        st.mismatches += len(ranges)
        if st.state == HEALTHY:
            st.state = DEGRADED
        st.mismatch_events += 1
        if st.mismatch_events <= MISMATCHES_LOGGED:
            shown = ", ".join(f"{o}+{n}" for o, n in ranges[:8])
            log.warning(
                "node '%s': child %s ('%s') returned wrong data (%s) at %s%s%s",
                self.node, edge.name, edge.node.name, what, shown,
                "; rewriting it" if repairing else "",
                " (further mismatches are only counted)"
                if st.mismatch_events == MISMATCHES_LOGGED else "",
            )  # fmt: skip
        self._past_read_limit(edge, st)

    def _past_read_limit(self, edge: Edge, st: ChildState) -> None:
        """A child that keeps failing or losing reads is worse than none (md's policy):
        out of service it costs no more reads, and `replace` brings a spare in."""
        bad = st.read_errors + st.mismatch_events
        if self.max_read_errors and bad >= self.max_read_errors and st.state != FAILED:
            self.child_failed(edge, "reads", IOFailure(
                f"{bad} failed or outvoted reads reached max-read-errors = "
                f"{self.max_read_errors}"))  # fmt: skip

    def count_not_repeated(self, first: Verdict, reread: Verdict) -> None:
        """Count the votes a child lost on a read but not on its re-read under the
        range lock.  Such a disagreement is a read that raced a guest write, or a
        child that returned wrong data once: shown (`transient_mismatches`) so a
        flaky child can be seen, but it neither degrades the child nor is repaired.
        """
        for name, ranges in first.wrong.items():
            if name not in reread.wrong and name in self.states:
                self.states[name].transient_mismatches += len(ranges)

    async def repair(
        self, verdict: Verdict, voters: Mapping[str, Edge], failed: list[Edge]
    ) -> None:
        """Write the winning bytes where a child lost the vote, and over the
        decided ranges of the children whose read failed (rewrite-corrupted,
        scrub).  The caller holds the range lock: no guest write is undone.
        A child whose rewrite fails leaves service."""
        for name, ranges in verdict.wrong.items():
            await self._rewrite(voters[name], verdict, ranges)
        decided = verdict.decided()
        for edge in failed:
            await self._rewrite(edge, verdict, decided)

    async def _rewrite(self, edge: Edge, verdict: Verdict, ranges: list[Range]) -> None:
        st = self.states[edge.name]
        for off, n in ranges:
            if st.state == FAILED:
                return
            a = off - verdict.offset
            try:
                await edge.write(off, verdict.data[a : a + n])
            except Exception as e:
                st.write_errors += 1
                self.child_failed(edge, f"rewrite {off}+{n}", e)
                return
            st.bytes_rewritten += n

    def quorum_lost(self, what: str, detail: str) -> IOFailure:
        """Count and log a request that had no quorum; the caller raises the result."""
        self.quorum_losses += 1
        self.last_quorum_loss = f"{what}: {detail}"
        log.error("node '%s': quorum lost: %s: %s", self.node, what, detail)
        return IOFailure(f"node '{self.node}': quorum lost: {what}: {detail}", _errno.EIO)

    def status(self, edges: Iterable[Edge], settings: dict[str, Any]) -> dict[str, Any]:
        """The `status` control file: overall state, `settings`, and every child."""
        edges = list(edges)
        voters = sum(1 for e in edges if self.states[e.name].votes)
        threshold = settings["vote-threshold"]
        states = [s.state for s in self.states.values()]
        if voters < threshold:
            overall = FAILED
        elif all(s == HEALTHY for s in states):
            overall = HEALTHY
        else:
            overall = DEGRADED
        return {
            "state": overall,
            **settings,
            "children_in_service": voters,
            "quorum_losses": self.quorum_losses,
            "last_quorum_loss": self.last_quorum_loss,
            "children": {e.name: self.states[e.name].as_dict(e.node.name) for e in edges},
        }

    def status_text(self, edges: Iterable[Edge], settings: dict[str, Any]) -> str:
        return json.dumps(self.status(edges, settings), indent=2, sort_keys=True) + "\n"

    def stats(self) -> dict[str, Any]:
        """Totals over the children, for the node's driver stats (metrics)."""
        return {
            "quorum_losses": self.quorum_losses,
            "mismatches": sum(s.mismatches for s in self.states.values()),
            "bytes_rewritten": sum(s.bytes_rewritten for s in self.states.values()),
        }
