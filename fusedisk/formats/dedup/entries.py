"""The two per-block entries of the dedup metadata, and where each one lives.

    map entry   (8 bytes)   logical block -> physical block + 1; 0: reads as zeroes
    pbt entry   (32 bytes)  refcount (u64), content hash (16 bytes), reserved (u64, zero)

Both are read and changed in place in their cached page (cache.py), by the
word `map_location` or `pbt_location` gives: the write path's hot loops do it
per block, where an object per entry would cost about a tenth of a write's CPU
time.  `PBT_STRUCT` spells the entry out; `PBT_DTYPE` is the same entry with
named fields for bulk work over whole pages (the check, the allocator's scan).
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
_DIGEST_LEN = 16
_RESERVED_WORD = 3


def map_location(sb: Superblock, lbn: int) -> tuple[int, int]:
    """(page number, 64-bit word in the page) of logical block `lbn`'s map entry."""
    return sb.map_first_page + lbn // MAP_PER_PAGE, lbn % MAP_PER_PAGE


def pbt_location(sb: Superblock, pbn: int) -> tuple[int, int]:
    """(page number, first 64-bit word) of physical block `pbn`'s table entry.

    The first word is the refcount: `page.q[word]`; the functions below read and
    write the others in place.
    """
    return sb.pbt_first_page + pbn // PBT_PER_PAGE, (pbn % PBT_PER_PAGE) * _WORDS


def pbt_entries(data: bytes | bytearray) -> np.ndarray:
    """Whole pages of the physical block table as an array of entries (a view)."""
    return np.frombuffer(data, dtype=PBT_DTYPE)


def pbt_digest(page: Page, word: int) -> bytes:
    """The content hash of the entry at `word` (from `pbt_location`)."""
    at = word * 8 + _DIGEST_AT
    return bytes(page.data[at : at + _DIGEST_LEN])


def pbt_holds(page: Page, word: int, digest: bytes) -> bool:
    """Whether the entry at `word` holds this hash, or (8 bytes) this hash tag."""
    at = word * 8 + _DIGEST_AT
    return page.data[at : at + len(digest)] == digest


def pbt_fill(page: Page, word: int, digest: bytes) -> None:
    """A block taken into use: its hash, and the reserved word zero (the caller
    sets the refcount)."""
    at = word * 8 + _DIGEST_AT
    page.data[at : at + _DIGEST_LEN] = digest
    page.q[word + _RESERVED_WORD] = 0
