"""The write pipeline of a dedup volume: hash, share or allocate, write, remap.

A write, per chunk of at most 256 blocks (so that the metadata pages one chunk
changes always fit in one journal transaction):

    A  hash each block (all-zero blocks are never stored); ask the index for a
       block with the same hash; accept it if its refcount is above zero, its
       full hash matches and, with `verify`, its bytes are equal (it is
       pinned from then on, so it cannot be reused under us)
    B  reserve free physical blocks for the others
    C  write them to `data`, in runs of consecutive blocks
    D  remap (remap.py): point the map entries at their blocks, raise the new
       blocks' refcounts and lower the old ones', atomically

Zeroing and discarding are phase D alone, with every target None.  Changes
are committed (commit.py) whenever the pages changed since the last commit
reach the budget, so memory stays bounded without flushes.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fusedisk.errors import IOFailure
from fusedisk.formats.dedup.commit import Committer
from fusedisk.formats.dedup.entries import pbt_holds, pbt_location
from fusedisk.formats.dedup.index import ContentIndex
from fusedisk.formats.dedup.layout import Superblock
from fusedisk.formats.dedup.remap import Remapper
from fusedisk.formats.dedup.store import read_physical


class WritePipeline:
    """Writes, zeroes and discards of one open volume (see the module doc)."""

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        sb: Superblock,
        index: ContentIndex,
        committer: Committer,
    ) -> None:
        """`options` is the node's own dict: run-time changes (verify) show at once.
        The stores, cache, allocator, counters and lock are the committer's."""
        self.name = name
        self.options = options
        self.sb = sb
        self.index = index
        self.committer = committer
        self.dt = committer.dt
        self.cache = committer.cache
        self.alloc = committer.alloc
        self.counters = committer.counters
        self._meta_lock = committer.meta_lock
        self._bs = sb.block_size
        max_txn = self.committer.journal.max_txn_pages
        self.chunk = max(1, min(256, max_txn // 8))
        self.remap = Remapper(name, sb, committer, max_txn - (3 * self.chunk + 4))
        self.zero_blocks_written = 0

    async def write(self, offset: int, data: bytes) -> None:
        self.committer.check_writable()
        bs = self._bs
        n = len(data) // bs
        view = memoryview(data)
        rows = np.frombuffer(data, dtype=np.uint64).reshape(n, bs // 8)
        nonzero: list[bool] = np.any(rows, axis=1).tolist()
        first = offset // bs
        for start in range(0, n, self.chunk):
            k = min(self.chunk, n - start)
            await self._write_chunk(
                first + start, view[start * bs : (start + k) * bs], nonzero[start : start + k]
            )

    async def _write_chunk(self, first: int, view: memoryview, nonzero: list[bool]) -> None:
        bs = self._bs
        n = len(nonzero)
        digests: list[bytes | None] = [None] * n
        targets: list[int | None] = [None] * n
        first_with: dict[bytes, int] = {}
        same_as: dict[int, int] = {}
        to_find: list[int] = []
        hash_block = ContentIndex.hash
        for i in range(n):
            if not nonzero[i]:
                self.zero_blocks_written += 1
                continue
            block = view[i * bs : (i + 1) * bs]
            digest = hash_block(block)
            digests[i] = digest
            j = first_with.get(digest)
            if j is None:
                first_with[digest] = i
                to_find.append(i)
            elif block.tobytes() == view[j * bs : (j + 1) * bs].tobytes():
                same_as[i] = j
            else:
                self.counters.verified_collisions += 1
                to_find.append(i)
        pinned: list[int] = []
        reserved: list[int] = []
        fresh: dict[int, int] = {}
        try:
            await self._find_duplicates(to_find, digests, view, targets, pinned)
            unmatched = [i for i in to_find if targets[i] is None]
            if unmatched:
                reserved = await self._allocate(len(unmatched))
                for i, pbn in zip(unmatched, reserved, strict=True):
                    fresh[i] = pbn
                    targets[i] = pbn
                await self._write_data(fresh, view)
            for i, j in same_as.items():
                self.counters.index_hits += 1
                targets[i] = targets[j]
            freed = await self.remap.apply(first, targets, digests, set(reserved))
        finally:
            for pbn in pinned:
                self.alloc.unpin(pbn)
            self.alloc.release(reserved)  # those not consumed (on error)
        for i, pbn in fresh.items():
            stored = digests[i]
            assert stored is not None
            await self.index.insert(stored, pbn)
        await self._forget(freed)

    async def _find_duplicates(
        self,
        to_find: list[int],
        digests: list[bytes | None],
        view: memoryview,
        targets: list[int | None],
        pinned: list[int],
    ) -> None:
        """Point `targets[i]` at a stored block with block i's bytes, where there is one.

        Each block found is pinned (and listed in `pinned`).  With `verify`, the
        candidates are compared byte for byte first (`_verify`).
        """
        found: dict[int, int] = {}
        for i in to_find:
            digest = digests[i]
            assert digest is not None
            pbn = await self._candidate(digest, ())
            if pbn is not None:
                pinned.append(pbn)
                found[i] = pbn
        if self.options["verify"] and found:
            await self._verify(found, digests, view, pinned)
        for i, pbn in found.items():
            targets[i] = pbn
        self.counters.index_hits += len(found)

    async def _verify(
        self,
        found: dict[int, int],
        digests: list[bytes | None],
        view: memoryview,
        pinned: list[int],
    ) -> None:
        """Keep in `found` only the blocks whose bytes are equal, looking further on a
        collision.  The candidates are read in runs of consecutive blocks (a
        duplicated stream usually maps to one)."""
        bs = self._bs
        order = sorted(found.items(), key=lambda item: item[1])
        wrong = []
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and end - start < 256 and order[end][1] == order[end - 1][1] + 1:
                end += 1
            stored = await self._read_physical(order[start][1], end - start)
            for k, (i, _) in enumerate(order[start:end]):
                if stored[k * bs : (k + 1) * bs] != view[i * bs : (i + 1) * bs].tobytes():
                    wrong.append(i)
            start = end
        for i in wrong:  # a collision: look further, one by one
            self.counters.verified_collisions += 1
            digest = digests[i]
            assert digest is not None
            tried = [found.pop(i)]
            while (pbn := await self._candidate(digest, tried)) is not None:
                pinned.append(pbn)
                if await self._read_physical(pbn, 1) == view[i * bs : (i + 1) * bs].tobytes():
                    found[i] = pbn
                    break
                self.counters.verified_collisions += 1
                tried.append(pbn)

    async def _read_physical(self, pbn: int, count: int) -> bytes:
        return await read_physical(self.name, self.dt, self._bs, pbn, count)

    async def _candidate(self, digest: bytes, exclude: Sequence[int]) -> int | None:
        """A block the index proposes for this hash whose refcount and full hash agree
        (stale entries are skipped), pinned: the caller unpins it."""
        for pbn in await self.index.lookup(digest):
            if pbn in exclude:
                continue
            pno, word = pbt_location(self.sb, pbn)
            page = await self.cache.get(pno)
            if page.q[word] == 0 or not pbt_holds(page, word, digest):
                continue  # stale entry: freed, or reused for other data
            self.alloc.pin(pbn)
            return pbn
        return None

    async def _allocate(self, n: int) -> list[int]:
        while True:
            got = await self.alloc.allocate(n)
            if len(got) == n:
                return got
            self.alloc.release(got)
            if self.alloc.pending:
                await self.committer.commit()
            elif self.alloc.reserved:
                await self.alloc.wait_for_change()
            else:
                raise IOFailure(
                    f"node '{self.name}': no free physical block is left (all "
                    f"{self.sb.physical_blocks} are in use)",
                    errno.ENOSPC,
                )

    async def _write_data(self, fresh: dict[int, int], view: memoryview) -> None:
        """Write new blocks to `data`, one request per run of consecutive blocks."""
        bs = self._bs
        order = sorted(fresh.items(), key=lambda item: item[1])
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and order[end][1] == order[end - 1][1] + 1:
                end += 1
            first_i, last_i = order[start][0], order[end - 1][0]
            if last_i - first_i == end - 1 - start:  # contiguous in the request too
                run = view[first_i * bs : (last_i + 1) * bs].tobytes()
            else:
                run = b"".join([view[i * bs : (i + 1) * bs] for i, _ in order[start:end]])
            await self.dt.write(order[start][1] * bs, run)
            start = end

    async def _forget(self, freed: list[tuple[bytes, int]]) -> None:
        """Drop freed blocks from the index (advisory: a stale entry is only rejected later)."""
        for digest, pbn in freed:
            await self.index.remove(digest, pbn)
        if len(self.cache.home_dirty) > self.cache.capacity // 2:
            await self.committer.write_back_index()

    async def zero(self, offset: int, length: int) -> None:
        """Unmap the blocks: they read as zeroes and their space is freed."""
        self.committer.check_writable()
        bs = self._bs
        first = offset // bs
        n = length // bs
        self.zero_blocks_written += n
        for start in range(0, n, self.chunk):
            k = min(self.chunk, n - start)
            freed = await self.remap.apply(first + start, [None] * k, [None] * k, set())
            await self._forget(freed)
