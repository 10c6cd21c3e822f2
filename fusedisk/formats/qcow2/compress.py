"""Compressed clusters: QEMU's raw-deflate stream (zlib, window 2^12, no header) or zstd.

References: QEMU docs/interop/qcow2.txt ("Compressed Clusters Descriptor",
header field compression_type).  The stored bytes of a compressed cluster
may end with unrelated data (the next compressed cluster shares the sector),
so decompression stops when it has produced one cluster.
"""

from __future__ import annotations

import zlib

import zstandard

from fusedisk.errors import CorruptImage, NotSupported
from fusedisk.formats.qcow2.layout import COMPRESSION_ZLIB, COMPRESSION_ZSTD


def decompress_cluster(data: bytes, ctype: int, cluster_size: int, where: str) -> bytes:
    """One cluster of guest data from its stored, compressed bytes."""
    try:
        if ctype == COMPRESSION_ZLIB:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
        elif ctype == COMPRESSION_ZSTD:
            out = zstandard.ZstdDecompressor().decompressobj().decompress(data)[:cluster_size]
        else:
            raise NotSupported(f"{where}: compression type {ctype} is not supported")
    except (zlib.error, ValueError, zstandard.ZstdError) as e:
        raise CorruptImage(f"{where}: a compressed cluster does not decompress: {e}") from None
    if len(out) != cluster_size:
        raise CorruptImage(
            f"{where}: a compressed cluster holds {len(out)} bytes instead of {cluster_size}"
        )
    return out
