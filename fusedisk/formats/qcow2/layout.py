"""qcow2 on-disk layout: the header, its extensions, and the bit fields of table entries.

References: QEMU docs/interop/qcow2.txt ("Header", "Header extensions",
"Feature name table", "Cluster mapping", "Extended L2 Entries").  Only
definitions and parsing live here; the driver's logic is elsewhere.

Every check that needs no other I/O than the first cluster is made in
`parse_header`, which raises CorruptImage (or NotSupported for a well-formed
feature fusedisk does not implement) with a sentence naming the image.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field

from fusedisk.errors import CorruptImage, NotSupported, TooLarge

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

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 72..103


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


def _ext_string(data: bytes, what: str, path: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise CorruptImage(f"qcow2 image '{path}': the {what} is not valid UTF-8") from None


def parse_header(buf: bytes, file_size: int, path: str) -> Header:
    """Parse and check the first cluster of an image (`buf` holds at least 4 KiB or the file)."""
    where = f"qcow2 image '{path}'"
    if len(buf) < 72 or buf[:4] != MAGIC:
        raise CorruptImage(f"{where}: not a qcow2 image (bad magic)")
    fields = _V2.unpack_from(buf, 0)
    h = Header(*fields[1:])
    if h.version not in (2, 3):
        raise NotSupported(f"{where}: qcow2 version {h.version} is not supported (only 2 and 3)")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImage(
            f"{where}: cluster_bits {h.cluster_bits} is out of range "
            f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}, 512 B to 2 MiB)"
        )
    cs = h.cluster_size
    if h.version == 3:
        if len(buf) < 104:
            raise CorruptImage(f"{where}: the file ends inside the version 3 header")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order, h.header_length) = (
            _V3.unpack_from(buf, 72)
        )
        if h.header_length < 104 or h.header_length % 8 or h.header_length > min(cs, len(buf)):
            raise CorruptImage(f"{where}: header_length {h.header_length} is invalid")
        if h.header_length > 104:
            h.compression_type = buf[104]
    if h.refcount_order > 6:
        raise CorruptImage(f"{where}: refcount_order {h.refcount_order} is above 6 (64 bits)")

    ext_start = h.header_length if h.version == 3 else 72
    _parse_extensions(h, buf[: min(cs, len(buf))], ext_start, where)

    unknown = h.incompatible & ~INCOMPAT_KNOWN
    if unknown:
        names = []
        for bit in range(64):
            if unknown >> bit & 1:
                name = h.feature_names.get((0, bit))
                names.append(f"bit {bit}" + (f" ({name})" if name else ""))
        raise NotSupported(
            f"{where}: unknown incompatible feature {', '.join(names)}; refusing to open it"
        )
    if h.crypt_method != 0:
        kind = {1: "AES", 2: "LUKS"}.get(h.crypt_method, str(h.crypt_method))
        raise NotSupported(
            f"{where}: encrypted qcow2 ({kind}) is not supported; "
            "stack a luks node on a plain image instead"
        )
    if h.incompatible & INCOMPAT_COMPRESSION:
        if h.compression_type == COMPRESSION_ZLIB:
            raise CorruptImage(f"{where}: compression type bit set but compression_type is 0")
    elif h.compression_type != COMPRESSION_ZLIB:
        raise CorruptImage(f"{where}: compression_type set without its incompatible bit")
    if h.compression_type not in COMPRESSION_NAMES:
        raise NotSupported(f"{where}: compression type {h.compression_type} is not supported")
    if h.extended_l2 and h.cluster_bits < 14:
        raise CorruptImage(f"{where}: extended L2 entries need clusters of at least 16 KiB")
    if h.autoclear & AUTOCLEAR_DATA_FILE_RAW and not h.has_data_file:
        raise CorruptImage(f"{where}: data_file_raw is set without an external data file")

    # sizes and offsets of the static tables
    if h.size > (1 << 63) - 1:
        raise CorruptImage(f"{where}: virtual size {h.size} is absurd")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise CorruptImage(f"{where}: the L1 table ({h.l1_size} entries) is absurdly large")
    if h.l1_size < h.l1_entries_needed(h.size):
        raise CorruptImage(
            f"{where}: the L1 table ({h.l1_size} entries) is too small for the virtual size "
            f"{h.size}"
        )
    _check_table(where, "L1 table", h.l1_table_offset, h.l1_size * 8, cs, file_size)
    if h.refcount_table_clusters == 0:
        raise CorruptImage(f"{where}: the refcount table is empty")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise CorruptImage(
            f"{where}: the refcount table ({h.refcount_table_clusters} clusters) is absurdly large"
        )
    _check_table(
        where,
        "refcount table",
        h.refcount_table_offset,
        h.refcount_table_clusters * cs,
        cs,
        file_size,
    )
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise CorruptImage(f"{where}: {h.nb_snapshots} snapshots is absurd")
    if h.nb_snapshots:
        _check_table(where, "snapshot table", h.snapshots_offset, 40, cs, file_size)
    regions = [("header", 0, cs), ("refcount table", h.refcount_table_offset,
               h.refcount_table_clusters * cs)]  # fmt: skip
    if h.l1_size:
        regions.append(("L1 table", h.l1_table_offset, h.l1_size * 8))
    if h.nb_snapshots:
        regions.append(("snapshot table", h.snapshots_offset, 1))
    check_overlaps(where, regions, cs)

    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME:
            raise CorruptImage(f"{where}: the backing file name is longer than 1023 bytes")
        end = h.backing_file_offset + h.backing_file_size
        if end > cs or end > len(buf):
            raise CorruptImage(f"{where}: the backing file name lies outside the first cluster")
        raw = buf[h.backing_file_offset : end]
        h.backing_file = _ext_string(raw, "backing file name", path) or None
    if h.backing_file and h.data_file_raw:
        raise CorruptImage(f"{where}: a raw external data file cannot have a backing file")
    return h


def _parse_extensions(h: Header, buf: bytes, pos: int, where: str) -> None:
    seen: set[int] = set()
    while True:
        if pos + 8 > len(buf):
            # an image whose header fills the cluster exactly has no end marker
            return
        ext_type, length = struct.unpack_from(">II", buf, pos)
        if ext_type == EXT_END:
            return
        data_at = pos + 8
        if data_at + length > len(buf):
            raise CorruptImage(
                f"{where}: header extension {ext_type:#010x} runs past the first cluster"
            )
        data = buf[data_at : data_at + length]
        if ext_type in seen and ext_type != EXT_END:
            raise CorruptImage(f"{where}: header extension {ext_type:#010x} appears twice")
        seen.add(ext_type)
        if ext_type == EXT_BACKING_FORMAT:
            h.backing_format = _ext_string(data, "backing format", where)
        elif ext_type == EXT_DATA_FILE:
            h.data_file = _ext_string(data, "data file name", where)
        elif ext_type == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                kind, bit = data[i], data[i + 1]
                name = data[i + 2 : i + 48].split(b"\0", 1)[0].decode(errors="replace")
                h.feature_names[(kind, bit)] = name
        elif ext_type == EXT_BITMAPS:
            h.has_bitmaps = True
            h.bitmaps_ext = bytes(data)
        pos = data_at + (length + 7) // 8 * 8


def _check_table(where: str, what: str, offset: int, length: int, cs: int, fsize: int) -> None:
    if offset % cs:
        raise CorruptImage(f"{where}: the {what} offset {offset:#x} is not cluster-aligned")
    if length and (offset == 0 or offset + length > fsize):
        raise CorruptImage(
            f"{where}: the {what} at {offset:#x} ({length} bytes) lies past the end of the "
            f"file ({fsize} bytes); is the image truncated?"
        )


def check_overlaps(where: str, regions: list[tuple[str, int, int]], cs: int) -> None:
    """Refuse metadata regions (name, offset, length) that share a cluster."""
    spans = []
    for name, offset, length in regions:
        first = offset // cs
        last = (offset + max(length, 1) - 1) // cs
        spans.append((first, last, name, offset))
    spans.sort()
    for (_, last_a, name_a, off_a), (first_b, _, name_b, off_b) in itertools.pairwise(spans):
        if first_b <= last_a:
            raise CorruptImage(
                f"{where}: the {name_a} at {off_a:#x} overlaps the {name_b} at {off_b:#x}"
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
        _V2.pack(
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
        out += _V3.pack(
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
