"""Compressed clusters: QEMU's raw-deflate stream (zlib, window 2^12, no header) or zstd.

References: QEMU docs/interop/qcow2.txt ("Compressed Clusters Descriptor",
header field compression_type).  The stored bytes of a compressed cluster
may end with unrelated data (the next compressed cluster shares the sector),
so decompression stops when it has produced one cluster, as QEMU's does
(block/qcow2-threads.c: the output buffer is one cluster).

Bounded, because the stream is untrusted: a few KiB of zstd can claim
gigabytes (a "bomb"), so no more than one cluster is ever produced or held,
and a zstd frame may not ask for a window larger than _MAX_ZSTD_WINDOW (the
decompressor allocates it up front; QEMU's frames use at most the cluster
size, 2 MiB).  A stream that yields less than a cluster is corrupt.
"""

from __future__ import annotations

import io
import zlib

import zstandard

from fusedisk.errors import CorruptImage, NotSupported
from fusedisk.formats.qcow2.layout import COMPRESSION_ZLIB, COMPRESSION_ZSTD

_MAX_ZSTD_WINDOW = 8 << 20


def decompress_cluster(data: bytes, ctype: int, cluster_size: int, where: str) -> bytes:
    """One cluster of guest data from its stored, compressed bytes."""
    try:
        if ctype == COMPRESSION_ZLIB:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)  # at most one cluster
        elif ctype == COMPRESSION_ZSTD:
            dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_ZSTD_WINDOW)
            with dctx.stream_reader(io.BytesIO(data), read_across_frames=False) as reader:
                out = reader.read(cluster_size)
                while len(out) < cluster_size:  # a reader may return less than asked
                    more = reader.read(cluster_size - len(out))
                    if not more:
                        break
                    out += more
        else:
            raise NotSupported(f"{where}: compression type {ctype} is not supported")
    except (zlib.error, ValueError, zstandard.ZstdError) as e:
        raise CorruptImage(f"{where}: a compressed cluster does not decompress: {e}") from None
    if len(out) != cluster_size:
        raise CorruptImage(
            f"{where}: a compressed cluster holds {len(out)} bytes instead of {cluster_size}"
        )
    return out
