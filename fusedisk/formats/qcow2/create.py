"""Making new qcow2 images: `fusedisk create -f qcow2` and external snapshots use this.

References: QEMU docs/interop/qcow2.txt.  The layout is the one qemu-img
makes: the header (with its extensions and the backing file name) in
cluster 0, then the refcount table, the refcount blocks that count the
metadata, and the L1 table; no L2 table and no data yet.

The I/O is a few small writes and one fsync, done inline (synchronously):
callers in trio may call it directly or hand it to a thread.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from fusedisk.errors import OpenError, SpecError
from fusedisk.formats.qcow2.layout import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
    INCOMPAT_NAMES,
    MAX_BACKING_NAME,
    Header,
    pack_header,
)
from fusedisk.graph import registry
from fusedisk.graph.options import Option, option_table
from fusedisk.hostio.files import check_kind, create_file

_COMPAT_NAMES = {0: "lazy refcounts"}
_AUTOCLEAR_NAMES = {0: "bitmaps", 1: "raw external data"}


def _feature_table() -> bytes:
    out = b""
    for kind, names in ((0, INCOMPAT_NAMES), (1, _COMPAT_NAMES), (2, _AUTOCLEAR_NAMES)):
        for bit, name in names.items():
            out += bytes([kind, bit]) + name.encode().ljust(46, b"\0")
    return out


#: `fusedisk create -f qcow2 -o ...`: qemu-img's option names
CREATE_OPTIONS = option_table(
    Option("cluster_size", "size", 65536, "cluster size, 512 to 2M"),
    Option("compat", "str", "1.1", "format version", choices=("0.10", "1.1", "v2", "v3")),
    Option("refcount_bits", "int", 16, "refcount width", choices=(1, 2, 4, 8, 16, 32, 64)),
    Option("extended_l2", "bool", False, "32 subclusters per cluster"),
    Option("compression_type", "str", "zlib", "zlib or zstd", choices=("zlib", "zstd")),
    Option("lazy_refcounts", "bool", False, "set the lazy refcounts compatible bit"),
    Option("data_file", "str", None, "keep guest data in this external file"),
    Option("data_file_raw", "bool", False, "keep the data file a valid raw image"),
)


def create_with_options(
    path: str | Path,
    size: int | None,
    o: dict[str, Any],
    backing: str | None,
    backing_fmt: str | None,
) -> None:
    """`create_qcow2` from CREATE_OPTIONS' parsed values."""
    create_qcow2(
        path,
        size,
        backing,
        backing_fmt,
        o["cluster_size"],
        version=2 if o["compat"] in ("0.10", "v2") else 3,
        refcount_bits=o["refcount_bits"],
        extended_l2=o["extended_l2"],
        compression_type=o["compression_type"],
        lazy_refcounts=o["lazy_refcounts"],
        data_file=o["data_file"],
        data_file_raw=o["data_file_raw"],
    )


def create_qcow2(
    path: str | Path,
    size: int | None,
    backing: str | None = None,
    backing_fmt: str | None = None,
    cluster_size: int = 65536,
    *,
    version: int = 3,
    refcount_bits: int = 16,
    extended_l2: bool = False,
    compression_type: str = "zlib",
    lazy_refcounts: bool = False,
    data_file: str | None = None,
    data_file_raw: bool = False,
    overwrite: bool = False,
) -> None:
    """Create an empty qcow2 image at `path`.

    `backing` is stored as given; a relative name is resolved against the
    folder of `path` (as QEMU does).  Without `size`, the backing file's
    size is used.  `backing_fmt` is probed when not given.  Refuses to
    replace an existing file unless `overwrite`, which unlinks the old name and
    creates a new file (never writing through a symlink planted at the name:
    O_EXCL|O_NOFOLLOW, docs/security.md).  Raises SpecError for bad
    parameters, OpenError when a file cannot be read or written.
    """
    path = Path(path)
    where = f"cannot create '{path}'"
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cluster_bits or not 9 <= cluster_bits <= 21:
        raise SpecError(f"{where}: cluster_size must be a power of two from 512 to 2M")
    if version not in (2, 3):
        raise SpecError(f"{where}: version must be 2 (compat=0.10) or 3 (compat=1.1)")
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise SpecError(f"{where}: refcount_bits must be a power of two from 1 to 64")
    if compression_type not in ("zlib", "zstd"):
        raise SpecError(f"{where}: compression_type must be zlib or zstd")
    if version == 2 and (
        refcount_bits != 16
        or extended_l2
        or compression_type != "zlib"
        or lazy_refcounts
        or data_file
    ):
        raise SpecError(
            f"{where}: version 2 images have 16-bit refcounts and no extended L2, zstd, "
            "lazy refcounts or data file"
        )
    if extended_l2 and cluster_bits < 14:
        raise SpecError(f"{where}: extended_l2 needs a cluster size of at least 16K")
    if data_file_raw and not data_file:
        raise SpecError(f"{where}: data_file_raw needs data_file")
    if data_file_raw and backing:
        raise SpecError(f"{where}: a raw data file cannot have a backing file")
    if backing is not None:
        if len(backing.encode()) > MAX_BACKING_NAME:
            raise SpecError(f"{where}: the backing file name is longer than 1023 bytes")
        resolved = backing if os.path.isabs(backing) else str(path.parent / backing)
        backing_where = f"{where}: backing file '{resolved}'"
        if backing_fmt is None:
            backing_fmt = registry.image_driver(resolved, None, backing_where).driver
        if size is None:
            size = registry.virtual_size(resolved, backing_fmt, backing_where)
        if not backing_fmt or len(backing_fmt.encode()) > 64:
            # any driver name is stored: fusedisk opens an overlay's backing from the spec;
            # from the header it follows qcow2 and raw only (as documented)
            raise SpecError(f"{where}: backing format {backing_fmt!r} is not a format name")
    if size is None:
        raise SpecError(f"{where}: a size is needed (or a backing file to take it from)")
    if size < 0:
        raise SpecError(f"{where}: the size cannot be negative")

    order = refcount_bits.bit_length() - 1
    h = Header(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=0,
        l1_table_offset=0,
        refcount_table_offset=0,
        refcount_table_clusters=0,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=order,
        header_length=112 if version == 3 else 72,
    )
    if extended_l2:
        h.incompatible |= INCOMPAT_EXTL2
    if compression_type == "zstd":
        h.incompatible |= INCOMPAT_COMPRESSION
        h.compression_type = COMPRESSION_ZSTD
    else:
        h.compression_type = COMPRESSION_ZLIB
    if lazy_refcounts:
        h.compatible |= COMPAT_LAZY_REFCOUNTS
    if data_file:
        h.incompatible |= INCOMPAT_DATA_FILE
        if data_file_raw:
            h.autoclear |= AUTOCLEAR_DATA_FILE_RAW

    h.check_size(size, where)  # an L1 table QEMU would refuse, or too big to build
    # metadata layout: header, refcount table, refcount blocks, L1 table
    cs = cluster_size
    h.l1_size = h.l1_entries_needed(size)
    l1_clusters = -(-h.l1_size * 8 // cs)
    per_block = cs * 8 // refcount_bits
    blocks, table_clusters = 1, 1
    while True:
        total = 1 + table_clusters + blocks + l1_clusters
        need_blocks = -(-total // per_block)
        need_table = -(-need_blocks * 8 // cs)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    h.refcount_table_offset = cs
    h.refcount_table_clusters = table_clusters
    first_block = 1 + table_clusters
    h.l1_table_offset = (first_block + blocks) * cs
    total = first_block + blocks + l1_clusters

    extensions: list[tuple[int, bytes]] = []
    if backing is not None:
        extensions.append((EXT_BACKING_FORMAT, str(backing_fmt).encode()))
    if data_file:
        extensions.append((EXT_DATA_FILE, data_file.encode()))
    extensions.append((EXT_FEATURE_TABLE, _feature_table()))
    backing_bytes = backing.encode() if backing is not None else None
    head = pack_header(h, extensions, None)
    if backing_bytes is not None:
        h.backing_file_offset = len(head)
        h.backing_file_size = len(backing_bytes)
    head = pack_header(h, extensions, backing_bytes)
    if len(head) > cs:
        raise SpecError(f"{where}: the header does not fit in one {cs}-byte cluster")

    reftable = bytearray(table_clusters * cs)
    for i in range(blocks):
        struct.pack_into(">Q", reftable, i * 8, (first_block + i) * cs)
    refblocks = bytearray(blocks * cs)
    for c in range(total):
        _set_refcount(refblocks, c, 1, refcount_bits)

    if data_file:
        _prepare_data_file(path, data_file, size, where)
    create_file(
        path,
        where,
        chunks=((0, head), (cs, bytes(reftable)), (first_block * cs, bytes(refblocks))),
        size=total * cs,
        replace=overwrite,
    )


def _prepare_data_file(path: Path, data_file: str, size: int, where: str) -> None:
    """An external data file may exist already (QEMU reuses it); it is grown to `size`."""
    data_path = data_file if os.path.isabs(data_file) else str(path.parent / data_file)
    try:
        dfd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as e:
        raise OpenError(f"{where}: data file '{data_path}': {e.strerror}") from None
    try:
        check_kind(os.fstat(dfd), data_path, where)
        if os.fstat(dfd).st_size < size:
            os.ftruncate(dfd, size)
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _set_refcount(blocks: bytearray, cluster: int, value: int, bits: int) -> None:
    if bits >= 8:
        width = bits // 8
        blocks[cluster * width : cluster * width + width] = value.to_bytes(width, "big")
        return
    bit = cluster * bits
    byte, shift = bit // 8, bit % 8
    mask = ((1 << bits) - 1) << shift
    blocks[byte] = (blocks[byte] & ~mask) | (value << shift)
