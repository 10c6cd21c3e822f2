"""Graph transactions: a graph change as steps with undo, applied under drain,
made durable by one change-log record.

Every graph change (the overlays of a snapshot, the switch at the end of a
commit, stream or revert, a quorum child replaced, a spare opened, a node
removed) goes through a Transaction:

    prepare    undo_later(...)        set-up done outside the drain (files made,
                                      nodes opened) registers how to undo it
    apply      drained(disks):        the touched disks are quiet and flushed
                 step.do() ...        each step in order; if one fails, the
                                      steps done are undone in reverse
                 record               one record: replayed on a copy of the
                                      log first (a record the next mount
                                      would refuse is never written), then
                                      write + fsync + rename (changes.py)
                 -- point of no return: nothing is undone after it --
                 then(...)            what the switch left behind: nodes
                                      closed, files deleted (errors logged)
    rollback   every registered undo, newest first, shielded from cancellation

An apply without a record is a prepare step under drain (hooks on an edge, a
base made writable): its undos join the transaction's, for a rollback.
A crash (SIGKILL) before the record is written leaves the log as it was (the
graph before); after, the next mount replays the record (the graph after).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

if TYPE_CHECKING:
    from fusedisk.graph.changes import Change
    from fusedisk.graph.disk import Disk

log = logging.getLogger("fusedisk")

Action = Callable[[], Awaitable[None] | None]


async def _call(action: Action) -> None:
    result = action()
    if inspect.isawaitable(result):
        await result


@dataclass
class Step:
    """One change with the action that takes it back (None: nothing to undo)."""

    do: Action
    undo: Action | None = None


class ChangeLog(Protocol):
    """Where a transaction makes its change durable (the Graph)."""

    def commit_record(self, record: Change) -> None: ...


class Transaction:
    """Steps with undo over a set of disks; see the module doc."""

    def __init__(self, log_: ChangeLog, disks: list[Disk], what: str) -> None:
        self.changelog = log_
        self.disks = sorted(set(disks), key=lambda d: d.name)
        self.what = what
        self._undo: list[Action] = []
        self.committed = False

    def undo_later(self, undo: Action) -> None:
        """Register how to take back a prepare action that has been done."""
        self._undo.append(undo)

    async def apply(
        self,
        steps: list[Step],
        record: Change | None = None,
        durable: Action | None = None,
        then: Sequence[Action] = (),
    ) -> None:
        """Run `steps` under drain, then make them durable (`record`, or the
        `durable` action such as an atomic rename) as the point of no return."""
        done: list[Step] = []
        async with AsyncExitStack() as stack:
            for disk in self.disks:
                await stack.enter_async_context(disk.drained())
            try:
                for step in steps:
                    await _call(step.do)
                    done.append(step)
                if record is not None:
                    self.changelog.commit_record(record)
                if durable is not None:
                    await _call(durable)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._undo_all([s.undo for s in done if s.undo is not None])
                raise
            if record is None and durable is None:
                self._undo.extend(s.undo for s in done if s.undo is not None)
                return
            self.committed = True
            self._undo.clear()
            with trio.CancelScope(shield=True):
                for action in then:
                    try:
                        await _call(action)
                    except Exception as e:
                        log.warning("%s: after the change: %s", self.what, e)

    async def rollback(self) -> None:
        """Undo everything prepared and not committed, newest first."""
        undo, self._undo = self._undo, []
        with trio.CancelScope(shield=True):
            await self._undo_all(undo)

    async def _undo_all(self, undo: list[Action]) -> None:
        for action in reversed(undo):
            try:
                await _call(action)
            except Exception as e:
                log.error("%s: undo failed: %s", self.what, e)
