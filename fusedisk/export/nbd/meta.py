"""Meta contexts: what NBD_CMD_BLOCK_STATUS describes, as qemu-nbd names them.

    base:allocation            holes and zeroes (the disk's block status), id 1
    qemu:dirty-bitmap:NAME     one per dirty bitmap of the disk (graph/bitmap_control.py
                               `disk_bitmaps`); flag 1 = dirty; ids 2, 3, ... in the
                               order the client asked for them

References: NBD docs/proto.md ("Metadata querying"), QEMU docs/interop/nbd.txt
(the `qemu:` namespace: `qemu:dirty-bitmap:NAME`; listing `qemu:` or
`qemu:dirty-bitmap:` lists every bitmap).  A bitmap is looked up by name at each
request: one removed since the negotiation gets EINVAL.
"""

from __future__ import annotations

from fusedisk.graph.bitmap_control import disk_bitmaps
from fusedisk.graph.disk import Disk

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP = "qemu:dirty-bitmap:"
STATE_DIRTY = 1


def _all(disk: Disk) -> list[str]:
    bitmaps = disk_bitmaps(disk)
    names = [] if bitmaps is None else [b.name for b in bitmaps if not b.inconsistent]
    return [BASE_ALLOCATION, *(DIRTY_BITMAP + n for n in names)]


def select(disk: Disk, queries: tuple[str, ...], listing: bool) -> list[str]:
    """The contexts a LIST (`listing`) or SET of `queries` names, in the order asked."""
    offered = _all(disk)
    if listing and not queries:
        return offered
    out: list[str] = []
    for q in queries:
        if listing and q in ("base:", "base"):
            found = [BASE_ALLOCATION]
        elif listing and q in ("qemu:", DIRTY_BITMAP):
            found = [c for c in offered if c.startswith(DIRTY_BITMAP)]
        else:
            found = [q] if q in offered else []
        out.extend(c for c in found if c not in out)
    return out


def bitmap_name(context: str) -> str | None:
    return context[len(DIRTY_BITMAP) :] if context.startswith(DIRTY_BITMAP) else None


def dirty_extents(disk: Disk, name: str, offset: int, length: int) -> list[tuple[int, int]] | None:
    """(length, flags) pairs of bitmap `name` over the range; None if it is gone."""
    bitmaps = disk_bitmaps(disk)
    if bitmaps is None or name not in bitmaps:
        return None
    bitmap = bitmaps.get(name)
    end = min(offset + length, bitmap.size)
    pairs = [
        (n, STATE_DIRTY if dirty else 0) for _, n, dirty in bitmap.extents(offset, end - offset)
    ]
    if end < offset + length:  # past the bitmap (the disk grew): clean
        pairs.append((offset + length - end, 0))
    return pairs
