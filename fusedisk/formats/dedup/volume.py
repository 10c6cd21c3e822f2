"""The dedup volume: the engine of the `dedup` format, knowing nothing of nodes.

It works on two block stores (metadata and data: store.py, which the node's
edges provide) and leaves the node glue to driver.py.  This module holds the
open volume's state, the read path and the check and stats; the rest is split
by job:

    opening.py    find the superblock or format empty children, replay the journal
    writes.py     the write pipeline (hash, share or allocate, write), zeroing
    remap.py      its last phase: remap blocks and move refcounts, atomically
    commit.py     group commit through the journal, checkpoints, index write-back
    check.py      the consistency check
    layout.py, entries.py   the on-disk structures; cache.py the page cache;
    index.py the content index; allocator.py free space; journal.py the journal

Flush commits: `data` is flushed, then the changed metadata pages go to the
journal and `metadata` is flushed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import trio

from fusedisk.errors import CorruptImage
from fusedisk.formats.dedup.allocator import Allocator
from fusedisk.formats.dedup.cache import PageCache
from fusedisk.formats.dedup.check import CheckReport, check_image
from fusedisk.formats.dedup.commit import Committer
from fusedisk.formats.dedup.entries import map_location, pbt_entries
from fusedisk.formats.dedup.index import ContentIndex
from fusedisk.formats.dedup.journal import Journal
from fusedisk.formats.dedup.layout import MAP_PER_PAGE, PAGE, PBT_PER_PAGE
from fusedisk.formats.dedup.opening import counters_problem, find_or_format, replay
from fusedisk.formats.dedup.store import BlockStore, read_physical
from fusedisk.formats.dedup.writes import WritePipeline
from fusedisk.graph.extents import Extent, Status, merge_extents

log = logging.getLogger("fusedisk")


class DedupVolume:
    """A dedup image on a metadata store and a data store (see the module doc)."""

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        metadata: BlockStore,
        data: BlockStore,
    ) -> None:
        """`options` is the node's own dict: run-time changes (verify) show at once."""
        self.name = name
        self.options = options
        self.md = metadata
        self.dt = data
        self.read_only = False
        self.size = 0
        self._opened = False
        self._meta_lock = trio.Lock()
        self._overlay: dict[int, bytes] = {}
        self._last_check: CheckReport | None = None
        self._check_running = False

    # -- open -----------------------------------------------------------------------

    async def open(self, read_only: bool) -> None:
        self.read_only = read_only
        sb = await find_or_format(self.name, self.options, self.md, self.dt, read_only)
        self.sb = sb
        self._bs = sb.block_size
        self.cache = PageCache(
            self._load_page, self._validate_page, int(self.options["cache-size"]) // PAGE
        )
        self.index = ContentIndex(self.name, self.cache, sb)
        self.journal = Journal(self.name, self.md, sb)
        overlay = self._overlay if read_only else None
        counters = await replay(self.name, sb, self.journal, self.md, self._validate_page, overlay)
        problem = counters_problem(sb, counters)
        if problem:
            raise CorruptImage(f"node '{self.name}': {problem}")
        self.counters = counters
        self.alloc = Allocator(self.cache, sb, counters)
        self.committer = Committer(
            self.name,
            self.md,
            self.dt,
            self.cache,
            self.journal,
            self.alloc,
            counters,
            self._meta_lock,
        )
        self.writes = WritePipeline(self.name, self.options, sb, self.index, self.committer)
        self._chunk = self.writes.chunk
        self._txn_budget = self.writes.remap.txn_budget
        self.size = sb.logical_size
        self._opened = True

    async def close(self) -> None:
        if not self._opened or self.read_only or self.committer.broken:
            return
        try:
            await self.commit()
            if self.journal.tail or self.cache.home_dirty:
                await self.committer.checkpoint(self.committer.durable_counters)
        except Exception as e:
            log.error("node '%s': closing: %s", self.name, e)
            raise

    # -- metadata pages ---------------------------------------------------------------

    async def _load_page(self, pno: int) -> bytes:
        image = self._overlay.get(pno)
        if image is not None:
            return image
        return await self.md.read(pno * PAGE, PAGE)

    def _validate_page(self, pno: int, data: bytearray) -> None:
        sb = self.sb
        if self.index.owns(pno):
            self.index.validate(pno, data)
            return
        if sb.map_first_page <= pno < sb.pbt_first_page:
            words = np.frombuffer(data, dtype="<u8")
            top = int(words.max())
            if top > sb.physical_blocks:
                slot = int(np.argmax(words))
                lbn = (pno - sb.map_first_page) * MAP_PER_PAGE + slot
                raise CorruptImage(
                    f"node '{self.name}': the map entry of logical block {lbn} points to "
                    f"physical block {top - 1}, past the {sb.physical_blocks} physical blocks"
                )
        elif sb.pbt_first_page <= pno < sb.index_first_page:
            refcounts = pbt_entries(data)["refcount"]
            top = int(refcounts.max())
            if top > sb.logical_blocks:
                slot = int(np.argmax(refcounts))
                pbn = (pno - sb.pbt_first_page) * PBT_PER_PAGE + slot
                raise CorruptImage(
                    f"node '{self.name}': physical block {pbn} has refcount {top}, more than "
                    f"the {sb.logical_blocks} logical blocks"
                )

    # -- requests ---------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        bs = self._bs
        first = offset // bs
        n = length // bs
        parts: list[bytes] = []
        pos = 0
        while pos < n:
            pno, word = map_location(self.sb, first + pos)
            k = min(n - pos, MAP_PER_PAGE - word)
            page = await self.cache.get(pno)
            runs = _runs(page.q[word : word + k].tolist())
            pinned = [r for r in runs if r[0]]
            self.alloc.pin_runs(pinned)
            try:
                for ref, count in runs:
                    if ref == 0:
                        parts.append(bytes(count * bs))
                    else:
                        parts.append(await read_physical(self.name, self.dt, bs, ref - 1, count))
            finally:
                self.alloc.unpin_runs(pinned)
            pos += k
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def write(self, offset: int, data: bytes) -> None:
        await self.writes.write(offset, data)

    async def discard(self, offset: int, length: int) -> None:
        """Unmaps the blocks: they read as zeroes and their space is freed."""
        await self.writes.zero(offset, length)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero blocks are never stored, so this always unmaps."""
        await self.writes.zero(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        bs = self._bs
        first = offset // bs
        end = -(-(offset + length) // bs)
        out: list[Extent] = []
        pos = first
        data = Status.DATA | Status.ALLOCATED
        zero = Status.ZERO | Status.ALLOCATED
        while pos < end:
            pno, word = map_location(self.sb, pos)
            k = min(end - pos, MAP_PER_PAGE - word)
            page = await self.cache.get(pno)
            refs = page.q[word : word + k].tolist()
            for i, ref in enumerate(refs):
                out.append(Extent((pos + i) * bs, bs, data if ref else zero))
            out = merge_extents(out)
            pos += k
        return out

    async def flush(self) -> None:
        if self.read_only:
            return
        self.committer.check_writable()
        await self.commit()

    async def commit(self) -> None:
        """Make every change made before the call durable (commit.py)."""
        await self.committer.commit()

    # -- check, stats, controls ---------------------------------------------------------

    async def check(self, hashes: bool = True) -> CheckReport:
        """Check every refcount, map entry, index entry and (with `hashes`) block hash."""
        async with self._meta_lock:
            self._check_running = True
            try:
                report = await check_image(self, hashes)
            finally:
                self._check_running = False
        self._last_check = report
        return report

    async def check_control(self, text: str) -> None:
        await self.check(hashes=text.strip().lower() != "quick")

    def check_text(self) -> str:
        if self._check_running:
            return json.dumps({"status": "running"}) + "\n"
        if self._last_check is None:
            return json.dumps({"status": "not run"}) + "\n"
        return self._last_check.to_json()

    def stats(self) -> dict[str, Any]:
        if not self._opened:
            return {}
        c = self.counters
        bs = self._bs
        return {
            "block_size": bs,
            "logical_bytes_used": c.used_logical * bs,
            "physical_bytes_used": c.used_physical * bs,
            "dedup_ratio": round(c.used_logical / c.used_physical, 3) if c.used_physical else 1.0,
            "index_hits": c.index_hits,
            "verified_collisions": c.verified_collisions,
            "zero_blocks_written": self.writes.zero_blocks_written,
            "physical_blocks": self.sb.physical_blocks,
            "physical_high_water_bytes": c.hwm * bs,
            "commits": self.journal.commits,
            "checkpoints": self.journal.checkpoints,
            "journal_bytes_used": self.journal.used_bytes,
            "metadata_cache": {
                "pages": len(self.cache),
                "hits": self.cache.hits,
                "misses": self.cache.misses,
                "dirty_pages": len(self.cache.txn_dirty) + len(self.cache.home_dirty),
            },
            "torn_index_buckets": self.index.torn_buckets,
        }


def _runs(refs: list[int]) -> list[tuple[int, int]]:
    """Map entries as runs of (first ref, count): consecutive physical blocks, or
    zeroes (ref 0)."""
    runs: list[tuple[int, int]] = []
    for ref in refs:
        if runs:
            start, count = runs[-1]
            if (ref == 0 and start == 0) or (ref and start and ref == start + count):
                runs[-1] = (start, count + 1)
                continue
        runs.append((ref, 1))
    return runs
