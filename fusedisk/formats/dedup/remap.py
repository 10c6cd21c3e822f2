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
from fusedisk.formats.dedup.entries import PbtEntry, map_location, pbt_location
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
        self._check_drops(targets, olds, pbt)
        maybe_freed: list[int] = []
        for i, target in enumerate(targets):
            if target is not None:
                self._reference(pbt, target, target in fresh, digests[i])
            old = olds[i]
            new = 0 if target is None else target + 1
            if old != new:
                self._remap(map_pages, first + i, old, new)
            if old and self._dereference(pbt, old - 1):
                maybe_freed.append(old - 1)
        self.committer.changed()
        freed = []
        for pbn in maybe_freed:
            entry = self._entry(pbt, pbn)
            if entry.refcount == 0:
                freed.append((entry.digest, pbn))
        return freed

    def _entry(self, pbt: dict[int, Page], pbn: int) -> PbtEntry:
        pno, word = pbt_location(self.sb, pbn)
        return PbtEntry(pbt[pno], word)

    def _check_drops(
        self, targets: list[int | None], olds: list[int], pbt: dict[int, Page]
    ) -> None:
        """Refuse a change that would take a refcount below zero: the image is corrupt."""
        drops = Counter(o - 1 for o in olds if o)
        adds = Counter(t for t in targets if t is not None)
        for pbn, k in drops.items():
            refcount = self._entry(pbt, pbn).refcount
            if refcount + adds.get(pbn, 0) < k:
                raise CorruptImage(
                    f"node '{self.name}': physical block {pbn} has refcount {refcount} but "
                    f"{k} logical blocks being rewritten map to it"
                )

    def _reference(self, pbt: dict[int, Page], pbn: int, fresh: bool, digest: bytes | None) -> None:
        """One more logical block maps to `pbn` (a fresh block gets its hash)."""
        entry = self._entry(pbt, pbn)
        refcount = entry.refcount
        if refcount == 0:
            if fresh:
                assert digest is not None
                entry.fill(digest)
                self.alloc.consumed(pbn)
            else:
                self.alloc.revived(pbn)
            self.counters.used_physical += 1
        entry.refcount = refcount + 1
        self.cache.mark_txn_dirty(entry.page)

    def _remap(self, map_pages: list[Page], lbn: int, old: int, new: int) -> None:
        """Point logical block `lbn`'s map entry at `new` (physical block + 1, or 0)."""
        pno, word = map_location(self.sb, lbn)
        page = map_pages[pno - map_pages[0].pno]
        page.q[word] = new
        self.cache.mark_txn_dirty(page)
        if not old:
            self.counters.used_logical += 1
        elif not new:
            self.counters.used_logical -= 1

    def _dereference(self, pbt: dict[int, Page], pbn: int) -> bool:
        """One logical block fewer maps to `pbn`; whether it is now free."""
        entry = self._entry(pbt, pbn)
        refcount = entry.refcount - 1
        entry.refcount = refcount
        self.cache.mark_txn_dirty(entry.page)
        if refcount:
            return False
        self.counters.used_physical -= 1
        self.alloc.freed(pbn)
        return True
