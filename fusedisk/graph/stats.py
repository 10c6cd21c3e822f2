"""Request counters kept by edges (per node) and by the Disk (per exported disk).

Plain integer attributes: an increment must cost nanoseconds, because every
request passes several of these on its way down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("read", "write", "flush", "discard", "write_zeroes", "block_status")


@dataclass(slots=True)
class IoStats:
    """Operations, bytes, errors and time spent, per kind of request."""

    read_ops: int = 0
    read_bytes: int = 0
    read_errors: int = 0
    read_ns: int = 0
    write_ops: int = 0
    write_bytes: int = 0
    write_errors: int = 0
    write_ns: int = 0
    flush_ops: int = 0
    flush_bytes: int = 0
    flush_errors: int = 0
    flush_ns: int = 0
    discard_ops: int = 0
    discard_bytes: int = 0
    discard_errors: int = 0
    discard_ns: int = 0
    write_zeroes_ops: int = 0
    write_zeroes_bytes: int = 0
    write_zeroes_errors: int = 0
    write_zeroes_ns: int = 0
    block_status_ops: int = 0
    block_status_bytes: int = 0
    block_status_errors: int = 0
    block_status_ns: int = 0
    in_flight: int = 0
    #: the most requests this node has had in flight at once (its deepest queue)
    peak_in_flight: int = 0

    def started(self) -> None:
        """A request begins: one more in flight, and perhaps a new peak."""
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in KINDS:
            out[kind] = {
                "ops": getattr(self, f"{kind}_ops"),
                "bytes": getattr(self, f"{kind}_bytes"),
                "errors": getattr(self, f"{kind}_errors"),
                "total_time_ns": getattr(self, f"{kind}_ns"),
            }
        out["in_flight"] = self.in_flight
        out["peak_in_flight"] = self.peak_in_flight
        return out
