"""A throttle group: one budget shared fairly by its members (QEMU's throttle-groups.c).

Every throttle node is a member of exactly one ThrottleGroup: the named
`[throttle-groups.NAME]` of the spec (shared with the other nodes that name
it, across disks) or a private group built from the node's inline limits.
A group has one budget (one ThrottleState, bucket.py) and, per direction
(read, write), one queue per member.  When requests wait, the next one to go
is taken from the member after the one that was last served, among those with
waiting requests -- QEMU's round-robin in block/throttle-groups.c -- so a busy
member cannot starve a quiet one.  Requests never overtake queued requests of
the same direction in the group.

While a member is draining, its queued and new requests pass at once (and are
still accounted), as QEMU disables I/O limits during a drain.  A run-time
change of a limit applies to every member at once and wakes the next waiter.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import trio

from fusedisk.errors import ControlError
from fusedisk.filters.throttle.bucket import (
    NS_PER_S,
    OPTION_NAMES,
    Direction,
    ThrottleConfig,
    ThrottleConfigError,
    ThrottleState,
)
from fusedisk.graph.options import Option, OptionValueError

_HELP = {
    "iops": "operations per second",
    "bps": "bytes per second",
}


def _limit_options() -> dict[str, Option]:
    options: list[Option] = []
    for kind in ("iops", "bps"):
        value_kind = "int" if kind == "iops" else "size"
        for scope in ("total", "read", "write"):
            name = f"{kind}-{scope}"
            what = {"total": "all requests", "read": "reads", "write": "writes"}[scope]
            options.append(
                Option(
                    name,
                    value_kind,
                    0,
                    f"limit of {what} in {_HELP[kind]} (0: none)",
                    minimum=0,
                    runtime=True,
                )
            )
            options.append(
                Option(
                    f"{name}-max",
                    value_kind,
                    0,
                    f"burst rate of {what} in {_HELP[kind]} (needs {name}; 0: none)",
                    minimum=0,
                    runtime=True,
                )
            )
            options.append(
                Option(
                    f"{name}-max-length",
                    "int",
                    1,
                    f"how long a burst at {name}-max may last, in seconds",
                    minimum=1,
                    runtime=True,
                )
            )
    options.append(
        Option(
            "iops-size",
            "size",
            0,
            "a request larger than this counts as size/iops-size operations (0: always one)",
            minimum=0,
            runtime=True,
        )
    )
    table = {o.name: o for o in options}
    assert set(table) == set(OPTION_NAMES)
    return table


#: the limit options, the same on a throttle node and in [throttle-groups.NAME]
LIMIT_OPTIONS: Mapping[str, Option] = _limit_options()


def _now_ns() -> int:
    return round(trio.current_time() * NS_PER_S)


class _Waiter:
    """One request waiting for its turn."""

    __slots__ = ("direction", "member", "nbytes", "released", "wake")

    def __init__(self, member: Member, direction: Direction, nbytes: int) -> None:
        self.member = member
        self.direction = direction
        self.nbytes = nbytes
        self.released = False
        self.wake = trio.Event()


class Member:
    """A throttle node's place in its group: its queues, drain state and counters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.queues: dict[Direction, deque[_Waiter]] = {d: deque() for d in Direction}
        self.draining = 0
        self.requests = 0
        self.requests_delayed = 0
        self.throttled_ns = 0

    def stats_dict(self) -> dict[str, Any]:
        return {
            "queued": {d.value: len(q) for d, q in self.queues.items()},
            "requests": self.requests,
            "requests_delayed": self.requests_delayed,
            "throttled_time_ns": self.throttled_ns,
            "draining": self.draining > 0,
        }


class ThrottleGroup:
    """One budget shared fairly by its members (the SharedObject of the mount).

    `label` names it in messages: "throttle group 'g0'" or "node 'thr'".
    """

    def __init__(self, name: str, options: Mapping[str, Any], label: str | None = None) -> None:
        self.name = name
        self.label = label or f"throttle group '{name}'"
        self.state = ThrottleState(ThrottleConfig.from_options(options))
        self.members: list[Member] = []
        self._tokens: dict[Direction, Member | None] = {d: None for d in Direction}
        self._pending: dict[Direction, int] = {d: 0 for d in Direction}
        self.requests = 0
        self.requests_delayed = 0
        self.throttled_ns = 0

    def __repr__(self) -> str:
        return f"<ThrottleGroup {self.name!r} members={[m.name for m in self.members]}>"

    @property
    def config(self) -> ThrottleConfig:
        return self.state.config

    # -- membership -------------------------------------------------------------

    def join(self, name: str) -> Member:
        member = Member(name)
        self.members.append(member)
        return member

    def leave(self, member: Member) -> None:
        if member not in self.members:
            return
        member.draining += 1  # anything still queued goes now
        self._wake_member(member)
        self.members.remove(member)
        for d, token in self._tokens.items():
            if token is member:
                self._tokens[d] = None

    # -- configuration ------------------------------------------------------------

    def change(self, name: str, value: int) -> None:
        """Set one limit for every member at once; raises ThrottleConfigError."""
        config = self.state.config.with_value(name, value)
        self.state.configure(config, _now_ns())
        for d in Direction:
            self._kick(d)

    def option_values(self) -> dict[str, str]:
        return {name: spec.render(self.config.get(name)) for name, spec in LIMIT_OPTIONS.items()}

    def runtime_options(self) -> set[str]:
        return set(LIMIT_OPTIONS)

    async def set_option(self, name: str, text: str) -> None:
        spec = LIMIT_OPTIONS.get(name)
        if spec is None:
            raise ControlError(f"{self.label}: there is no option '{name}'")
        try:
            value = spec.parse(text.strip())
        except OptionValueError as e:
            raise ControlError(f"{self.label}: option '{name}': {e}") from None
        try:
            self.change(name, value)
        except ThrottleConfigError as e:
            raise ControlError(f"{self.label}: {e}") from None

    def stats_dict(self) -> dict[str, Any]:
        return {
            "members": [m.name for m in self.members],
            "queued": {d.value: self._pending[d] for d in Direction},
            "requests": self.requests,
            "requests_delayed": self.requests_delayed,
            "throttled_time_ns": self.throttled_ns,
            "levels": self.state.levels(),
        }

    # -- draining -----------------------------------------------------------------

    def set_draining(self, member: Member, draining: bool) -> None:
        if draining:
            member.draining += 1
            self._wake_member(member)
        elif member.draining > 0:
            member.draining -= 1

    def _wake_member(self, member: Member) -> None:
        for queue in member.queues.values():
            for waiter in queue:
                waiter.wake.set()

    # -- the request path -----------------------------------------------------------

    async def intercept(self, member: Member, direction: Direction, nbytes: int) -> None:
        """Return when a request of `nbytes` in `direction` may go; it is then accounted.

        On cancellation the request leaves the queue unaccounted and the next
        one is considered.
        """
        if member.draining:
            self._account(member, direction, nbytes)
            return
        if not self._pending[direction] and not self.state.wait_ns(direction, _now_ns()):
            self._account(member, direction, nbytes)
            self._tokens[direction] = member
            return
        waiter = _Waiter(member, direction, nbytes)
        member.queues[direction].append(waiter)
        self._pending[direction] += 1
        member.requests_delayed += 1
        self.requests_delayed += 1
        start = _now_ns()
        try:
            await self._wait_turn(waiter)
        finally:
            if not waiter.released:
                self._dequeue(waiter)
                self._kick(direction)
            waited = _now_ns() - start
            member.throttled_ns += waited
            self.throttled_ns += waited

    async def _wait_turn(self, waiter: _Waiter) -> None:
        direction = waiter.direction
        while True:
            waiter.wake = trio.Event()
            if waiter.member.draining:
                self._release(waiter)
                return
            if self._next_up(direction) is waiter:
                now = _now_ns()
                wait = self.state.wait_ns(direction, now)
                if not wait:
                    self._release(waiter)
                    return
                with trio.move_on_at((now + wait) / NS_PER_S):
                    await waiter.wake.wait()
            else:
                await waiter.wake.wait()

    def _next_up(self, direction: Direction) -> _Waiter | None:
        """The head of the queue of the first member after the last served one."""
        if not self._pending[direction]:
            return None
        members = self.members
        token = self._tokens[direction]
        start = members.index(token) + 1 if token in members else 0
        for i in range(len(members)):
            queue = members[(start + i) % len(members)].queues[direction]
            if queue:
                return queue[0]
        return None

    def _kick(self, direction: Direction) -> None:
        waiter = self._next_up(direction)
        if waiter is not None:
            waiter.wake.set()

    def _dequeue(self, waiter: _Waiter) -> None:
        waiter.member.queues[waiter.direction].remove(waiter)
        self._pending[waiter.direction] -= 1

    def _release(self, waiter: _Waiter) -> None:
        self._dequeue(waiter)
        waiter.released = True
        self._account(waiter.member, waiter.direction, waiter.nbytes)
        self._tokens[waiter.direction] = waiter.member
        self._kick(waiter.direction)

    def _account(self, member: Member, direction: Direction, nbytes: int) -> None:
        self.state.account(direction, nbytes)
        member.requests += 1
        self.requests += 1
