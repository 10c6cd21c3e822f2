"""Request counters kept by edges (per node) and by the Disk (per exported disk).

Plain integer attributes: an increment must cost nanoseconds, because every
request passes several of these on its way down.
"""

from __future__ import annotations

from typing import Any

KINDS = ("read", "write", "flush", "discard", "write_zeroes", "block_status")


class IoStats:
    """Operations, bytes, errors and time spent, per kind of request."""

    __slots__ = tuple(f"{k}_{f}" for k in KINDS for f in ("ops", "bytes", "errors", "ns")) + (
        "in_flight",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

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
        return out
