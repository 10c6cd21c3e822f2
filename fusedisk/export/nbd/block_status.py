"""NBD_CMD_BLOCK_STATUS: the disk's extents, walked in slices that never starve the others.

A disk's block status is computed by a walk over its mapping (qcow2's L2
tables, cluster by cluster): ~30-60 µs per extent on a fragmented qcow2 on
these machines, so a whole 4 GiB request on such an image held the event
loop for seconds, and every other disk with it.  So the walk here:

- asks the disk for a slice at a time, sized so a slice yields a few hundred
  extents at most (it grows over holes and shrinks over fragments), and lets
  the loop run between slices;
- runs one slice at a time in the whole daemon (`walks`, a lock the daemon's
  connections share), so a storm of requests waits in line instead of
  filling every pass of the scheduler;
- stops early: at the first extent with NBD_CMD_FLAG_REQ_ONE (as soon as a
  second one starts), and otherwise at MAX_EXTENTS or MAX_SPAN per reply --
  the protocol lets a reply cover less than was asked, and the client asks
  again from where it ends (qemu-nbd caps its replies too).
"""

from __future__ import annotations

import trio

from fusedisk.export.nbd import protocol as p
from fusedisk.graph.disk import Disk
from fusedisk.graph.extents import Status

#: extents per reply at most
MAX_EXTENTS = 4096
#: bytes one reply may describe at most
MAX_SPAN = 1 << 32
#: the first slice, and the bounds of later ones
FIRST_SLICE = 1 << 20
MIN_SLICE = 64 << 10
MAX_SLICE = 1 << 30
#: the extents a slice aims at (~0.5 ms of walking; 64 and 128 let a 4 KiB read of
#: another disk wait 12-13 ms at the median during a storm, 16 about 7 ms)
SLICE_EXTENTS = 16


def _flags(status: Status) -> int:
    flags = 0 if status & Status.DATA else p.STATE_HOLE
    if status & Status.ZERO:
        flags |= p.STATE_ZERO
    return flags


async def walk(
    disk: Disk, offset: int, length: int, one: bool, walks: trio.Lock
) -> list[tuple[int, int]]:
    """(length, base:allocation flags) pairs from `offset`, as few and as short as allowed."""
    pairs: list[tuple[int, int]] = []
    pos = offset
    end = offset + min(length, MAX_SPAN)
    size = FIRST_SLICE
    while pos < end:
        async with walks:
            extents = await disk.block_status(pos, min(size, end - pos))
        if not extents:
            break
        for ext in extents:
            flags = _flags(ext.status)
            if pairs and pairs[-1][1] == flags:
                pairs[-1] = (pairs[-1][0] + ext.length, flags)
            else:
                pairs.append((ext.length, flags))
        pos = extents[-1].end
        if (one and len(pairs) > 1) or len(pairs) >= MAX_EXTENTS:
            break
        # the next slice: about SLICE_EXTENTS extents at this one's density
        size = size * SLICE_EXTENTS // max(len(extents), 1)
        size = max(MIN_SLICE, min(MAX_SLICE, size))
        await trio.lowlevel.checkpoint()
    return pairs[:1] if one else pairs[:MAX_EXTENTS]
