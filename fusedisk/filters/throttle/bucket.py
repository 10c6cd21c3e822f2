"""QEMU's I/O throttling algorithm: a leaky bucket used as a meter.

This module is pure arithmetic: it holds no clock and no tasks; the caller
passes the time in (integer nanoseconds).  The `throttle` driver wires it to
trio.  References: QEMU util/throttle.c (throttle_compute_wait,
throttle_account, throttle_is_valid), block/throttle-groups.c, and the
"Throttling" page of QEMU's documentation (docs/throttle.txt).

One bucket per limit.  There are six limits: {iops, bps} x {total, read,
write}.  A read request is checked against iops-total, bps-total, iops-read
and bps-read; a write against the totals and the write limits.  The longest
wait of the four wins.

              request of n bytes, u units (u = 1, or n / iops-size)
                         |
                         v   poured in when the request is let through
          |           |
          |~~~~~~~~~~~|  <- bucket_size: avg / 10            (no -max)
          |           |                 max * max-length      (with -max)
          |###########|  <- level: what was poured and has not leaked yet
          |###########|
          +----   ----+
               | |
               v v   leaks at `avg` units per second, never below 0

A request may go as long as `level <= bucket_size` *before* it is poured in
(the meter is checked, then the request is accounted).  So a fresh bucket lets
one bucketful (plus one request) through at once -- the burst -- and then the
level only falls at `avg`, so requests are spaced by their size / avg.  When
the level is above the bucket's size, the wait is the time the excess takes
to leak: (level - bucket_size) / avg seconds.

Without `-max`, the bucket is a tenth of a second of the average rate, which
absorbs the short bursts guests make (QEMU chose it for the Linux CFQ
scheduler's 100 ms read/write batches).  With `-max` the bucket holds
`max x max-length` units: a guest may run at up to `max` for about
`max-length` seconds (a little more, since the bucket also leaks at `avg`
meanwhile), then falls back to `avg`.

When `max-length` is above 1 a second, smaller bucket enforces the burst rate
itself: it is `max / 10` units big and leaks at `max` per second, so even a
burst never runs faster than `max`:

          main bucket (avg)            burst bucket (max), only if max-length > 1
       |~~~~~~~~~~~~~~~~~~~~|         |~~~~~| max / 10
       | max x max-length   |         |     |
       +---------  ---------+         +-- --+
                 avg/s                  max/s

Changing the configuration empties every bucket (QEMU's throttle_config does
the same), so a new limit takes effect from a clean state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

NS_PER_S = 1_000_000_000

#: QEMU's THROTTLE_VALUE_MAX: no limit, burst or burst volume may exceed it
VALUE_MAX = 1_000_000_000_000_000

KINDS = ("iops", "bps")
SCOPES = ("total", "read", "write")
#: the six average limits, in QEMU's blockdev spelling
LIMITS = tuple(f"{kind}-{scope}" for kind in KINDS for scope in SCOPES)
#: every option the algorithm understands
OPTION_NAMES = (
    *LIMITS,
    *(f"{limit}-max" for limit in LIMITS),
    *(f"{limit}-max-length" for limit in LIMITS),
    "iops-size",
)


class Direction(Enum):
    READ = "read"
    WRITE = "write"


class ThrottleConfigError(ValueError):
    """A limit combination QEMU would refuse; `option` names the culprit."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"option '{option}': {message}")
        self.option = option


@dataclass
class LeakyBucket:
    """One limit: its average rate, optional burst rate and burst length, and its levels.

    `avg` and `max` are units per second (operations or bytes); 0 = none.
    """

    avg: float = 0.0
    max: float = 0.0
    burst_length: int = 1
    level: float = 0.0
    burst_level: float = 0.0

    @property
    def bucket_size(self) -> float:
        """Units that may be poured in before requests wait for `avg`."""
        if not self.max:
            return self.avg / 10
        return self.max * self.burst_length

    def leak(self, delta_ns: int) -> None:
        """Let `delta_ns` nanoseconds of leakage out of both levels."""
        if delta_ns <= 0:
            return
        self.level = max(self.level - self.avg * delta_ns / NS_PER_S, 0.0)
        if self.burst_length > 1:
            self.burst_level = max(self.burst_level - self.max * delta_ns / NS_PER_S, 0.0)

    def wait_ns(self) -> int:
        """How long a request must wait before it may go (0: it may go now)."""
        if not self.avg:
            return 0
        extra = self.level - self.bucket_size
        if extra > 0:
            return int(extra * NS_PER_S / self.avg)
        if self.burst_length > 1:
            extra = self.burst_level - self.max / 10
            if extra > 0:
                return int(extra * NS_PER_S / self.max)
        return 0

    def pour(self, units: float) -> None:
        self.level += units
        if self.burst_length > 1:
            self.burst_level += units


@dataclass(frozen=True)
class ThrottleConfig:
    """A checked set of limits: option name -> value (0 = unlimited), as given."""

    values: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ThrottleConfig:
        """Take the limit options out of `options` (others are ignored) and check them.

        Missing or None values mean 0 (unlimited); `-max-length` defaults to 1.
        Raises ThrottleConfigError naming the offending option.
        """
        values: dict[str, int] = {}
        for name in OPTION_NAMES:
            raw = options.get(name)
            default = 1 if name.endswith("-max-length") else 0
            values[name] = default if raw is None else int(raw)
        config = cls(values)
        config.validate()
        return config

    def get(self, name: str) -> int:
        return self.values.get(name, 1 if name.endswith("-max-length") else 0)

    @property
    def enabled(self) -> bool:
        return any(self.get(limit) for limit in LIMITS)

    def validate(self) -> None:
        """QEMU's throttle_is_valid rules, each failure naming its option."""
        for name in OPTION_NAMES:
            value = self.get(name)
            if value < 0:
                raise ThrottleConfigError(name, f"must be 0 (unlimited) or more, got {value}")
            if value > VALUE_MAX:
                raise ThrottleConfigError(name, f"must be at most {VALUE_MAX}, got {value}")
        for kind in KINDS:
            for suffix in ("", "-max"):
                total = f"{kind}-total{suffix}"
                if not self.get(total):
                    continue
                for scope in ("read", "write"):
                    other = f"{kind}-{scope}{suffix}"
                    if self.get(other):
                        raise ThrottleConfigError(
                            other,
                            f"cannot be set together with '{total}': a total limit and a "
                            "read/write limit of the same kind exclude each other",
                        )
        for limit in LIMITS:
            avg = self.get(limit)
            peak = self.get(f"{limit}-max")
            length = self.get(f"{limit}-max-length")
            if length < 1:
                raise ThrottleConfigError(
                    f"{limit}-max-length",
                    f"the burst length is in seconds, at least 1, got {length}",
                )
            if length > 1 and not peak:
                raise ThrottleConfigError(
                    f"{limit}-max-length", f"a burst length needs a burst rate '{limit}-max'"
                )
            if peak and not avg:
                raise ThrottleConfigError(
                    f"{limit}-max", f"a burst rate needs its average limit '{limit}' to be set"
                )
            if peak and peak < avg:
                raise ThrottleConfigError(
                    f"{limit}-max",
                    f"the burst rate ({peak}) cannot be lower than '{limit}' ({avg})",
                )
            if peak and length > VALUE_MAX // peak:
                raise ThrottleConfigError(
                    f"{limit}-max-length",
                    f"a burst of {peak} for {length} s is too large (at most {VALUE_MAX} units)",
                )
        if self.get("iops-size") and not any(self.get(f"iops-{s}") for s in SCOPES):
            raise ThrottleConfigError(
                "iops-size", "needs an iops limit (iops-total, iops-read or iops-write)"
            )

    def with_value(self, name: str, value: int) -> ThrottleConfig:
        """A checked copy with one option changed (for run-time changes)."""
        if name not in OPTION_NAMES:
            raise ThrottleConfigError(name, "is not a throttle limit")
        config = ThrottleConfig({**self.values, name: int(value)})
        config.validate()
        return config


_CHECKED: dict[Direction, tuple[str, ...]] = {
    Direction.READ: ("bps-total", "iops-total", "bps-read", "iops-read"),
    Direction.WRITE: ("bps-total", "iops-total", "bps-write", "iops-write"),
}


class ThrottleState:
    """The six buckets of one configuration, leaked lazily as time passes.

    `wait_ns(direction, now_ns)` says how long the next request of that
    direction must wait; `account(direction, nbytes)` pours a request in once
    it is let through.  A group of nodes shares one ThrottleState.
    """

    def __init__(self, config: ThrottleConfig, now_ns: int | None = None) -> None:
        self.config = config
        self.buckets: dict[str, LeakyBucket] = {}
        self._previous_leak = now_ns
        self.configure(config, now_ns)

    def configure(self, config: ThrottleConfig, now_ns: int | None = None) -> None:
        """Take a new configuration; every bucket starts empty."""
        self.config = config
        self.buckets = {
            limit: LeakyBucket(
                avg=float(config.get(limit)),
                max=float(config.get(f"{limit}-max")),
                burst_length=config.get(f"{limit}-max-length"),
            )
            for limit in LIMITS
        }
        self._previous_leak = now_ns

    def _leak(self, now_ns: int) -> None:
        if self._previous_leak is None:
            self._previous_leak = now_ns
            return
        delta = now_ns - self._previous_leak
        if delta <= 0:
            return
        self._previous_leak = now_ns
        for bucket in self.buckets.values():
            bucket.leak(delta)

    def wait_ns(self, direction: Direction, now_ns: int) -> int:
        """Nanoseconds the next request in `direction` must wait from `now_ns` (0: go)."""
        self._leak(now_ns)
        return max(self.buckets[name].wait_ns() for name in _CHECKED[direction])

    def units(self, nbytes: int) -> float:
        """Operations a request of `nbytes` counts as (several when above iops-size)."""
        op_size = self.config.get("iops-size")
        if op_size and nbytes > op_size:
            return nbytes / op_size
        return 1.0

    def account(self, direction: Direction, nbytes: int) -> None:
        """Pour a request that is being let through into its buckets."""
        scope = direction.value
        units = self.units(nbytes)
        for limit in ("bps-total", f"bps-{scope}"):
            self.buckets[limit].pour(float(nbytes))
        for limit in ("iops-total", f"iops-{scope}"):
            self.buckets[limit].pour(units)

    def levels(self) -> dict[str, float]:
        """Current level of each limited bucket (for stats)."""
        return {name: round(b.level, 3) for name, b in self.buckets.items() if b.avg}
