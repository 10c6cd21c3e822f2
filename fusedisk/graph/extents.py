"""Block status: what a range of a node holds, as QEMU's block layer reports it.

Copy-on-read, stream, commit and sparse copies all ask the same question of a
range: is it data or zeroes, and is it defined by this node or does it come
from below (its backing)?  Extents answer it; they are contiguous and cover
exactly the range asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag


class Status(IntFlag):
    """DATA: stored bytes; ZERO: reads as zeroes; ALLOCATED: defined in this node."""

    NONE = 0
    DATA = 1
    ZERO = 2
    ALLOCATED = 4


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    status: Status

    @property
    def end(self) -> int:
        return self.offset + self.length

    def shifted(self, delta: int) -> Extent:
        return Extent(self.offset + delta, self.length, self.status)


def merge_extents(extents: list[Extent]) -> list[Extent]:
    """Join neighbours with the same status, so callers see the fewest runs."""
    out: list[Extent] = []
    for ext in extents:
        if ext.length <= 0:
            continue
        if out and out[-1].status == ext.status and out[-1].end == ext.offset:
            out[-1] = Extent(out[-1].offset, out[-1].length + ext.length, ext.status)
        else:
            out.append(ext)
    return out


def clip_extents(extents: list[Extent], offset: int, length: int) -> list[Extent]:
    """The part of `extents` inside [offset, offset+length)."""
    end = offset + length
    out = []
    for ext in extents:
        start = max(ext.offset, offset)
        stop = min(ext.end, end)
        if start < stop:
            out.append(Extent(start, stop - start, ext.status))
    return out
