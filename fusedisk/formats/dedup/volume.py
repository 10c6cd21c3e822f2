"""The dedup volume: the engine of the `dedup` format, knowing nothing of nodes.

It works on two block stores (metadata and data: `BlockStore` below, which the
node's edges provide) and leaves the node glue to driver.py.  The on-disk
structures are in layout.py, the page cache in cache.py, the content index in
index.py, free space in allocator.py, the journal in journal.py and the
consistency checker in check.py.
Glue only: the on-disk structures are in layout.py, the page cache in
cache.py, the content index in index.py, free space in allocator.py, the
journal in journal.py and the consistency checker in check.py.

A write, per chunk of at most 256 blocks (so that the metadata pages one chunk
changes always fit in one journal transaction):

    A  hash each block (all-zero blocks are never stored); ask the index for a
       block with the same hash; accept it if its refcount is above zero, its
       full hash matches and, with `verify`, its bytes are equal (it is
       pinned from then on, so it cannot be reused under us)
    B  reserve free physical blocks for the others
    C  write them to `data`, in runs of consecutive blocks
    D  under the metadata lock, with no await between the first change and
       the last: point the map entries at their blocks, raise the new
       blocks' refcounts, lower the old ones' (a block reaching zero is freed
       once that change is committed)

Flush commits: `data` is flushed, then the changed metadata pages go to the
journal and `metadata` is flushed.  Changes are also committed whenever the
pages changed since the last commit reach the budget, so memory stays
bounded without flushes.
"""

from __future__ import annotations

import errno
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import trio

from fusedisk.errors import CorruptImage, IOFailure, OpenError, OutOfRange
from fusedisk.formats.dedup.allocator import Allocator
from fusedisk.formats.dedup.cache import Page, PageCache
from fusedisk.formats.dedup.check import CheckReport, check_image
from fusedisk.formats.dedup.index import ContentIndex
from fusedisk.formats.dedup.journal import Journal
from fusedisk.formats.dedup.layout import (
    INCOMPAT_KNOWN,
    MAGIC,
    MAP_PER_PAGE,
    PAGE,
    RO_COMPAT_KNOWN,
    SUPERBLOCK_SLOTS,
    Counters,
    Superblock,
    default_physical_blocks,
    map_location,
    pbt_location,
    pick_superblock,
)
from fusedisk.graph.extents import Extent, Status, merge_extents

log = logging.getLogger("fusedisk")

MiB = 1 << 20
#: blocks freed but not yet committed before a commit is forced
PENDING_LIMIT = 65536

#: headers of other formats, to name what a child holds when refusing to format it
_KNOWN_HEADERS = (
    (0, b"QFI\xfb", "a qcow2 image"),
    (0, b"LUKS\xba\xbe", "a LUKS header"),
    (0, MAGIC, "a dedup metadata superblock"),
    (0, b"FDDJTXN\x00", "a dedup journal"),
    (512, b"EFI PART", "a GPT partition table"),
    (0x438, b"\x53\xef", "an ext2/3/4 filesystem"),
    (510, b"\x55\xaa", "a partition table or boot sector"),
)
_ZERO_MIB = bytes(MiB)


class BlockStore(Protocol):
    """Where the volume keeps its metadata or its data (a node's edge, adapted)."""

    @property
    def desc(self) -> str:
        """How messages name it: "child 'metadata' (node 'md')"."""
        ...

    @property
    def size(self) -> int: ...

    @property
    def grows(self) -> bool: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None: ...

    async def truncate(self, size: int) -> None: ...

    async def block_status(self, offset: int, length: int) -> list[Extent]: ...


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
        self._broken: str | None = None
        self._opened = False
        self._meta_lock = trio.Lock()
        self._commit_lock = trio.Lock()
        self._overlay: dict[int, bytes] = {}
        self._last_check: CheckReport | None = None
        self._check_running = False
        self.zero_blocks_written = 0

    # -- open -----------------------------------------------------------------------

    async def open(self, read_only: bool) -> None:
        self.read_only = read_only
        sb = await self._read_superblock()
        if sb is None:
            sb = await self._format()
        elif self.options["format"]:
            self._check_format_options_match(sb)
        self.sb = sb
        self._bs = sb.block_size
        self.cache = PageCache(
            self._load_page, self._validate_page, int(self.options["cache-size"]) // PAGE
        )
        self.index = ContentIndex(self.name, self.cache, sb)
        self.journal = Journal(self.name, self.md, sb)
        counters = await self._replay()
        problem = _counters_problem(sb, counters)
        if problem:
            raise CorruptImage(f"node '{self.name}': {problem}")
        self.counters = counters
        self._durable_counters = counters.copy()
        self.alloc = Allocator(self.cache, sb, counters)
        max_txn = self.journal.max_txn_pages
        self._chunk = max(1, min(256, max_txn // 8))
        self._txn_budget = max_txn - (3 * self._chunk + 4)
        self._mod_gen = 0
        self._committed_gen = 0
        self.size = sb.logical_size
        self._opened = True

    async def _read_superblock(self) -> Superblock | None:
        """The image's superblock; None if the child holds no dedup image at all."""
        md = self.md
        slots = []
        for i in range(SUPERBLOCK_SLOTS):
            end = (i + 1) * PAGE
            slots.append(await md.read(i * PAGE, PAGE) if md.size >= end else b"")
        if not any(raw[:8] == MAGIC for raw in slots):
            return None
        sb, reasons = pick_superblock(slots)
        where = f"node '{self.name}': {md.desc}"
        if sb is None:
            raise CorruptImage(f"{where} has no valid dedup superblock ({'; '.join(reasons)})")
        problem = sb.validate()
        if problem:
            raise CorruptImage(f"{where}: the dedup superblock is invalid: {problem}")
        if sb.incompat & ~INCOMPAT_KNOWN:
            raise OpenError(
                f"{where}: the image uses features this version does not know "
                f"(incompatible feature bits {sb.incompat:#x})"
            )
        if sb.ro_compat & ~RO_COMPAT_KNOWN and not self.read_only:
            raise OpenError(
                f"{where}: the image uses features this version can only read "
                f"(bits {sb.ro_compat:#x}); open it with read-only = true"
            )
        if md.size < sb.metadata_size:
            raise CorruptImage(
                f"{where} is truncated: it has {md.size} bytes, the image needs {sb.metadata_size}"
            )
        return sb

    def _check_format_options_match(self, sb: Superblock) -> None:
        size, bs = self.options["size"], self.options["block-size"]
        if bs is not None and bs != sb.block_size:
            raise OpenError(
                f"node '{self.name}': option 'block-size': the image on "
                f"{self.md.desc} was formatted with {sb.block_size}"
            )
        if size is not None and -(-size // sb.block_size) != sb.logical_blocks:
            raise OpenError(
                f"node '{self.name}': option 'size': the image on {self.md.desc} "
                f"was formatted with {sb.logical_size} bytes"
            )

    async def _contents(self, edge: BlockStore) -> str | None:
        """None if the child reads as all zeroes, else what it seems to hold."""
        size = edge.size
        if size == 0:
            return None
        head = await edge.read(0, min(size, 2 * PAGE))
        for offset, magic, what in _KNOWN_HEADERS:
            if head[offset : offset + len(magic)] == magic:
                return what
        for ext in await edge.block_status(0, size):
            if ext.status & Status.ZERO:
                continue
            for at in range(ext.offset, ext.end, MiB):
                n = min(MiB, ext.end - at)
                if await edge.read(at, n) != _ZERO_MIB[:n]:
                    return "data"
        return None

    async def _format(self) -> Superblock:
        where = f"node '{self.name}'"
        if not self.options["format"]:
            raise OpenError(
                f"{where}: {self.md.desc} holds no dedup image; set format = true "
                "(with size) to format empty children, or run `fusedisk dedup create`"
            )
        if self.read_only:
            raise OpenError(f"{where}: option 'format': cannot format a read-only node")
        size = self.options["size"]
        if size is None:
            raise OpenError(f"{where}: option 'size' is required to format")
        bs = self.options["block-size"] or 4096
        if bs & (bs - 1):
            raise OpenError(f"{where}: option 'block-size': {bs} is not a power of two")
        for edge in (self.md, self.dt):
            what = await self._contents(edge)
            if what is not None:
                raise OpenError(
                    f"{where}: option 'format': {edge.desc} is not empty (it holds "
                    f"{what}); format = true only formats empty children"
                )
        logical_blocks = -(-size // bs)
        physical = None
        if not self.dt.grows:
            physical = min(default_physical_blocks(logical_blocks), self.dt.size // bs)
            if physical < 1:
                raise OpenError(f"{where}: {self.dt.desc} is smaller than one block ({bs} bytes)")
        sb = Superblock.create(size, bs, physical, int(self.options["journal-size"]))
        problem = sb.validate()
        if problem:
            raise OpenError(f"{where}: cannot format: {problem}")
        if self.md.size < sb.metadata_size:
            try:
                await self.md.truncate(sb.metadata_size)
            except Exception as e:
                raise OpenError(
                    f"{where}: {self.md.desc} is too small for the metadata "
                    f"({sb.metadata_size} bytes needed) and cannot grow: {e}"
                ) from None
        await self.md.flush()
        # Both slots, so the magic is at offset 0 too; the higher epoch (slot 1) is used.
        sb.epoch = 0
        await self.md.write(0, sb.pack())
        sb.epoch = 1
        await self.md.write(PAGE, sb.pack())
        await self.md.flush()
        log.info(
            "node '%s': formatted a %d-byte dedup image (block size %d, %d bytes of metadata)",
            self.name,
            sb.logical_size,
            bs,
            sb.metadata_size,
        )
        return sb

    async def _replay(self) -> Counters:
        """Bring the committed transactions home; the counters they end with."""
        txns = await self.journal.scan(self._validate_page)
        if not txns:
            return self.sb.counters.copy()
        counters = txns[-1].header.counters.copy()
        problem = _counters_problem(self.sb, counters)
        if problem:
            raise CorruptImage(f"node '{self.name}': journal: {problem}")
        pages = sum(len(t.keys) for t in txns)
        if self.read_only:
            for txn in txns:  # at most one image per page: bounded by the journal size
                self._overlay.update(await self.journal.images(txn))
            log.info(
                "node '%s': %d journal transactions (%d pages) read but not replayed: "
                "the node is read-only",
                self.name,
                len(txns),
                pages,
            )
            return counters
        for txn in txns:
            for pno, image in await self.journal.images(txn):
                await self.md.write(pno * PAGE, image)
        await self.journal.checkpoint(counters)
        log.info(
            "node '%s': replayed %d journal transactions (%d pages) after an unclean shutdown",
            self.name,
            len(txns),
            pages,
        )
        return counters

    async def close(self) -> None:
        if not self._opened or self.read_only or self._broken:
            return
        try:
            await self.commit()
            if self.journal.tail or self.cache.home_dirty:
                await self._checkpoint(self._durable_counters)
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
        words = np.frombuffer(data, dtype="<u8")
        if sb.map_first_page <= pno < sb.pbt_first_page:
            top = int(words.max())
            if top > sb.physical_blocks:
                slot = int(np.argmax(words))
                lbn = (pno - sb.map_first_page) * MAP_PER_PAGE + slot
                raise CorruptImage(
                    f"node '{self.name}': the map entry of logical block {lbn} points to "
                    f"physical block {top - 1}, past the {sb.physical_blocks} physical blocks"
                )
        elif sb.pbt_first_page <= pno < sb.index_first_page:
            refcounts = words[0::4]
            top = int(refcounts.max())
            if top > sb.logical_blocks:
                slot = int(np.argmax(refcounts))
                pbn = (pno - sb.pbt_first_page) * (PAGE // 32) + slot
                raise CorruptImage(
                    f"node '{self.name}': physical block {pbn} has refcount {top}, more than "
                    f"the {sb.logical_blocks} logical blocks"
                )

    async def _read_physical(self, pbn: int, count: int) -> bytes:
        try:
            return await self.dt.read(pbn * self._bs, count * self._bs)
        except OutOfRange:
            raise CorruptImage(
                f"node '{self.name}': physical block {pbn + count - 1} is past the end of "
                f"{self.dt.desc} ({self.dt.size} bytes)"
            ) from None

    # -- requests ---------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._broken:
            raise IOFailure(f"node '{self.name}': {self._broken}; reopen the image to recover")

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
            refs = page.q[word : word + k].tolist()
            # runs of (first ref, count): consecutive physical blocks, or zeroes (ref 0)
            runs: list[tuple[int, int]] = []
            for ref in refs:
                if runs:
                    start, count = runs[-1]
                    if (ref == 0 and start == 0) or (ref and start and ref == start + count):
                        runs[-1] = (start, count + 1)
                        continue
                runs.append((ref, 1))
            pinned = [r for r in runs if r[0]]
            self.alloc.pin_runs(pinned)
            try:
                for ref, count in runs:
                    if ref == 0:
                        parts.append(bytes(count * bs))
                    else:
                        parts.append(await self._read_physical(ref - 1, count))
            finally:
                self.alloc.unpin_runs(pinned)
            pos += k
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def write(self, offset: int, data: bytes) -> None:
        self._check_writable()
        bs = self._bs
        n = len(data) // bs
        view = memoryview(data)
        rows = np.frombuffer(data, dtype=np.uint64).reshape(n, bs // 8)
        nonzero: list[bool] = np.any(rows, axis=1).tolist()
        first = offset // bs
        for start in range(0, n, self._chunk):
            k = min(self._chunk, n - start)
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
            freed = await self._apply(first, targets, digests, set(reserved))
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
        candidates are read in runs of consecutive blocks (a duplicated stream
        usually maps to one), and compared.
        """
        bs = self._bs
        found: dict[int, int] = {}
        for i in to_find:
            digest = digests[i]
            assert digest is not None
            pbn = await self._candidate(digest, ())
            if pbn is not None:
                pinned.append(pbn)
                found[i] = pbn
        if self.options["verify"] and found:
            order = sorted(found.items(), key=lambda item: item[1])
            wrong = []
            start = 0
            while start < len(order):
                end = start + 1
                while (
                    end < len(order)
                    and end - start < 256
                    and order[end][1] == order[end - 1][1] + 1
                ):
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
        for i, pbn in found.items():
            targets[i] = pbn
        self.counters.index_hits += len(found)

    async def _candidate(self, digest: bytes, exclude: Sequence[int]) -> int | None:
        """A block the index proposes for this hash whose refcount and full hash agree
        (stale entries are skipped), pinned: the caller unpins it."""
        for pbn in await self.index.lookup(digest):
            if pbn in exclude:
                continue
            pno, word = pbt_location(self.sb, pbn)
            page = await self.cache.get(pno)
            at = word * 8
            if page.q[word] == 0 or page.data[at + 8 : at + 24] != digest:
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
                await self.commit()
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

    async def _apply(
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
                            len(self.cache.txn_dirty) + needed > self._txn_budget
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
            await self.commit()  # over budget: commit what is pending, then retry

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
        """The change itself: synchronous, so no request sees half of it."""
        sb = self.sb
        c = self.counters
        mark = self.cache.mark_txn_dirty
        drops = Counter(o - 1 for o in olds if o)
        adds = Counter(t for t in targets if t is not None)
        for pbn, k in drops.items():
            pno, word = pbt_location(sb, pbn)
            refcount = pbt[pno].q[word]
            if refcount + adds.get(pbn, 0) < k:
                raise CorruptImage(
                    f"node '{self.name}': physical block {pbn} has refcount {refcount} but "
                    f"{k} logical blocks being rewritten map to it"
                )
        maybe_freed: list[int] = []
        first_pno = map_pages[0].pno
        for i, target in enumerate(targets):
            if target is not None:
                pno, word = pbt_location(sb, target)
                page = pbt[pno]
                refcount = page.q[word]
                if refcount == 0:
                    if target in fresh:
                        digest = digests[i]
                        assert digest is not None
                        at = word * 8
                        page.data[at + 8 : at + 24] = digest
                        page.q[word + 3] = 0
                        self.alloc.consumed(target)
                    else:
                        self.alloc.revived(target)
                    c.used_physical += 1
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
        self._mod_gen += 1
        freed = []
        for pbn in maybe_freed:
            pno, word = pbt_location(sb, pbn)
            page = pbt[pno]
            if page.q[word] == 0:
                at = word * 8
                freed.append((bytes(page.data[at + 8 : at + 24]), pbn))
        return freed

    async def _forget(self, freed: list[tuple[bytes, int]]) -> None:
        """Drop freed blocks from the index (advisory: a stale entry is only rejected later)."""
        for digest, pbn in freed:
            await self.index.remove(digest, pbn)
        if len(self.cache.home_dirty) > self.cache.capacity // 2:
            await self._write_back_index()

    async def _zero(self, offset: int, length: int) -> None:
        self._check_writable()
        bs = self._bs
        first = offset // bs
        n = length // bs
        self.zero_blocks_written += n
        for start in range(0, n, self._chunk):
            k = min(self._chunk, n - start)
            freed = await self._apply(first + start, [None] * k, [None] * k, set())
            await self._forget(freed)

    async def discard(self, offset: int, length: int) -> None:
        """Unmaps the blocks: they read as zeroes and their space is freed."""
        await self._zero(offset, length)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero blocks are never stored, so this always unmaps."""
        await self._zero(offset, length)

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

    # -- commit -----------------------------------------------------------------------

    async def flush(self) -> None:
        if self.read_only:
            return
        self._check_writable()
        await self.commit()

    async def commit(self) -> None:
        """Make every change made before the call durable (group commit).

        The I/O is shielded from cancellation: a commit is never left half done.
        """
        wanted = self._mod_gen
        async with self._commit_lock:
            if self._committed_gen >= wanted:
                return
            self._check_writable()
            with trio.CancelScope(shield=True):
                await self._commit_locked()

    async def _commit_locked(self) -> None:
        async with self._meta_lock:
            gen = self._mod_gen
            pages = self.cache.take_txn_dirty()
            for page in pages:
                page.pins += 1
            images = [(p.pno, bytes(p.data)) for p in pages]
            counters = self.counters.copy()
            self.alloc.snapshot()
        try:
            try:
                await self.dt.flush()
                if images:
                    if not self.journal.fits(len(images)):
                        await self._checkpoint(self._durable_counters)
                    await self.journal.append(images, counters)
            except BaseException:
                for page in pages:
                    self.cache.mark_txn_dirty(page)
                self.alloc.commit_failed()
                raise
            self._durable_counters = counters
            self._committed_gen = gen
            self.alloc.commit_done()
            try:
                for pno, image in images:
                    await self.md.write(pno * PAGE, image)
                if self.journal.wants_checkpoint:
                    await self._checkpoint(counters)
            except BaseException as e:
                for page in pages:  # never evicted: their home copies may be stale
                    self.cache.mark_txn_dirty(page)
                self._broken = f"writing committed metadata failed ({e})"
                log.error("node '%s': %s", self.name, self._broken)
                raise
        finally:
            self.cache.unpin(pages)

    async def _checkpoint(self, counters: Counters) -> None:
        """Write the index back, then end the journal's epoch (journal.py)."""
        await self._write_back_index()
        await self.journal.checkpoint(counters)

    async def _write_back_index(self) -> None:
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
            "zero_blocks_written": self.zero_blocks_written,
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


def _counters_problem(sb: Superblock, c: Counters) -> str | None:
    if not (c.used_physical <= c.hwm <= sb.physical_blocks and c.used_logical <= sb.logical_blocks):
        return (
            f"the counters are out of range (high-water mark {c.hwm}, {c.used_physical} "
            f"physical and {c.used_logical} logical blocks used, {sb.physical_blocks} physical "
            f"and {sb.logical_blocks} logical blocks)"
        )
    return None
