"""Parsing and checking a qcow2 header: its fields, extensions, features and tables.

References: QEMU docs/interop/qcow2.txt ("Header", "Header extensions",
"Feature name table").  Every check that needs no other I/O than the first
cluster is made in `parse_header`, which raises CorruptImage (or NotSupported
for a well-formed feature fusedisk does not implement) with a sentence naming
the image.  The definitions it reads by are in layout.py.
"""

from __future__ import annotations

import itertools
import struct

from fusedisk.errors import CorruptImage, NotSupported
from fusedisk.formats.qcow2.layout import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPRESSION_NAMES,
    COMPRESSION_ZLIB,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    HEADER_V2,
    HEADER_V3,
    INCOMPAT_COMPRESSION,
    INCOMPAT_KNOWN,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
    MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
    Header,
)


def _ext_string(data: bytes, what: str, path: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise CorruptImage(f"qcow2 image '{path}': the {what} is not valid UTF-8") from None


def parse_header(buf: bytes, file_size: int, path: str) -> Header:
    """Parse and check the first cluster of an image (`buf` holds at least 4 KiB or the file).

    In QEMU's order: the header fields, the extensions (which name features), the
    feature bits, the static tables, then the backing file name.
    """
    where = f"qcow2 image '{path}'"
    h = _parse_fields(buf, where)
    ext_start = h.header_length if h.version == 3 else 72
    _parse_extensions(h, buf[: min(h.cluster_size, len(buf))], ext_start, where)
    _check_features(h, where)
    _check_static_tables(h, file_size, where)
    _parse_backing_name(h, buf, path, where)
    return h


def _parse_fields(buf: bytes, where: str) -> Header:
    """The version 2 fields, and those of version 3 (features, refcount width, length)."""
    if len(buf) < 72 or buf[:4] != MAGIC:
        raise CorruptImage(f"{where}: not a qcow2 image (bad magic)")
    fields = HEADER_V2.unpack_from(buf, 0)
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
            HEADER_V3.unpack_from(buf, 72)
        )
        if h.header_length < 104 or h.header_length % 8 or h.header_length > min(cs, len(buf)):
            raise CorruptImage(f"{where}: header_length {h.header_length} is invalid")
        if h.header_length > 104:
            h.compression_type = buf[104]
    if h.refcount_order > 6:
        raise CorruptImage(f"{where}: refcount_order {h.refcount_order} is above 6 (64 bits)")
    return h


def _check_features(h: Header, where: str) -> None:
    """Refuse unknown incompatible features, encryption, and inconsistent feature bits."""
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


def _check_static_tables(h: Header, file_size: int, where: str) -> None:
    """Sizes and offsets of the L1, refcount and snapshot tables: in the file, apart."""
    cs = h.cluster_size
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


def _parse_backing_name(h: Header, buf: bytes, path: str, where: str) -> None:
    """The backing file name, which must lie in the first cluster."""
    cs = h.cluster_size
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
