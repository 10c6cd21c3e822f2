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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Params:
    """The format parameters of a new image (create_qcow2's keywords, as qemu-img's -o)."""

    cluster_size: int
    version: int
    refcount_bits: int
    extended_l2: bool
    compression_type: str
    lazy_refcounts: bool
    data_file: str | None
    data_file_raw: bool

    @property
    def cluster_bits(self) -> int:
        return self.cluster_size.bit_length() - 1


@dataclass(frozen=True)
class _Layout:
    """Where the metadata of a new image lies, in clusters: header, refcount table,
    refcount blocks, L1 table, in that order from cluster 0."""

    table_clusters: int
    blocks: int
    l1_clusters: int

    @property
    def first_block(self) -> int:
        return 1 + self.table_clusters

    @property
    def total(self) -> int:
        return self.first_block + self.blocks + self.l1_clusters


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
    p = _Params(cluster_size, version, refcount_bits, extended_l2, compression_type,
                lazy_refcounts, data_file, data_file_raw)  # fmt: skip
    _check_params(p, backing, where)
    size, backing_fmt = _resolve_size(path, size, backing, backing_fmt, where)
    h = _new_header(p, size)
    h.check_size(size, where)  # an L1 table QEMU would refuse, or too big to build
    lay = _plan_layout(h, p)
    head = _pack_head(h, p, backing, backing_fmt, where)
    cs = cluster_size
    reftable = bytearray(lay.table_clusters * cs)
    for i in range(lay.blocks):
        struct.pack_into(">Q", reftable, i * 8, (lay.first_block + i) * cs)
    refblocks = bytearray(lay.blocks * cs)
    for c in range(lay.total):
        _set_refcount(refblocks, c, 1, refcount_bits)

    if data_file:
        _prepare_data_file(path, data_file, size, where)
    create_file(
        path,
        where,
        chunks=((0, head), (cs, bytes(reftable)), (lay.first_block * cs, bytes(refblocks))),
        size=lay.total * cs,
        replace=overwrite,
    )


def _check_params(p: _Params, backing: str | None, where: str) -> None:
    """Refuse format parameters QEMU would refuse, each with its reason."""
    cluster_bits = p.cluster_bits
    if p.cluster_size != 1 << cluster_bits or not 9 <= cluster_bits <= 21:
        raise SpecError(f"{where}: cluster_size must be a power of two from 512 to 2M")
    if p.version not in (2, 3):
        raise SpecError(f"{where}: version must be 2 (compat=0.10) or 3 (compat=1.1)")
    if p.refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise SpecError(f"{where}: refcount_bits must be a power of two from 1 to 64")
    if p.compression_type not in ("zlib", "zstd"):
        raise SpecError(f"{where}: compression_type must be zlib or zstd")
    if p.version == 2 and (
        p.refcount_bits != 16
        or p.extended_l2
        or p.compression_type != "zlib"
        or p.lazy_refcounts
        or p.data_file
    ):
        raise SpecError(
            f"{where}: version 2 images have 16-bit refcounts and no extended L2, zstd, "
            "lazy refcounts or data file"
        )
    if p.extended_l2 and cluster_bits < 14:
        raise SpecError(f"{where}: extended_l2 needs a cluster size of at least 16K")
    if p.data_file_raw and not p.data_file:
        raise SpecError(f"{where}: data_file_raw needs data_file")
    if p.data_file_raw and backing:
        raise SpecError(f"{where}: a raw data file cannot have a backing file")


def _resolve_size(
    path: Path, size: int | None, backing: str | None, backing_fmt: str | None, where: str
) -> tuple[int, str | None]:
    """The virtual size and backing format: given, or taken from the backing file."""
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
    return size, backing_fmt


def _new_header(p: _Params, size: int) -> Header:
    """The header fields and feature bits; the table offsets come from `_plan_layout`."""
    h = Header(
        version=p.version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=p.cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=0,
        l1_table_offset=0,
        refcount_table_offset=0,
        refcount_table_clusters=0,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=p.refcount_bits.bit_length() - 1,
        header_length=112 if p.version == 3 else 72,
    )
    if p.extended_l2:
        h.incompatible |= INCOMPAT_EXTL2
    if p.compression_type == "zstd":
        h.incompatible |= INCOMPAT_COMPRESSION
        h.compression_type = COMPRESSION_ZSTD
    else:
        h.compression_type = COMPRESSION_ZLIB
    if p.lazy_refcounts:
        h.compatible |= COMPAT_LAZY_REFCOUNTS
    if p.data_file:
        h.incompatible |= INCOMPAT_DATA_FILE
        if p.data_file_raw:
            h.autoclear |= AUTOCLEAR_DATA_FILE_RAW
    return h


def _plan_layout(h: Header, p: _Params) -> _Layout:
    """Size the refcount table and blocks to count all the metadata, themselves included,
    and set the header's table offsets."""
    cs = p.cluster_size
    h.l1_size = h.l1_entries_needed(h.size)
    l1_clusters = -(-h.l1_size * 8 // cs)
    per_block = cs * 8 // p.refcount_bits
    blocks, table_clusters = 1, 1
    while True:
        total = 1 + table_clusters + blocks + l1_clusters
        need_blocks = -(-total // per_block)
        need_table = -(-need_blocks * 8 // cs)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    lay = _Layout(table_clusters, blocks, l1_clusters)
    h.refcount_table_offset = cs
    h.refcount_table_clusters = table_clusters
    h.l1_table_offset = (lay.first_block + blocks) * cs
    return lay


def _pack_head(
    h: Header, p: _Params, backing: str | None, backing_fmt: str | None, where: str
) -> bytes:
    """Cluster 0's bytes: the header, its extensions, then the backing file name."""
    extensions: list[tuple[int, bytes]] = []
    if backing is not None:
        extensions.append((EXT_BACKING_FORMAT, str(backing_fmt).encode()))
    if p.data_file:
        extensions.append((EXT_DATA_FILE, p.data_file.encode()))
    extensions.append((EXT_FEATURE_TABLE, _feature_table()))
    backing_bytes = backing.encode() if backing is not None else None
    head = pack_header(h, extensions, None)
    if backing_bytes is not None:
        h.backing_file_offset = len(head)
        h.backing_file_size = len(backing_bytes)
    head = pack_header(h, extensions, backing_bytes)
    if len(head) > p.cluster_size:
        raise SpecError(f"{where}: the header does not fit in one {p.cluster_size}-byte cluster")
    return head


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
