"""On-disk structures of the dedup format (docs/formats/dedup.md, byte by byte).

The `metadata` child holds everything but the data blocks, in 4 KiB pages:

    page 0, 1     superblock, two slots written alternately (a torn write leaves the other)
    journal       write-ahead log of metadata page images, replayed on open
    map           logical block -> physical block + 1 (0: the block reads as zeroes)
    pbt           physical block table: refcount and content hash of every physical block
    index         content index: hash tag -> physical block, in fixed-size buckets

The `data` child holds physical block `p` at byte `p * block_size`, nothing else.
All integers are little-endian.  This module only packs and unpacks (the map
and table entries, and where they live, are in entries.py); the logic lives
in journal.py, index.py, allocator.py and volume.py.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

import xxhash

PAGE = 4096
MAGIC = b"FDDEDUP\x00"
VERSION = 1
SUPERBLOCK_SLOTS = 2

#: feature bits: an unknown incompatible bit refuses the image, an unknown
#: read-only-compatible bit allows a read-only open; none are defined yet
INCOMPAT_KNOWN = 0
RO_COMPAT_KNOWN = 0
COMPAT_KNOWN = 0

MAP_ENTRY = 8
MAP_PER_PAGE = PAGE // MAP_ENTRY  # 512
PBT_ENTRY = 32
PBT_PER_PAGE = PAGE // PBT_ENTRY  # 128
BUCKET_HEADER = 16
BUCKET_ENTRY = 16
BUCKET_SLOTS = (PAGE - BUCKET_HEADER) // BUCKET_ENTRY  # 255
#: buckets are sized so the index is about two thirds full when every block is unique
BUCKET_TARGET_LOAD = 170

TXN_MAGIC = b"FDDJTXN\x00"
DEFAULT_JOURNAL_SIZE = 16 << 20
MIN_JOURNAL_SIZE = 256 << 10

MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1 << 20
#: logical blocks are at most 2**40 (4 PiB at 4 KiB); map entries have room to spare
MAX_BLOCKS = 1 << 40

_COUNTERS = struct.Struct("<5Q")
_SB_HEAD = struct.Struct("<8sIIQQQIIQQQ")  # magic .. physical_blocks (72 bytes)
_SB_REGIONS = struct.Struct("<10Q")  # journal, map, pbt, index (offset, size), buckets, md size
_SB_TAIL = struct.Struct("<Q")  # epoch
_CHECKSUM_AT = PAGE - 8


def checksum(*parts: bytes | bytearray | memoryview) -> int:
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return h.intdigest()


@dataclass
class Counters:
    """The image-wide counters, saved with every transaction and checkpoint."""

    hwm: int = 0  # physical blocks at and above this were never handed out
    used_physical: int = 0  # physical blocks with a refcount above zero
    used_logical: int = 0  # logical blocks mapped to a physical block
    index_hits: int = 0  # blocks written by sharing an existing block
    verified_collisions: int = 0  # hash hits whose bytes differed

    def pack(self) -> bytes:
        return _COUNTERS.pack(
            self.hwm,
            self.used_physical,
            self.used_logical,
            self.index_hits,
            self.verified_collisions,
        )

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> Counters:
        return cls(*_COUNTERS.unpack(raw))

    def copy(self) -> Counters:
        return Counters(**vars(self))


def _up(n: int, to: int) -> int:
    return -(-n // to) * to


def default_physical_blocks(logical_blocks: int) -> int:
    """Room for every logical block to be unique, plus headroom for writes in flight."""
    return logical_blocks + min(4096, max(256, logical_blocks // 16))


@dataclass
class Superblock:
    """Page 0 or 1 of `metadata`: the geometry, the journal epoch, the counters."""

    block_size: int
    logical_size: int
    logical_blocks: int
    physical_blocks: int
    journal_offset: int
    journal_size: int
    map_offset: int
    map_size: int
    pbt_offset: int
    pbt_size: int
    index_offset: int
    index_size: int
    index_buckets: int
    metadata_size: int
    epoch: int = 1
    counters: Counters = field(default_factory=Counters)
    uuid: bytes = b"\0" * 16
    version: int = VERSION
    incompat: int = 0
    compat: int = 0
    ro_compat: int = 0

    @classmethod
    def create(
        cls,
        logical_size: int,
        block_size: int,
        physical_blocks: int | None = None,
        journal_size: int = DEFAULT_JOURNAL_SIZE,
    ) -> Superblock:
        """Compute the layout of a new image (regions page-aligned, in this order)."""
        logical_blocks = -(-logical_size // block_size)
        if physical_blocks is None:
            physical_blocks = default_physical_blocks(logical_blocks)
        journal_size = _up(journal_size, PAGE)
        map_size = _up(logical_blocks * MAP_ENTRY, PAGE)
        pbt_size = _up(physical_blocks * PBT_ENTRY, PAGE)
        buckets = max(1, -(-physical_blocks // BUCKET_TARGET_LOAD))
        journal_offset = SUPERBLOCK_SLOTS * PAGE
        map_offset = journal_offset + journal_size
        pbt_offset = map_offset + map_size
        index_offset = pbt_offset + pbt_size
        index_size = buckets * PAGE
        return cls(
            block_size=block_size,
            logical_size=logical_blocks * block_size,
            logical_blocks=logical_blocks,
            physical_blocks=physical_blocks,
            journal_offset=journal_offset,
            journal_size=journal_size,
            map_offset=map_offset,
            map_size=map_size,
            pbt_offset=pbt_offset,
            pbt_size=pbt_size,
            index_offset=index_offset,
            index_size=index_size,
            index_buckets=buckets,
            metadata_size=index_offset + index_size,
            uuid=uuid.uuid4().bytes,
        )

    # -- pages of each region (absolute page numbers in `metadata`) ------------

    @property
    def map_first_page(self) -> int:
        return self.map_offset // PAGE

    @property
    def pbt_first_page(self) -> int:
        return self.pbt_offset // PAGE

    @property
    def index_first_page(self) -> int:
        return self.index_offset // PAGE

    @property
    def journal_pages(self) -> int:
        return self.journal_size // PAGE

    def journaled_page(self, pno: int) -> bool:
        """Pages a transaction may carry: the map and the physical block table."""
        return self.map_offset // PAGE <= pno < self.index_offset // PAGE

    # -- (un)packing -----------------------------------------------------------

    def pack(self) -> bytes:
        buf = bytearray(PAGE)
        _SB_HEAD.pack_into(
            buf,
            0,
            MAGIC,
            self.version,
            PAGE,
            self.incompat,
            self.compat,
            self.ro_compat,
            self.block_size,
            0,
            self.logical_size,
            self.logical_blocks,
            self.physical_blocks,
        )
        _SB_REGIONS.pack_into(
            buf,
            72,
            self.journal_offset,
            self.journal_size,
            self.map_offset,
            self.map_size,
            self.pbt_offset,
            self.pbt_size,
            self.index_offset,
            self.index_size,
            self.index_buckets,
            self.metadata_size,
        )
        _SB_TAIL.pack_into(buf, 152, self.epoch)
        buf[160:200] = self.counters.pack()
        buf[200:216] = self.uuid
        struct.pack_into("<Q", buf, _CHECKSUM_AT, checksum(buf[:_CHECKSUM_AT]))
        return bytes(buf)

    @classmethod
    def unpack(cls, raw: bytes) -> Superblock | str:
        """The superblock in `raw`, or the reason it is not a valid one."""
        if len(raw) < PAGE:
            return "too short"
        if raw[:8] != MAGIC:
            return "bad magic"
        (stored,) = struct.unpack_from("<Q", raw, _CHECKSUM_AT)
        if stored != checksum(raw[:_CHECKSUM_AT]):
            return "bad checksum"
        (_, version, page, incompat, compat, ro_compat, block_size, _, lsize, lblocks, pblocks) = (
            _SB_HEAD.unpack_from(raw, 0)
        )
        (jo, js, mo, ms, po, ps, io, is_, buckets, md_size) = _SB_REGIONS.unpack_from(raw, 72)
        (epoch,) = _SB_TAIL.unpack_from(raw, 152)
        sb = cls(
            block_size,
            lsize,
            lblocks,
            pblocks,
            jo,
            js,
            mo,
            ms,
            po,
            ps,
            io,
            is_,
            buckets,
            md_size,
            epoch=epoch,
            counters=Counters.unpack(raw[160:200]),
            uuid=bytes(raw[200:216]),
            version=version,
            incompat=incompat,
            compat=compat,
            ro_compat=ro_compat,
        )
        if page != PAGE:
            return f"unsupported page size {page}"
        return sb

    def validate(self) -> str | None:
        """The first inconsistency of the geometry, or None."""
        b = self.block_size
        if self.version != VERSION:
            return f"unsupported version {self.version}"
        if b < MIN_BLOCK_SIZE or b > MAX_BLOCK_SIZE or b & (b - 1):
            return f"invalid block size {b}"
        if not 0 < self.logical_blocks <= MAX_BLOCKS:
            return f"invalid logical block count {self.logical_blocks}"
        if self.logical_size != self.logical_blocks * b:
            return "logical size does not match the block count"
        if not 0 < self.physical_blocks <= MAX_BLOCKS:
            return f"invalid physical block count {self.physical_blocks}"
        expected = [
            ("journal", self.journal_offset, self.journal_size, SUPERBLOCK_SLOTS * PAGE),
            ("map", self.map_offset, self.map_size, self.journal_offset + self.journal_size),
            ("pbt", self.pbt_offset, self.pbt_size, self.map_offset + self.map_size),
            ("index", self.index_offset, self.index_size, self.pbt_offset + self.pbt_size),
        ]
        for name, offset, size, where in expected:
            if offset != where or offset % PAGE or size % PAGE:
                return f"the {name} region is misplaced"
        if self.journal_size < MIN_JOURNAL_SIZE:
            return "the journal is too small"
        if self.map_size < self.logical_blocks * MAP_ENTRY:
            return "the map region is too small"
        if self.pbt_size < self.physical_blocks * PBT_ENTRY:
            return "the physical block table is too small"
        if self.index_buckets < 1 or self.index_size != self.index_buckets * PAGE:
            return "the index region does not match its bucket count"
        if self.metadata_size != self.index_offset + self.index_size:
            return "the metadata size does not match the regions"
        c = self.counters
        if not (
            c.used_physical <= c.hwm <= self.physical_blocks
            and c.used_logical <= self.logical_blocks
        ):
            return "the counters are out of range"
        return None


def pick_superblock(slots: list[bytes]) -> tuple[Superblock | None, list[str]]:
    """The valid slot with the highest epoch, and why the others were not used."""
    best: Superblock | None = None
    reasons: list[str] = []
    for i, raw in enumerate(slots):
        sb = Superblock.unpack(raw)
        if isinstance(sb, str):
            reasons.append(f"slot {i}: {sb}")
            continue
        if best is None or sb.epoch > best.epoch:
            best = sb
    return best, reasons


# -- journal transactions -------------------------------------------------------

_TXN_HEAD = struct.Struct("<8sQQII")  # magic, epoch, seq, n_pages, key_pages (32 bytes)
_TXN_COUNTERS_AT = 32


@dataclass
class TxnHeader:
    """The first page of a journal transaction; key pages and page images follow."""

    epoch: int
    seq: int
    n_pages: int
    counters: Counters

    @property
    def key_pages(self) -> int:
        return -(-self.n_pages * 8 // PAGE)

    @property
    def total_pages(self) -> int:
        return 1 + self.key_pages + self.n_pages

    def pack_head(self) -> bytearray:
        """The header page with its checksum field still zero."""
        buf = bytearray(PAGE)
        _TXN_HEAD.pack_into(buf, 0, TXN_MAGIC, self.epoch, self.seq, self.n_pages, self.key_pages)
        buf[_TXN_COUNTERS_AT : _TXN_COUNTERS_AT + _COUNTERS.size] = self.counters.pack()
        return buf

    @classmethod
    def unpack(cls, raw: bytes) -> TxnHeader | None:
        if raw[:8] != TXN_MAGIC:
            return None
        _, epoch, seq, n_pages, key_pages = _TXN_HEAD.unpack_from(raw, 0)
        hdr = cls(
            epoch,
            seq,
            n_pages,
            Counters.unpack(raw[_TXN_COUNTERS_AT : _TXN_COUNTERS_AT + _COUNTERS.size]),
        )
        if key_pages != hdr.key_pages:
            return None
        return hdr


def txn_stored_checksum(head: bytes | bytearray) -> int:
    return int(struct.unpack_from("<Q", head, _CHECKSUM_AT)[0])


def txn_set_checksum(head: bytearray, value: int) -> None:
    struct.pack_into("<Q", head, _CHECKSUM_AT, value)


def txn_checksum(head: bytes | bytearray, rest: bytes | bytearray | memoryview) -> int:
    """Checksum of a transaction: its header page (checksum field as zero) and the rest."""
    return checksum(head[:_CHECKSUM_AT], rest)
