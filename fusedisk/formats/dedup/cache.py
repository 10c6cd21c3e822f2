"""A bounded cache of 4 KiB metadata pages, so memory does not grow with the disk.

Pages are loaded on first use (never all at open) and evicted least recently
used first.  A page is never evicted while it is pinned (a request or a commit
is using it) or dirty: `txn_dirty` pages (map, physical block table) hold
changes not yet in the journal, `home_dirty` pages (index buckets) changes not
yet written back.  Both are bounded by the driver, which commits or writes back
before they grow past their budget, so the cache may exceed its capacity only
by what is in flight.

One load per page at a time: a second task asking for a page being loaded
waits for the first, so two copies of one page never exist.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable

import numpy as np
import trio

if sys.byteorder != "little":  # pages are read through native 'Q' views
    raise ImportError("the dedup format needs a little-endian host")


class Page:
    """One cached metadata page: its bytes and a view of them as 64-bit words."""

    __slots__ = ("data", "home_dirty", "pins", "pno", "q", "txn_dirty", "words")

    def __init__(self, pno: int, data: bytearray) -> None:
        self.pno = pno
        self.data = data
        self.q = memoryview(data).cast("Q")
        self.words = np.frombuffer(data, dtype="<u8")  # the same bytes, for bulk work
        self.pins = 0
        self.txn_dirty = False
        self.home_dirty = False

    @property
    def evictable(self) -> bool:
        return not (self.pins or self.txn_dirty or self.home_dirty)


class PageCache:
    """Pages by absolute page number of the metadata child."""

    def __init__(
        self,
        load: Callable[[int], Awaitable[bytes]],
        validate: Callable[[int, bytearray], None],
        capacity: int,
    ) -> None:
        self._load = load
        self._validate = validate
        self.capacity = max(16, capacity)
        self._pages: OrderedDict[int, Page] = OrderedDict()
        self._loading: dict[int, trio.Event] = {}
        self.txn_dirty: dict[int, Page] = {}
        self.home_dirty: dict[int, Page] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._pages)

    def peek(self, pno: int) -> Page | None:
        return self._pages.get(pno)

    async def get(self, pno: int) -> Page:
        """The page, loaded (and validated) if it is not cached.

        Cancellation while loading leaves the page unloaded; waiters retry.
        """
        page = self._pages.get(pno)
        if page is not None:
            self._pages.move_to_end(pno)
            self.hits += 1
            return page
        while (event := self._loading.get(pno)) is not None:
            await event.wait()
            page = self._pages.get(pno)
            if page is not None:
                return page
        self.misses += 1
        event = trio.Event()
        self._loading[pno] = event
        try:
            data = bytearray(await self._load(pno))
            self._validate(pno, data)
            page = Page(pno, data)
            self._pages[pno] = page
            page.pins += 1  # never evict the page being returned
            self._evict()
            page.pins -= 1
        finally:
            del self._loading[pno]
            event.set()
        return page

    async def pin(self, pnos: Iterable[int]) -> list[Page]:
        """Load and pin pages; the caller unpins them (also on error) with `unpin`."""
        pinned: list[Page] = []
        try:
            for pno in sorted(set(pnos)):
                page = await self.get(pno)
                page.pins += 1
                pinned.append(page)
        except BaseException:
            self.unpin(pinned)
            raise
        return pinned

    def unpin(self, pages: Iterable[Page]) -> None:
        for page in pages:
            page.pins -= 1
        self._evict()

    def mark_txn_dirty(self, page: Page) -> None:
        if not page.txn_dirty:
            page.txn_dirty = True
            self.txn_dirty[page.pno] = page

    def mark_home_dirty(self, page: Page) -> None:
        if not page.home_dirty:
            page.home_dirty = True
            self.home_dirty[page.pno] = page

    def take_txn_dirty(self) -> list[Page]:
        """The pages changed since the last call, now clean (the caller pins them)."""
        pages = list(self.txn_dirty.values())
        for page in pages:
            page.txn_dirty = False
        self.txn_dirty.clear()
        return pages

    def take_home_dirty(self) -> list[Page]:
        pages = list(self.home_dirty.values())
        for page in pages:
            page.home_dirty = False
        self.home_dirty.clear()
        return pages

    def _evict(self) -> None:
        excess = len(self._pages) - self.capacity
        looked = 0
        while excess > 0 and looked < len(self._pages):
            pno, page = next(iter(self._pages.items()))
            if page.evictable:
                self._pages.popitem(last=False)
                excess -= 1
            else:
                self._pages.move_to_end(pno)
                looked += 1
