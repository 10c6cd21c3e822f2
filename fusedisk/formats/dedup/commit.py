"""Commit of a dedup volume: group commit through the journal, then write home.

Every change to the map or the physical block table raises the modification
generation (`changed`); `commit` makes every change made before the call
durable: under the metadata lock it takes the pages changed since the last
commit and a copy of the counters, then

    flush `data`                         the new blocks are durable
    append the page images (journal.py)  now the change is durable
    write the images to their home pages, no flush
    checkpoint if the journal asks       index written back, journal restarted

A failure before the append puts the pages back as changed (the next commit
carries them); a failure after it leaves the node broken, since the home pages
may be stale: it refuses writes until it is reopened, and replay repairs it.
"""

from __future__ import annotations

import logging

import trio

from fusedisk.errors import IOFailure
from fusedisk.formats.dedup.allocator import Allocator
from fusedisk.formats.dedup.cache import Page, PageCache
from fusedisk.formats.dedup.index import ContentIndex
from fusedisk.formats.dedup.journal import Journal
from fusedisk.formats.dedup.layout import PAGE, Counters
from fusedisk.formats.dedup.store import BlockStore

log = logging.getLogger("fusedisk")


class Committer:
    """Commits and checkpoints one open volume (see the module doc)."""

    def __init__(
        self,
        name: str,
        md: BlockStore,
        dt: BlockStore,
        cache: PageCache,
        journal: Journal,
        alloc: Allocator,
        counters: Counters,
        meta_lock: trio.Lock,
    ) -> None:
        self.name = name
        self.md = md
        self.dt = dt
        self.cache = cache
        self.journal = journal
        self.alloc = alloc
        self.counters = counters  # the live counters, changed in place by writes
        self.durable_counters = counters.copy()
        self.broken: str | None = None
        self.meta_lock = meta_lock
        self._commit_lock = trio.Lock()
        self._mod_gen = 0
        self._committed_gen = 0

    def changed(self) -> None:
        """A change was made (under the metadata lock): the next commit carries it."""
        self._mod_gen += 1

    def check_writable(self) -> None:
        if self.broken:
            raise IOFailure(f"node '{self.name}': {self.broken}; reopen the image to recover")

    async def commit(self) -> None:
        """Make every change made before the call durable (group commit).

        The I/O is shielded from cancellation: a commit is never left half done.
        """
        wanted = self._mod_gen
        async with self._commit_lock:
            if self._committed_gen >= wanted:
                return
            self.check_writable()
            with trio.CancelScope(shield=True):
                await self._commit_locked()

    async def _commit_locked(self) -> None:
        async with self.meta_lock:
            gen = self._mod_gen
            pages = self.cache.take_txn_dirty()
            for page in pages:
                page.pins += 1
            images = [(p.pno, bytes(p.data)) for p in pages]
            counters = self.counters.copy()
            self.alloc.snapshot()
        try:
            await self._make_durable(pages, images, counters)
            self._committed_gen = gen
            await self._write_home(pages, images, counters)
        finally:
            self.cache.unpin(pages)

    async def _make_durable(
        self, pages: list[Page], images: list[tuple[int, bytes]], counters: Counters
    ) -> None:
        """Flush the data, then append the transaction; on failure nothing is lost."""
        try:
            await self.dt.flush()
            if images:
                if not self.journal.fits(len(images)):
                    await self.checkpoint(self.durable_counters)
                await self.journal.append(images, counters)
        except BaseException:
            for page in pages:
                self.cache.mark_txn_dirty(page)
            self.alloc.commit_failed()
            raise
        self.durable_counters = counters
        self.alloc.commit_done()

    async def _write_home(
        self, pages: list[Page], images: list[tuple[int, bytes]], counters: Counters
    ) -> None:
        """Write the committed images home; a failure here breaks the node."""
        try:
            for pno, image in images:
                await self.md.write(pno * PAGE, image)
            if self.journal.wants_checkpoint:
                await self.checkpoint(counters)
        except BaseException as e:
            for page in pages:  # never evicted: their home copies may be stale
                self.cache.mark_txn_dirty(page)
            self.broken = f"writing committed metadata failed ({e})"
            log.error("node '%s': %s", self.name, self.broken)
            raise

    async def checkpoint(self, counters: Counters) -> None:
        """Write the index back, then end the journal's epoch (journal.py)."""
        await self.write_back_index()
        await self.journal.checkpoint(counters)

    async def write_back_index(self) -> None:
        """Write changed index buckets home: no ordering, no journal (the index is advisory)."""
        pages = sorted(self.cache.take_home_dirty(), key=lambda p: p.pno)
        for page in pages:
            page.pins += 1
        try:
            for page in pages:
                await self.md.write(page.pno * PAGE, ContentIndex.seal(page.data))
        except BaseException:
            for page in pages:
                self.cache.mark_home_dirty(page)
            raise
        finally:
            self.cache.unpin(pages)
