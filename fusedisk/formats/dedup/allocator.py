"""Free space on `data`: which physical blocks may receive new data.

The physical block table's refcounts are the free space map (refcount 0:
free); `hwm` (high-water mark) is the first block never handed out, so the
data child only grows when no freed block is left below it.  Blocks are
handed out in ascending order, from recently freed ones first, then from a
scan of the table that resumes where it stopped, then by raising `hwm` - so a
run of new blocks is usually contiguous and written sequentially.

A block whose refcount dropped to zero is *pending* until the transaction
that freed it is committed: until then a crash would bring back the mapping
that uses it, so its bytes must stay.  Blocks are also never handed out while
*pinned* (a request is reading or comparing them) or *reserved* (handed out,
not yet referenced).  All of this is in memory and bounded by the requests in
flight and the commit budget; only `hwm` and the counters are persisted.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import trio

from fusedisk.formats.dedup.cache import PageCache
from fusedisk.formats.dedup.entries import pbt_entries, pbt_location
from fusedisk.formats.dedup.layout import PBT_PER_PAGE, Counters, Superblock

#: recently freed blocks remembered for reuse (more are found by scanning)
HINT_LIMIT = 65536


class Allocator:
    def __init__(self, cache: PageCache, sb: Superblock, counters: Counters) -> None:
        self.cache = cache
        self.sb = sb
        self.counters = counters  # the live counters (hwm, used_physical)
        self.physical_blocks = sb.physical_blocks
        self.reserved: set[int] = set()
        self.pending_new: set[int] = set()  # freed since the last commit snapshot
        self.pending_commit: set[int] = set()  # freed in the snapshot being committed
        self.pins: dict[int, int] = {}
        self.hint: deque[int] = deque()
        self.cursor = 0
        self._changed = trio.Event()

    # -- pins -------------------------------------------------------------------

    def pin(self, pbn: int) -> None:
        self.pins[pbn] = self.pins.get(pbn, 0) + 1

    def unpin(self, pbn: int) -> None:
        n = self.pins[pbn] - 1
        if n:
            self.pins[pbn] = n
        else:
            del self.pins[pbn]

    def pin_runs(self, runs: list[tuple[int, int]]) -> None:
        """Pin (block + 1, count) runs, as a read maps them."""
        pins = self.pins
        for ref, count in runs:
            for pbn in range(ref - 1, ref - 1 + count):
                pins[pbn] = pins.get(pbn, 0) + 1

    def unpin_runs(self, runs: list[tuple[int, int]]) -> None:
        pins = self.pins
        for ref, count in runs:
            for pbn in range(ref - 1, ref - 1 + count):
                n = pins[pbn] - 1
                if n:
                    pins[pbn] = n
                else:
                    del pins[pbn]

    # -- state changes made by the driver ---------------------------------------

    @property
    def pending(self) -> int:
        return len(self.pending_new) + len(self.pending_commit)

    def freed(self, pbn: int) -> None:
        """`pbn`'s refcount reached zero in the current (uncommitted) state."""
        self.pending_new.add(pbn)

    def revived(self, pbn: int) -> None:
        """A pinned block whose refcount had reached zero is referenced again."""
        self.pending_new.discard(pbn)
        self.pending_commit.discard(pbn)

    def consumed(self, pbn: int) -> None:
        """A reserved block is now referenced by the map."""
        self.reserved.discard(pbn)

    def release(self, pbns: list[int]) -> None:
        """Reserved blocks that were not used after all (the request failed)."""
        for pbn in pbns:
            if pbn in self.reserved:
                self.reserved.discard(pbn)
                if len(self.hint) < HINT_LIMIT:
                    self.hint.appendleft(pbn)
        self._wake()

    def snapshot(self) -> None:
        """A commit is taking its snapshot: what was freed so far goes with it."""
        self.pending_commit |= self.pending_new
        self.pending_new = set()

    def commit_done(self) -> None:
        """The snapshot is durable: the blocks it freed may now be reused."""
        freed = sorted(self.pending_commit)
        self.pending_commit = set()
        room = HINT_LIMIT - len(self.hint)
        self.hint.extend(freed[:room])
        self._wake()

    def commit_failed(self) -> None:
        self.pending_new |= self.pending_commit
        self.pending_commit = set()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_change(self) -> None:
        """Until a reservation is released or a commit frees blocks."""
        await self._changed.wait()

    # -- allocation -------------------------------------------------------------

    def _free_below_hwm(self) -> int:
        c = self.counters
        return c.hwm - c.used_physical - len(self.reserved) - self.pending

    def _usable(self, pbn: int, refcount: int) -> bool:
        return (
            refcount == 0
            and pbn < self.counters.hwm
            and pbn not in self.reserved
            and pbn not in self.pending_new
            and pbn not in self.pending_commit
            and pbn not in self.pins
        )

    async def _refcount(self, pbn: int) -> int:
        pno, word = pbt_location(self.sb, pbn)
        page = await self.cache.get(pno)
        return int(page.q[word])

    async def _from_hint(self) -> int | None:
        while self.hint:
            pbn = self.hint.popleft()
            refcount = await self._refcount(pbn)
            if self._usable(pbn, refcount):
                self.reserved.add(pbn)
                return pbn
        return None

    async def _scan(self) -> None:
        """Fill the hint from the table, one page at a time, from the cursor on."""
        hwm = self.counters.hwm
        pages = -(-hwm // PBT_PER_PAGE)
        for _ in range(pages + 1):
            if self.cursor >= self.counters.hwm:
                self.cursor = 0
            base = self.cursor - self.cursor % PBT_PER_PAGE
            pno, _ = pbt_location(self.sb, base)
            page = await self.cache.get(pno)
            end = min(self.counters.hwm - base, PBT_PER_PAGE)
            refcounts = pbt_entries(page.data)["refcount"][:end]
            start = self.cursor - base
            for i in np.flatnonzero(refcounts[start:] == 0).tolist():
                pbn = base + start + i
                if self._usable(pbn, 0) and len(self.hint) < HINT_LIMIT:
                    self.hint.append(pbn)
            self.cursor = base + PBT_PER_PAGE
            if self.hint:
                return

    async def allocate(self, n: int) -> list[int]:
        """Reserve up to `n` free blocks, ascending; fewer only if the image is full.

        The caller writes them and references them (`consumed`) or gives them
        back (`release`).  On cancellation nothing stays reserved.
        """
        out: list[int] = []
        try:
            while len(out) < n:
                pbn = await self._from_hint()
                if pbn is None and self._free_below_hwm() > 0:
                    await self._scan()
                    pbn = await self._from_hint()
                if pbn is not None:
                    out.append(pbn)
                    continue
                c = self.counters
                k = min(n - len(out), self.physical_blocks - c.hwm)
                if k <= 0:
                    break
                fresh = range(c.hwm, c.hwm + k)
                c.hwm += k
                self.reserved.update(fresh)
                out.extend(fresh)
        except BaseException:
            self.release(out)
            raise
        out.sort()
        return out
