"""qcow2 on-disk layout: the header, its extensions, and the bit fields of table entries.

References: QEMU docs/interop/qcow2.txt ("Header", "Header extensions",
"Feature name table", "Cluster mapping", "Extended L2 Entries").  Only
definitions and packing live here; parsing and checking a header is in
header.py, the driver's logic elsewhere.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from fusedisk.errors import TooLarge

MAGIC = b"QFI\xfb"

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW  # bitmaps: formats/qcow2/bitmaps.py

INCOMPAT_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# table entries
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55 of L1 and standard L2 entries
REFTABLE_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
SUBCLUSTERS = 32  # per cluster, with extended L2 entries
ALL_SUBCLUSTERS = (1 << SUBCLUSTERS) - 1

# header field offsets for in-place updates (big-endian)
OFF_BACKING_FILE = 8  # backing_file_offset (8 bytes), then backing_file_size (4)
OFF_CLUSTER_BITS = 20
OFF_SIZE = 24
OFF_L1_SIZE = 36
OFF_L1_OFFSET = 40
OFF_REFTABLE_OFFSET = 48
OFF_REFTABLE_CLUSTERS = 56
OFF_INCOMPAT = 72
OFF_AUTOCLEAR = 88
V2_HEADER_LENGTH = 72  # where a version 2 header's extensions start

MAX_CLUSTER_BITS = 21  # 2 MiB, QEMU's limit
MIN_CLUSTER_BITS = 9
MAX_L1_BYTES = 32 << 20  # QEMU's limits, kept so what opens here opens in QEMU
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023

HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
HEADER_V3 = struct.Struct(">QQQII")  # 72..103


@dataclass
class Header:
    """The fields of a qcow2 header, and what its extensions say."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    has_bitmaps: bool = False
    #: the bitmaps extension's bytes (formats/qcow2/bitmaps.py reads them)
    bitmaps_ext: bytes = b""
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear & AUTOCLEAR_DATA_FILE_RAW)

    def l1_entries_needed(self, size: int) -> int:
        clusters = -(-size // self.cluster_size)
        return -(-clusters // self.l2_entries)

    @property
    def max_size(self) -> int:
        """The largest virtual size whose L1 table stays within MAX_L1_BYTES (QEMU's cap:
        2 PiB with 64 KiB clusters, 1 PiB with extended L2 entries)."""
        return (MAX_L1_BYTES // 8) * self.l2_entries * self.cluster_size

    def check_size(self, size: int, where: str) -> None:
        """Refuse a virtual size beyond `max_size`, before any table is built for it."""
        if size > self.max_size:
            raise TooLarge(
                f"{where}: a virtual size of {size} bytes is too large for qcow2 with "
                f"{self.cluster_size}-byte clusters: its L1 table would pass QEMU's limit of "
                f"{MAX_L1_BYTES >> 20} MiB (at most {self.max_size} bytes; a larger "
                "cluster_size allows more)"
            )


def compressed_geometry(cluster_bits: int) -> tuple[int, int]:
    """(offset bits, sector-count mask) of a compressed cluster descriptor."""
    x = 62 - (cluster_bits - 8)
    return x, (1 << (62 - x)) - 1


def decode_compressed(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, stored length in bytes) of a compressed L2 entry."""
    x, mask = compressed_geometry(cluster_bits)
    offset = entry & ((1 << x) - 1)
    sectors = ((entry >> x) & mask) + 1
    return offset, sectors * 512 - (offset & 511)


def pack_header(h: Header, extensions: list[tuple[int, bytes]], backing: bytes | None) -> bytes:
    """The first cluster's bytes for a new image (create.py)."""
    out = bytearray(
        HEADER_V2.pack(
            MAGIC,
            h.version,
            h.backing_file_offset,
            h.backing_file_size,
            h.cluster_bits,
            h.size,
            h.crypt_method,
            h.l1_size,
            h.l1_table_offset,
            h.refcount_table_offset,
            h.refcount_table_clusters,
            h.nb_snapshots,
            h.snapshots_offset,
        )
    )
    if h.version == 3:
        out += HEADER_V3.pack(
            h.incompatible, h.compatible, h.autoclear, h.refcount_order, h.header_length
        )
        out += bytes(h.header_length - 104)
        if h.header_length > 104:
            out[104] = h.compression_type
    for ext_type, data in extensions:
        out += struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)
    out += bytes(8)  # end of extensions
    if backing is not None:
        out += backing
    return bytes(out)
