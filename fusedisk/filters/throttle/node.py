"""Driver `throttle`: QEMU's I/O limits, alone or shared in a throttle group.

Thin glue: the algorithm (the leaky bucket as a meter, bursts, iops-size, the
validity rules) lives in bucket.py, the throttle group (queues of waiting
requests, round-robin among the members of a group, run-time changes) in
group.py.  This file joins a node to its group (its own, or a shared
`[throttle-groups.NAME]`), sends each request through it and forwards drain
and option changes to it.

Flush and block-status are not throttled; discard and write-zeroes count as
writes of their length (as in QEMU's throttle driver).

Drain: while a member is draining (`begin_drain()` ... `end_drain()`, or
`async with node.draining():`), its queued and new requests pass at once (and
are still accounted), as QEMU disables I/O limits during a drain; otherwise a
graph change would wait behind a throttled queue.  The Disk's `drained()`
calls these (Node's drain hooks) on every node of its tree.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, ClassVar

from fusedisk.errors import ControlError, NotSupported, OpenError
from fusedisk.filters.throttle.bucket import OPTION_NAMES, Direction, ThrottleConfigError
from fusedisk.filters.throttle.group import LIMIT_OPTIONS, Member, ThrottleGroup
from fusedisk.graph.node import Filter, Node, NodeContext
from fusedisk.graph.options import Option, option_table

__all__ = ["ThrottleGroup", "ThrottleNode"]  # ThrottleGroup: tests import it from here


class ThrottleNode(Filter):
    driver = "throttle"
    summary = "limits IOPS and bandwidth with QEMU's limits, alone or in a shared group"
    option_specs = option_table(
        Option(
            "throttle-group",
            "str",
            None,
            "the [throttle-groups.NAME] whose budget this node shares (instead of inline limits)",
        ),
        *LIMIT_OPTIONS.values(),
    )
    spec_sections: ClassVar[dict[str, Mapping[str, Option]]] = {"throttle-groups": LIMIT_OPTIONS}

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        children: Mapping[str, Node | list[Node]],
        context: NodeContext,
    ) -> None:
        super().__init__(name, options, children, context)
        #: the budget it draws from (its own, or a shared group) and its place in it; open() joins
        self.group: ThrottleGroup | None = None
        self.member: Member | None = None

    def _joined(self) -> tuple[ThrottleGroup, Member]:
        if self.group is None or self.member is None:
            raise NotSupported(f"node '{self.name}' (throttle) is not open")
        return self.group, self.member

    async def _throttle(self, direction: Direction, nbytes: int) -> None:
        group, member = self._joined()
        await group.intercept(member, direction, nbytes)

    @property
    def group_name(self) -> str | None:
        name = self.options.get("throttle-group")
        return str(name) if name else None

    async def open(self) -> None:
        await super().open()
        group_name = self.group_name
        if group_name is None:
            try:
                group = ThrottleGroup(self.name, self.options, label=f"node '{self.name}'")
            except ThrottleConfigError as e:
                raise OpenError(f"node '{self.name}': {e}") from None
        else:
            group = self._shared_group(group_name)
        self.group, self.member = group, group.join(self.name)

    def _shared_group(self, group_name: str) -> ThrottleGroup:
        for name in OPTION_NAMES:
            if self.options.get(name, LIMIT_OPTIONS[name].default) != LIMIT_OPTIONS[name].default:
                raise OpenError(
                    f"node '{self.name}': option '{name}': give either 'throttle-group' or "
                    "inline limits, not both (set the limits in "
                    f"[throttle-groups.{group_name}])"
                )

        def factory(options: Mapping[str, Any]) -> ThrottleGroup:
            return ThrottleGroup(group_name, options)

        try:
            group = self.context.shared("throttle-groups", group_name, factory)
        except KeyError:
            raise OpenError(
                f"node '{self.name}': option 'throttle-group': the spec has no "
                f"[throttle-groups.{group_name}]"
            ) from None
        except ThrottleConfigError as e:
            raise OpenError(
                f"node '{self.name}': option 'throttle-group': [throttle-groups.{group_name}]: {e}"
            ) from None
        if not isinstance(group, ThrottleGroup):
            raise OpenError(
                f"node '{self.name}': option 'throttle-group': "
                f"'{group_name}' is not a throttle group"
            )
        return group

    async def close(self) -> None:
        if self.group is not None and self.member is not None:
            self.group.leave(self.member)

    # -- requests -----------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        await self._throttle(Direction.READ, length)
        return await self.filtered.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self._throttle(Direction.WRITE, len(data))
        await self.filtered.write(offset, data)

    async def discard(self, offset: int, length: int) -> None:
        await self._throttle(Direction.WRITE, length)
        await self.filtered.discard(offset, length)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        await self._throttle(Direction.WRITE, length)
        await self.filtered.write_zeroes(offset, length, unmap)

    # flush, block_status and truncate are forwarded unthrottled by Filter.

    # -- drain ----------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Let this node's queued and new requests pass unthrottled until end_drain()."""
        group, member = self._joined()
        group.set_draining(member, True)

    def end_drain(self) -> None:
        group, member = self._joined()
        group.set_draining(member, False)

    @asynccontextmanager
    async def draining(self) -> AsyncIterator[None]:
        self.begin_drain()
        try:
            yield
        finally:
            self.end_drain()

    # -- run time -------------------------------------------------------------------

    def option_values(self) -> dict[str, str]:
        values = super().option_values()
        if self.group is not None:
            values.update(self.group.option_values())  # a member shows its group's limits
        return values

    async def apply_option(self, name: str, value: Any) -> None:
        if name not in LIMIT_OPTIONS:
            return
        group, _ = self._joined()
        try:
            group.change(name, value)
        except ThrottleConfigError as e:
            where = f" (throttle group '{group.name}')" if self.group_name else ""
            raise ControlError(f"node '{self.name}'{where}: {e}") from None

    def driver_stats(self) -> dict[str, Any]:
        out = self.member.stats_dict() if self.member is not None else {}
        out["throttle_group"] = self.group_name
        return out
