"""Phase D of a dedup write: remap logical blocks and move refcounts, atomically.

Under the metadata lock, with no await between the first change and the
last, each logical block of a chunk is pointed at its new physical block
(or at nothing: zeroes), the new blocks' refcounts are raised and the old
ones' lowered.  A block reaching zero is freed once that change is committed
(allocator.py).  If the pages the change would dirty do not fit in the
journal transaction's budget, or too many freed blocks wait for a commit,
what is pending is committed first (commit.py) and the change retried.
"""

from __future__ import annotations

from collections import Counter

from fusedisk.errors import CorruptImage
from fusedisk.formats.dedup.cache import Page
from fusedisk.formats.dedup.commit import Committer
from fusedisk.formats.dedup.entries import map_location, pbt_digest, pbt_fill, pbt_location
from fusedisk.formats.dedup.layout import Superblock

#: blocks freed but not yet committed before a commit is forced
PENDING_LIMIT = 65536


class Remapper:
    """The atomic metadata change of one open volume (see the module doc)."""

    def __init__(self, name: str, sb: Superblock, committer: Committer, txn_budget: int) -> None:
        """`txn_budget`: the changed pages a transaction may hold before a commit."""
        self.name = name
        self.sb = sb
        self.committer = committer
        self.cache = committer.cache
        self.alloc = committer.alloc
        self.counters = committer.counters
        self.txn_budget = txn_budget
        self._meta_lock = committer.meta_lock

    async def apply(
        self,
        first: int,
        targets: list[int | None],
        digests: list[bytes | None],
        fresh: set[int],
    ) -> list[tuple[bytes, int]]:
        """Phase D: map `first + i` to `targets[i]` (None: zeroes), atomically.

        Returns (hash, block) of the blocks freed, for the index.
        """
        sb = self.sb
        n = len(targets)
        first_pno = map_location(sb, first)[0]
        last_pno = map_location(sb, first + n - 1)[0]
        while True:
            async with self._meta_lock:
                map_pages = await self.cache.pin(range(first_pno, last_pno + 1))
                try:
                    olds = []
                    for i in range(n):
                        pno, word = map_location(sb, first + i)
                        olds.append(map_pages[pno - first_pno].q[word])
                    blocks = {t for t in targets if t is not None}
                    blocks.update(o - 1 for o in olds if o)
                    pbt_pages = await self.cache.pin({pbt_location(sb, b)[0] for b in blocks})
                    try:
                        needed = sum(not p.txn_dirty for p in map_pages + pbt_pages)
                        over = (
                            len(self.cache.txn_dirty) + needed > self.txn_budget
                            or self.alloc.pending > PENDING_LIMIT
                        )
                        if not over or not self.cache.txn_dirty:
                            pbt = {p.pno: p for p in pbt_pages}
                            return self._mutate(
                                first, targets, digests, fresh, olds, map_pages, pbt
                            )
                    finally:
                        self.cache.unpin(pbt_pages)
                finally:
                    self.cache.unpin(map_pages)
            await self.committer.commit()  # over budget: commit what is pending, then retry

    def _mutate(
        self,
        first: int,
        targets: list[int | None],
        digests: list[bytes | None],
        fresh: set[int],
        olds: list[int],
        map_pages: list[Page],
        pbt: dict[int, Page],
    ) -> list[tuple[bytes, int]]:
        """The change itself: synchronous, so no request sees half of it.

        Per block: reference the new target, repoint the map entry, dereference
        the old block; the blocks whose refcount ends at zero are returned with
        their hashes.
        """
        sb, c, mark = self.sb, self.counters, self.cache.mark_txn_dirty
        self._check_drops(targets, olds, pbt)
        maybe_freed: list[int] = []
        first_pno = map_pages[0].pno
        for i, target in enumerate(targets):
            if target is not None:
                pno, word = pbt_location(sb, target)
                page = pbt[pno]
                refcount = page.q[word]
                if refcount == 0:
                    self._take(page, word, target, target in fresh, digests[i])
                page.q[word] = refcount + 1
                mark(page)
            old = olds[i]
            new = 0 if target is None else target + 1
            if old != new:
                pno, word = map_location(sb, first + i)
                mpage = map_pages[pno - first_pno]
                mpage.q[word] = new
                mark(mpage)
                if not old:
                    c.used_logical += 1
                elif not new:
                    c.used_logical -= 1
            if old:
                pno, word = pbt_location(sb, old - 1)
                page = pbt[pno]
                refcount = page.q[word] - 1
                page.q[word] = refcount
                mark(page)
                if refcount == 0:
                    c.used_physical -= 1
                    self.alloc.freed(old - 1)
                    maybe_freed.append(old - 1)
        self.committer.changed()
        freed = []
        for pbn in maybe_freed:
            pno, word = pbt_location(sb, pbn)
            if pbt[pno].q[word] == 0:
                freed.append((pbt_digest(pbt[pno], word), pbn))
        return freed

    def _check_drops(
        self, targets: list[int | None], olds: list[int], pbt: dict[int, Page]
    ) -> None:
        """Refuse a change that would take a refcount below zero: the image is corrupt."""
        drops = Counter(o - 1 for o in olds if o)
        adds = Counter(t for t in targets if t is not None)
        for pbn, k in drops.items():
            pno, word = pbt_location(self.sb, pbn)
            refcount = pbt[pno].q[word]
            if refcount + adds.get(pbn, 0) < k:
                raise CorruptImage(
                    f"node '{self.name}': physical block {pbn} has refcount {refcount} but "
                    f"{k} logical blocks being rewritten map to it"
                )

    def _take(self, page: Page, word: int, pbn: int, fresh: bool, digest: bytes | None) -> None:
        """A block whose refcount is zero comes into use: a fresh one gets its hash, a
        freed one (not yet committed as free) is revived."""
        if fresh:
            assert digest is not None
            pbt_fill(page, word, digest)
            self.alloc.consumed(pbn)
        else:
            self.alloc.revived(pbn)
        self.counters.used_physical += 1
