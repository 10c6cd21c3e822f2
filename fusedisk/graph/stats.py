"""Request accounting for edges (per node) and the Disk (per exported disk).

One helper instead of counters written out at every call site, as QEMU's
block/accounting.c has `block_acct_start/done/failed`:

    t0 = stats.start()
    try:
        data = await node.read(offset, length)
    except BaseException as e:
        stats.failed(stats.read, e)
        raise
    stats.done(stats.read, length, t0)

Plain integer attributes and slots: an update must cost well under a
microsecond, because every request passes several of these on its way down.
A cancelled request leaves the in-flight count but is no error.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any

KINDS = ("read", "write", "flush", "discard", "write_zeroes", "block_status")


@dataclass(slots=True)
class KindStats:
    """One kind of request: how many, how many bytes, how many failed, time spent."""

    ops: int = 0
    bytes: int = 0
    errors: int = 0
    ns: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"ops": self.ops, "bytes": self.bytes, "errors": self.errors,
                "total_time_ns": self.ns}  # fmt: skip


class IoStats:
    """Per kind of request (`stats.read`, `stats.write`...), and what is in flight."""

    __slots__ = ("block_status", "discard", "flush", "in_flight", "peak_in_flight", "read",
                 "write", "write_zeroes")  # fmt: skip

    def __init__(self) -> None:
        self.read = KindStats()
        self.write = KindStats()
        self.flush = KindStats()
        self.discard = KindStats()
        self.write_zeroes = KindStats()
        self.block_status = KindStats()
        self.in_flight = 0
        #: the most requests this node has had in flight at once (its deepest queue)
        self.peak_in_flight = 0

    def start(self) -> int:
        """A request begins: one more in flight (perhaps a new peak); its start time."""
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight
        return perf_counter_ns()

    def done(self, kind: KindStats, nbytes: int, t0: int) -> None:
        """The request started at `t0` succeeded."""
        self.in_flight -= 1
        kind.ops += 1
        kind.bytes += nbytes
        kind.ns += perf_counter_ns() - t0

    def failed(self, kind: KindStats, error: BaseException) -> None:
        """The request raised `error`: an error, unless it was a cancellation."""
        self.in_flight -= 1
        if isinstance(error, Exception):
            kind.errors += 1

    def write_errors(self) -> int:
        """Failed requests that change or persist data (write, write-zeroes, discard,
        flush): a copy's target that has any may be missing data."""
        kinds = (self.write, self.write_zeroes, self.discard, self.flush)
        return sum(kind.errors for kind in kinds)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {kind: getattr(self, kind).as_dict() for kind in KINDS}
        out["in_flight"] = self.in_flight
        out["peak_in_flight"] = self.peak_in_flight
        return out
