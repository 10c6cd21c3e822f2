"""The content index: which physical block holds data with a given hash.

A hash table of fixed-size buckets in the `metadata` index region, read
through the bounded page cache, so memory does not depend on the disk size
and opening reads none of it.  Each 4 KiB bucket holds 255 entries of
(tag, physical block + 1); the bucket is chosen by hash bytes 8..16 and the
tag is hash bytes 0..8.  A bucket that is full drops an entry to make room.

The index is advisory, like dm-vdo's: it only proposes a candidate block.
The physical block table (journaled) holds each block's full hash and
refcount, and the driver accepts a candidate only if its refcount is above
zero, its full hash matches and (with `verify`) its bytes are equal.  So the
index is written back lazily and never journaled: after a crash an entry may
be missing (a duplicate is stored twice) or stale (rejected), never wrong.
A bucket whose checksum fails (a write torn by a power cut) reads as empty.

`content_hash` is the hash function; tests replace `ContentIndex.hash`
(test-only hook) to force collisions.
"""

from __future__ import annotations

import logging
import struct

import numpy as np
import xxhash

from fusedisk.errors import CorruptImage
from fusedisk.formats.dedup.cache import Page, PageCache
from fusedisk.formats.dedup.layout import (
    BUCKET_ENTRY,
    BUCKET_HEADER,
    BUCKET_SLOTS,
    PAGE,
    Superblock,
    checksum,
)

log = logging.getLogger("fusedisk")

#: a bucket proposes at most this many candidates for one hash
MAX_CANDIDATES = 16
_ZERO_PAGE = bytes(PAGE)


def content_hash(block: bytes | memoryview) -> bytes:
    """xxh3_128 of a block, 16 bytes (not cryptographic: see `verify`)."""
    return xxhash.xxh3_128_digest(block)


class ContentIndex:
    """Lookup, insert and remove (hash -> physical block) in the bucket pages."""

    #: TEST-ONLY HOOK: tests monkeypatch this (e.g. a constant) to force hash collisions.
    #: Every image must be written and read with the same function.
    hash = staticmethod(content_hash)

    def __init__(self, name: str, cache: PageCache, sb: Superblock) -> None:
        self.name = name
        self.cache = cache
        self.first = sb.index_first_page
        self.buckets = sb.index_buckets
        self.physical_blocks = sb.physical_blocks
        self.torn_buckets = 0

    def owns(self, pno: int) -> bool:
        return self.first <= pno < self.first + self.buckets

    def bucket_page(self, digest: bytes) -> int:
        """The page of the bucket a hash lives in (its tag is the hash's first 8 bytes)."""
        return self.first + int.from_bytes(digest[8:16], "little") % self.buckets

    # -- bucket pages -------------------------------------------------------------

    def validate(self, pno: int, data: bytearray) -> None:
        """Check a bucket as it is loaded: a torn one is emptied, a wrong one refused."""
        if data == _ZERO_PAGE:
            return
        (stored,) = struct.unpack_from("<Q", data, 0)
        if stored != checksum(memoryview(data)[8:]):
            log.warning(
                "node '%s': index bucket %d has a bad checksum (a torn write?); "
                "it is treated as empty (only deduplication chances are lost)",
                self.name,
                pno - self.first,
            )
            self.torn_buckets += 1
            data[:] = bytes(PAGE)
            return
        problem = bucket_problem(data, self.physical_blocks)
        if problem:
            raise CorruptImage(f"node '{self.name}': index bucket {pno - self.first} {problem}")

    @staticmethod
    def seal(data: bytearray) -> bytes:
        """The bucket's bytes with its checksum set, ready to be written back."""
        struct.pack_into("<Q", data, 0, checksum(memoryview(data)[8:]))
        return bytes(data)

    # -- operations ---------------------------------------------------------------
    # Words of a bucket page: 0 checksum, 1 entry count (low 32 bits), then per slot
    # s: 2+2s tag, 3+2s ref.  The used slots are always the first `count` ones.

    @staticmethod
    def _find(page: Page, tag: bytes) -> list[int]:
        """Slots whose tag is `tag`."""
        data = page.data
        end = BUCKET_HEADER + BUCKET_ENTRY * (page.q[1] & 0xFFFFFFFF)
        found = []
        pos = data.find(tag, BUCKET_HEADER, end)
        while pos != -1:
            if (pos - BUCKET_HEADER) % BUCKET_ENTRY == 0:
                found.append((pos - BUCKET_HEADER) // BUCKET_ENTRY)
            pos = data.find(tag, pos + 1, end)
        return found

    async def lookup(self, digest: bytes) -> list[int]:
        """Physical blocks that may hold data with this hash (to be checked by the caller)."""
        pno = self.bucket_page(digest)
        page = await self.cache.get(pno)
        q = page.q
        return [q[3 + 2 * s] - 1 for s in self._find(page, digest[:8])[:MAX_CANDIDATES]]

    async def insert(self, digest: bytes, pbn: int) -> None:
        pno = self.bucket_page(digest)
        page = await self.cache.get(pno)
        q = page.q
        tag = digest[:8]
        if any(q[3 + 2 * s] == pbn + 1 for s in self._find(page, tag)):
            return
        used = q[1] & 0xFFFFFFFF
        if used < BUCKET_SLOTS:
            slot = used
            q[1] = used + 1
        else:  # full: replace an entry chosen by the hash
            slot = int.from_bytes(tag, "little") % BUCKET_SLOTS
        at = BUCKET_HEADER + BUCKET_ENTRY * slot
        page.data[at : at + 8] = tag
        q[3 + 2 * slot] = pbn + 1
        self.cache.mark_home_dirty(page)

    async def remove(self, digest: bytes, pbn: int) -> None:
        pno = self.bucket_page(digest)
        page = await self.cache.get(pno)
        q = page.q
        for slot in reversed(self._find(page, digest[:8])):
            if q[3 + 2 * slot] != pbn + 1:
                continue
            last = (q[1] & 0xFFFFFFFF) - 1  # move the last entry into the hole
            q[2 + 2 * slot] = q[2 + 2 * last]
            q[3 + 2 * slot] = q[3 + 2 * last]
            q[2 + 2 * last] = 0
            q[3 + 2 * last] = 0
            q[1] = last
            self.cache.mark_home_dirty(page)


def bucket_problem(data: bytes | bytearray, physical_blocks: int) -> str | None:
    """What is wrong with a bucket whose checksum is good, or None."""
    words = np.frombuffer(data, dtype="<u8")
    used = int(words[1]) & 0xFFFFFFFF
    refs = words[3::2]
    if used > BUCKET_SLOTS or not refs[:used].all() or words[2 + 2 * used :].any():
        return f"is inconsistent: it counts {used} entries, which do not fill its first slots"
    bad = np.flatnonzero(refs > physical_blocks)
    if bad.size:
        slot = int(bad[0])
        return (
            f"slot {slot} points to physical block {int(refs[slot]) - 1}, past the "
            f"{physical_blocks} physical blocks of the image"
        )
    return None


def bucket_entries(data: bytes | bytearray) -> list[tuple[int, bytes, int]]:
    """(slot, tag, physical block) of every used entry of a bucket, for the checker."""
    out = []
    q = memoryview(data).cast("Q")
    for slot in range(BUCKET_SLOTS):
        at = BUCKET_HEADER + slot * BUCKET_ENTRY
        ref = q[at // 8 + 1]
        if ref:
            out.append((slot, bytes(data[at : at + 8]), ref - 1))
    return out


def bucket_checksum_ok(data: bytes | bytearray) -> bool:
    if data == _ZERO_PAGE:
        return True
    return bool(struct.unpack_from("<Q", data, 0)[0] == checksum(memoryview(data)[8:]))
