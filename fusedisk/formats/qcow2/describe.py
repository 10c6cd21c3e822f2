"""What `fusedisk info` shows of a qcow2 image, in `qemu-img info --output=json`'s names.

Reads the header (with its extensions), the snapshot table and the bitmap directory;
writes nothing.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from fusedisk.formats.qcow2 import bitmaps, layout
from fusedisk.formats.qcow2.header import parse_header
from fusedisk.formats.qcow2.snapshots import read_snapshot_table
from fusedisk.hostio.files import backing_path, open_host_file

HEAD_BYTES = 2 << 20  # a qcow2 header and its extensions lie in the first cluster (<= 2 MiB)


def describe(path: str) -> dict[str, Any]:
    where = f"qcow2 image '{path}'"
    fd, _ = open_host_file(path, False, where)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        h = parse_header(os.pread(fd, HEAD_BYTES, 0), size, path)
        info = _header_info(path, h)
        if h.nb_snapshots:
            info["snapshots"] = trio.run(_snapshots, fd, h, size, where)
        if h.has_bitmaps and h.autoclear & layout.AUTOCLEAR_BITMAPS:
            count, dsize, doff = bitmaps.directory_location(h.bitmaps_ext, h.cluster_size, size,
                                                            where)  # fmt: skip
            entries = bitmaps.parse_directory(os.pread(fd, dsize, doff), count, where)
            info["format-specific"]["data"]["bitmaps"] = bitmaps.describe_entries(entries)
    finally:
        os.close(fd)
    return info


def _header_info(path: str, h: layout.Header) -> dict[str, Any]:
    info: dict[str, Any] = {"virtual-size": h.size, "cluster-size": h.cluster_size}
    data: dict[str, Any] = {
        "compat": "1.1" if h.version == 3 else "0.10",
        "compression-type": layout.COMPRESSION_NAMES.get(h.compression_type, "?"),
    }
    if h.version == 3:
        data.update({
            "lazy-refcounts": bool(h.compatible & layout.COMPAT_LAZY_REFCOUNTS),
            "refcount-bits": h.refcount_bits,
            "corrupt": bool(h.incompatible & layout.INCOMPAT_CORRUPT),
            "extended-l2": h.extended_l2,
        })  # fmt: skip
    else:
        data["refcount-bits"] = 16
    if h.data_file is not None:
        data["data-file"] = h.data_file
        data["data-file-raw"] = h.data_file_raw
    info["format-specific"] = {"type": "qcow2", "data": data}
    if h.backing_file:
        info["backing-filename"] = h.backing_file
        info["full-backing-filename"] = backing_path(path, h.backing_file)
        if h.backing_format:
            info["backing-filename-format"] = h.backing_format
    info["dirty-flag"] = bool(h.incompatible & layout.INCOMPAT_DIRTY)
    return info


async def _snapshots(fd: int, h: layout.Header, size: int, where: str) -> list[dict[str, Any]]:
    async def read(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    snaps, _ = await read_snapshot_table(
        read, h.snapshots_offset, h.nb_snapshots, h.cluster_size, size, where
    )
    return [{"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size} for s in snaps]
