"""Dirty bitmaps: which parts of a node were written since a point in time.

A bitmap has one bit per `granularity` bytes of its node (64 KiB by default,
as QEMU).  While it is enabled, every write, write-zeroes and discard that
reaches the node sets the bits it covers: the node's edges mark the node's
`BitmapSet` before they pass the request on (graph/edge.py), so a bitmap at a
qcow2 below luks, throttle or quorum sees every write that reaches that qcow2.
Bits are set *before* the request runs, and stay set if it fails: a bitmap may
over-report, never under-report.

This module is pure memory (numpy, one byte per granule so a range is one
slice assignment); keeping bitmaps in an image is the format's business
(formats/qcow2/bitmaps.py), naming and managing them is bitmap_control.py's.

References: QEMU include/block/dirty-bitmap.h (the operations), and
docs/interop/qcow2.txt "Bitmaps" (the bit order that `to_bytes` produces:
bit k of the bitmap is bit k % 8 of byte k // 8).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fusedisk.errors import ControlError

DEFAULT_GRANULARITY = 64 << 10
MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31
MAX_NAME_BYTES = 1023  # QEMU's limit for a name kept in qcow2
#: granules of one bitmap (one byte of memory each): 128 MiB, 8 PiB at 64 KiB
MAX_GRANULES = 1 << 27


def check_name(name: str, where: str) -> None:
    """Refuse a name QEMU could not store or a control directory could not show."""
    if not name:
        raise ControlError(f"{where}: a bitmap needs a name")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ControlError(f"{where}: bitmap name is longer than {MAX_NAME_BYTES} bytes")
    if any(c in name for c in "/\0\n") or not name.isprintable() or name in (".", ".."):
        raise ControlError(
            f"{where}: bitmap name {name!r} may not contain '/', control characters, "
            "or be '.' or '..'"
        )


def check_granularity(granularity: int, where: str, size: int = 0) -> None:
    """A power of two QEMU accepts, and not so fine that the bitmap would not fit in memory."""
    if size and -(-size // max(granularity, 1)) > MAX_GRANULES:
        raise ControlError(
            f"{where}: granularity {granularity} over {size} bytes makes more than "
            f"{MAX_GRANULES} bits (one byte of memory each); choose a larger granularity"
        )
    if granularity & (granularity - 1) or not MIN_GRANULARITY <= granularity <= MAX_GRANULARITY:
        raise ControlError(
            f"{where}: granularity {granularity} must be a power of two from "
            f"{MIN_GRANULARITY} to {MAX_GRANULARITY}"
        )


class DirtyBitmap:
    """One bitmap over a node of `size` bytes (see the module doc).

    `persistent` bitmaps are kept in the image by a format that can
    (qcow2).  An `inconsistent` one was found marked in use in its image (its
    writer crashed): its bits mean nothing, it is kept only to be removed.
    """

    def __init__(
        self,
        name: str,
        size: int,
        granularity: int = DEFAULT_GRANULARITY,
        *,
        enabled: bool = True,
        persistent: bool = False,
        inconsistent: bool = False,
    ) -> None:
        self.name = name
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.enabled = enabled
        self.persistent = persistent
        self.inconsistent = inconsistent
        #: a backup is using it: it may not be removed, cleared or merged into
        self.busy = False
        self.size = size
        self.bits = np.zeros(self._granules(size), dtype=np.bool_)

    def __repr__(self) -> str:
        return f"<DirtyBitmap {self.name!r} {self.granularity} {self.flags()}>"

    def _granules(self, size: int) -> int:
        return (size + self.granularity - 1) >> self.shift

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        end = min(offset + length, self.size)
        return offset >> self.shift, (end + self.granularity - 1) >> self.shift

    # -- changing bits ---------------------------------------------------------

    def set(self, offset: int, length: int) -> None:
        """Mark [offset, offset+length) dirty (the granules it touches)."""
        if length > 0:
            a, z = self._span(offset, length)
            self.bits[a:z] = True

    def reset(self, offset: int, length: int) -> None:
        """Mark clean the granules that lie wholly inside [offset, offset+length)."""
        a = (offset + self.granularity - 1) >> self.shift
        end = offset + length
        z = self._granules(end) if end >= self.size else end >> self.shift
        if z > a:
            self.bits[a:z] = False

    def clear(self) -> None:
        self.bits[:] = False

    def merge(self, other: DirtyBitmap) -> None:
        """Set every bit `other` has set (granularities may differ)."""
        if other.granularity == self.granularity and len(other.bits) == len(self.bits):
            self.bits |= other.bits
            return
        for offset, length in other.dirty_ranges():
            self.set(offset, length)

    def resize(self, size: int) -> None:
        """Follow the node's new size; a grown part starts clean (as QEMU)."""
        n = self._granules(size)
        if n > len(self.bits):
            self.bits = np.concatenate([self.bits, np.zeros(n - len(self.bits), np.bool_)])
        else:
            self.bits = self.bits[:n].copy()
        self.size = size

    def copy(self, name: str | None = None) -> DirtyBitmap:
        other = DirtyBitmap(name or self.name, self.size, self.granularity, enabled=False)
        other.bits = self.bits.copy()
        return other

    # -- reading bits ----------------------------------------------------------------

    def count(self) -> int:
        """Dirty bytes (the last granule counts only up to the end of the node)."""
        n = int(np.count_nonzero(self.bits))
        if n and self.bits[-1]:
            n_bytes = n << self.shift
            return n_bytes - ((len(self.bits) << self.shift) - self.size)
        return n << self.shift

    def extents(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int, bool]]:
        """(offset, length, dirty) runs covering [offset, offset+length) within the node."""
        end = self.size if length is None else min(self.size, offset + length)
        if end <= offset:
            return []
        a, z = offset >> self.shift, (end + self.granularity - 1) >> self.shift
        part = self.bits[a:z]
        edges = np.flatnonzero(part[1:] != part[:-1]) + 1
        starts = np.concatenate([[0], edges]).tolist()
        stops = [*edges.tolist(), len(part)]
        out = []
        for s, t in zip(starts, stops, strict=True):
            lo = max(offset, (a + s) << self.shift)
            hi = min(end, (a + t) << self.shift)
            out.append((lo, hi - lo, bool(part[s])))
        return out

    def dirty_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        return [(o, n) for o, n, dirty in self.extents(offset, length) if dirty]

    def is_dirty(self, offset: int, length: int) -> bool:
        a, z = self._span(offset, length)
        return bool(self.bits[a:z].any())

    def flags(self) -> list[str]:
        out = ["enabled" if self.enabled else "disabled"]
        if self.persistent:
            out.append("persistent")
        if self.inconsistent:
            out.append("inconsistent")
        if self.busy:
            out.append("busy")
        return out

    # -- the on-disk bit order (qcow2) ---------------------------------------------------

    def to_bytes(self) -> bytes:
        """Bit k is bit k % 8 (least significant first) of byte k // 8."""
        return np.packbits(self.bits, bitorder="little").tobytes()

    def load_bytes(self, data: bytes) -> None:
        raw = np.frombuffer(data, dtype=np.uint8)
        bits = np.unpackbits(raw, bitorder="little")[: len(self.bits)].astype(np.bool_)
        self.bits[: len(bits)] = bits


class BitmapSet:
    """A node's bitmaps by name; `enabled` is what a write must mark (kept current)."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._by_name: dict[str, DirtyBitmap] = {}
        #: the bitmaps a write marks; an edge tests this list, so it stays cheap when empty
        self.enabled: list[DirtyBitmap] = []

    def __iter__(self) -> Iterator[DirtyBitmap]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> DirtyBitmap:
        bitmap = self._by_name.get(name)
        if bitmap is None:
            raise ControlError(f"node '{self.owner}': no bitmap named '{name}'")
        return bitmap

    def add(self, bitmap: DirtyBitmap) -> None:
        if bitmap.name in self._by_name:
            raise ControlError(f"node '{self.owner}': a bitmap named '{bitmap.name}' exists")
        self._by_name[bitmap.name] = bitmap
        self.refresh()

    def remove(self, name: str) -> DirtyBitmap:
        bitmap = self._by_name.pop(name)
        self.refresh()
        return bitmap

    def discard(self, name: str) -> None:
        self._by_name.pop(name, None)
        self.refresh()

    def refresh(self) -> None:
        """Recompute `enabled` after a bitmap was enabled, disabled, added or removed."""
        self.enabled = [b for b in self._by_name.values() if b.enabled and not b.inconsistent]

    def mark(self, offset: int, length: int) -> None:
        for bitmap in self.enabled:
            bitmap.set(offset, length)

    def resize(self, size: int) -> None:
        for bitmap in self._by_name.values():
            bitmap.resize(size)

    def persistent(self) -> list[DirtyBitmap]:
        return [b for b in self._by_name.values() if b.persistent]
