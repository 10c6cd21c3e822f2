"""The write-ahead journal on `metadata`: page images, replayed on open.

A transaction is the set of map and physical-block-table pages changed since
the previous one, as whole 4 KiB images, with the image-wide counters:

    header page   magic, epoch, seq, page count, counters, checksum of the whole
    key pages     the absolute page number of each image (8 bytes each)
    images        the pages themselves

Commit (driver): flush `data` (the new blocks are durable), append the
transaction here and flush `metadata` (now it is durable), then write the same
images to their home pages without a flush.  The journal is written from its
start within an *epoch*; a checkpoint flushes `metadata` (the home pages are
durable), writes the superblock with the next epoch and flushes again, which
makes every older transaction dead, and the journal starts over.

Replay (open): the transactions of the superblock's epoch are read in order,
each needing the right epoch, the next sequence number and a good checksum;
the first that fails ends the journal (a torn, never-acknowledged commit).
Their images are written home and a checkpoint follows.  Replaying twice
writes the same pages, so a crash during replay is harmless.

References: the idea is ext4's jbd2 (full-block journaling, commit block,
checkpoint); nothing here is its format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fusedisk.errors import CorruptImage
from fusedisk.formats.dedup.layout import (
    PAGE,
    SUPERBLOCK_SLOTS,
    Counters,
    Superblock,
    TxnHeader,
    txn_checksum,
    txn_set_checksum,
    txn_stored_checksum,
)

if TYPE_CHECKING:
    from fusedisk.formats.dedup.store import BlockStore


@dataclass
class Transaction:
    """A committed transaction found by `scan`: where it is and which pages it holds."""

    header: TxnHeader
    at: int  # its first page, counted from the start of the journal
    keys: list[int]


class Journal:
    """Appends transactions to the journal region and checkpoints it."""

    def __init__(self, name: str, metadata: BlockStore, sb: Superblock) -> None:
        self.name = name
        self.metadata = metadata
        self.sb = sb
        self.tail = 0  # pages used in the current epoch
        self.seq = 0  # sequence number of the next transaction
        self.commits = 0
        self.checkpoints = 0

    @property
    def max_txn_pages(self) -> int:
        """The most page images one transaction may carry (half the journal, less headers)."""
        return self.sb.journal_pages // 2 - 8

    def fits(self, n_pages: int) -> bool:
        needed = 1 + (-(-n_pages * 8 // PAGE)) + n_pages
        return self.tail + needed <= self.sb.journal_pages

    @property
    def used_bytes(self) -> int:
        return self.tail * PAGE

    @property
    def wants_checkpoint(self) -> bool:
        return self.tail > self.sb.journal_pages // 2

    # -- replay -------------------------------------------------------------------

    async def scan(self, validate: Callable[[int, bytearray], None]) -> list[Transaction]:
        """Every committed transaction of the current epoch, checked, in order.

        Reads at most the journal region, one transaction at a time; writes
        nothing.  A transaction with a good checksum but impossible content
        raises CorruptImage.
        """
        sb = self.sb
        out: list[Transaction] = []
        at = 0
        seq = 0
        while at < sb.journal_pages:
            head = await self.metadata.read(sb.journal_offset + at * PAGE, PAGE)
            hdr = TxnHeader.unpack(head)
            if hdr is None or hdr.epoch != sb.epoch or hdr.seq != seq:
                break
            if hdr.n_pages > self.max_txn_pages or at + hdr.total_pages > sb.journal_pages:
                break
            rest = await self._rest(at, hdr)
            if txn_checksum(head, rest) != txn_stored_checksum(head):
                break  # torn: this commit never completed
            keys = memoryview(rest)[: hdr.key_pages * PAGE].cast("Q")[: hdr.n_pages].tolist()
            for pno, image in self._pages(hdr, keys, rest):
                if not sb.journaled_page(pno):
                    raise CorruptImage(
                        f"node '{self.name}': journal transaction {seq} names metadata page "
                        f"{pno}, outside the map and physical block table"
                    )
                validate(pno, image)
            out.append(Transaction(hdr, at, keys))
            at += hdr.total_pages
            seq += 1
        return out

    async def _rest(self, at: int, hdr: TxnHeader) -> bytes:
        offset = self.sb.journal_offset + (at + 1) * PAGE
        return await self.metadata.read(offset, (hdr.total_pages - 1) * PAGE)

    @staticmethod
    def _pages(hdr: TxnHeader, keys: list[int], rest: bytes) -> list[tuple[int, bytearray]]:
        base = hdr.key_pages * PAGE
        return [
            (pno, bytearray(rest[base + i * PAGE : base + (i + 1) * PAGE]))
            for i, pno in enumerate(keys)
        ]

    async def images(self, txn: Transaction) -> list[tuple[int, bytes]]:
        """The page images of a transaction `scan` found (read again)."""
        rest = await self._rest(txn.at, txn.header)
        return [(pno, bytes(image)) for pno, image in self._pages(txn.header, txn.keys, rest)]

    # -- commit -------------------------------------------------------------------

    async def append(self, pages: list[tuple[int, bytes]], counters: Counters) -> None:
        """Write one transaction and flush `metadata`: when this returns, it is durable."""
        hdr = TxnHeader(self.sb.epoch, self.seq, len(pages), counters)
        head = hdr.pack_head()
        keys = bytearray(hdr.key_pages * PAGE)
        kview = memoryview(keys).cast("Q")
        for i, (pno, _) in enumerate(pages):
            kview[i] = pno
        kview.release()
        rest = b"".join([keys, *(image for _, image in pages)])
        txn_set_checksum(head, txn_checksum(head, rest))
        offset = self.sb.journal_offset + self.tail * PAGE
        await self.metadata.write(offset, bytes(head) + rest)
        await self.metadata.flush()
        self.tail += hdr.total_pages
        self.seq += 1
        self.commits += 1

    async def checkpoint(self, counters: Counters) -> None:
        """Make the home pages durable, then start a new epoch (journal empty)."""
        await self.metadata.flush()
        self.sb.epoch += 1
        self.sb.counters = counters.copy()
        slot = self.sb.epoch % SUPERBLOCK_SLOTS
        await self.metadata.write(slot * PAGE, self.sb.pack())
        await self.metadata.flush()
        self.tail = 0
        self.seq = 0
        self.checkpoints += 1
