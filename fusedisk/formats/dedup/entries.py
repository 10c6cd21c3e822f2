"""The two per-block entries of the dedup metadata, and where each one lives.

    map entry   (8 bytes)   logical block -> physical block + 1; 0: reads as zeroes
    pbt entry   (32 bytes)  refcount (u64), content hash (16 bytes), reserved (u64, zero)

Both are read and changed in place in their cached page (cache.py), so a
`PbtEntry` is a view of 32 bytes of a page, not a copy; `PBT_DTYPE` is the same
entry for bulk work over whole pages (the check, the allocator's scan).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from fusedisk.formats.dedup.layout import MAP_PER_PAGE, PBT_ENTRY, PBT_PER_PAGE, Superblock

if TYPE_CHECKING:
    from fusedisk.formats.dedup.cache import Page

#: refcount, content hash, reserved: the physical block table entry, byte by byte
PBT_STRUCT = struct.Struct("<Q16sQ")
PBT_DTYPE = np.dtype([("refcount", "<u8"), ("digest", "V16"), ("reserved", "<u8")])
assert PBT_STRUCT.size == PBT_DTYPE.itemsize == PBT_ENTRY

_WORDS = PBT_ENTRY // 8  # 64-bit words per entry
_DIGEST_AT = 8  # byte offset of the hash in the entry
_DIGEST_END = _DIGEST_AT + 16
_RESERVED_WORD = 3


def map_location(sb: Superblock, lbn: int) -> tuple[int, int]:
    """(page number, 64-bit word in the page) of logical block `lbn`'s map entry."""
    return sb.map_first_page + lbn // MAP_PER_PAGE, lbn % MAP_PER_PAGE


def pbt_location(sb: Superblock, pbn: int) -> tuple[int, int]:
    """(page number, first 64-bit word) of physical block `pbn`'s table entry.

    The first word is the refcount (see `PbtEntry` for the others).
    """
    return sb.pbt_first_page + pbn // PBT_PER_PAGE, (pbn % PBT_PER_PAGE) * _WORDS


def pbt_entries(data: bytes | bytearray) -> np.ndarray:
    """Whole pages of the physical block table as an array of entries (a view)."""
    return np.frombuffer(data, dtype=PBT_DTYPE)


class PbtEntry:
    """One physical block table entry, in place in its page (`word`: its first word)."""

    __slots__ = ("page", "word")

    def __init__(self, page: Page, word: int) -> None:
        self.page = page
        self.word = word

    @property
    def refcount(self) -> int:
        return int(self.page.q[self.word])

    @refcount.setter
    def refcount(self, value: int) -> None:
        self.page.q[self.word] = value

    @property
    def digest(self) -> bytes:
        at = self.word * 8
        return bytes(self.page.data[at + _DIGEST_AT : at + _DIGEST_END])

    def digest_is(self, digest: bytes) -> bool:
        """Whether the entry holds this hash, or (8 bytes) this hash tag."""
        at = self.word * 8 + _DIGEST_AT
        return self.page.data[at : at + len(digest)] == digest

    def fill(self, digest: bytes) -> None:
        """A block taken into use: its hash, and the reserved word zero."""
        at = self.word * 8
        self.page.data[at + _DIGEST_AT : at + _DIGEST_END] = digest
        self.page.q[self.word + _RESERVED_WORD] = 0
