"""What `fusedisk info IMAGE` shows: `qemu-img info` for every format fusedisk reads.

The format is probed from the file's first bytes (qcow2, LUKS, dedup metadata;
anything else is raw), the header parsed by the format's own code (qcow2
layout, luks_header, dedup layout), and the fields named as `qemu-img info
--output=json` names them, so a script can read either.  Nothing is written and
no secret is read: a LUKS header shows its cipher, hash, UUID and key slots, never
key material or digests.  A qcow2 backing chain is followed as QEMU resolves it
(a relative backing name is relative to the image's folder), at most 64 deep.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from fusedisk.errors import FuseDiskError
from fusedisk.filters.luks import header as luks_header
from fusedisk.filters.luks import luks2_volume
from fusedisk.formats.dedup import layout as dedup_layout
from fusedisk.formats.qcow2 import layout as qcow2_layout
from fusedisk.formats.qcow2.snapshots import read_snapshot_table

MAX_CHAIN = 64
HEAD_BYTES = 2 << 20  # a qcow2 header and its extensions lie in the first cluster (<= 2 MiB)


class InfoError(FuseDiskError):
    pass


def probe(head: bytes) -> str:
    if head[:4] == qcow2_layout.MAGIC:
        return "qcow2"
    if luks_header.probe(head) is not None:
        return "luks"
    if head[:8] == dedup_layout.MAGIC:
        return "dedup"
    return "raw"


def _pread(path: Path, length: int, offset: int = 0) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def _size(path: Path) -> int:
    """The file's size, or a block device's."""
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def image_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """One image's description, in `qemu-img info --output=json`'s terms."""
    try:
        st = os.stat(path)
        size = _size(path)
        head = _pread(path, HEAD_BYTES)
    except OSError as e:
        raise InfoError(f"image '{path}': {e.strerror}") from None
    fmt = fmt or probe(head)
    info: dict[str, Any] = {
        "filename": str(path),
        "format": fmt,
        "actual-size": st.st_blocks * 512,
    }
    if fmt == "qcow2":
        info.update(_qcow2(path, head, size))
    elif fmt == "luks":
        info.update(_luks(path, head, size))
    elif fmt == "dedup":
        info.update(_dedup(path, head))
    else:
        info["virtual-size"] = size
    info.setdefault("dirty-flag", False)
    return info


def _qcow2(path: Path, head: bytes, size: int) -> dict[str, Any]:
    h = qcow2_layout.parse_header(head, size, str(path))
    info: dict[str, Any] = {"virtual-size": h.size, "cluster-size": h.cluster_size}
    data: dict[str, Any] = {
        "compat": "1.1" if h.version == 3 else "0.10",
        "compression-type": qcow2_layout.COMPRESSION_NAMES.get(h.compression_type, "?"),
    }
    if h.version == 3:
        data.update({
            "lazy-refcounts": bool(h.compatible & qcow2_layout.COMPAT_LAZY_REFCOUNTS),
            "refcount-bits": h.refcount_bits,
            "corrupt": bool(h.incompatible & qcow2_layout.INCOMPAT_CORRUPT),
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
        info["full-backing-filename"] = str(backing_path(path, h.backing_file))
        if h.backing_format:
            info["backing-filename-format"] = h.backing_format
    info["dirty-flag"] = bool(h.incompatible & qcow2_layout.INCOMPAT_DIRTY)
    if h.nb_snapshots:
        info["snapshots"] = trio.run(_snapshots, path, h, size)
    return info


async def _snapshots(path: Path, h: qcow2_layout.Header, size: int) -> list[dict[str, Any]]:
    async def read(offset: int, length: int) -> bytes:
        return _pread(path, length, offset)

    snaps, _ = await read_snapshot_table(
        read, h.snapshots_offset, h.nb_snapshots, h.cluster_size, size, f"qcow2 image '{path}'"
    )
    return [{"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size} for s in snaps]


def _luks2(path: Path, size: int) -> dict[str, Any]:
    async def read(offset: int, length: int) -> bytes:
        return _pread(path, length, offset)

    async def load() -> luks2_volume.Luks2Volume:
        return await luks2_volume.load(read, size, size, f"LUKS image '{path}'")

    return luks2_volume.image_info(trio.run(load), size)


def _luks(path: Path, head: bytes, size: int) -> dict[str, Any]:
    if luks_header.probe(head) == 2:
        return _luks2(path, size)
    hdr = luks_header.parse_header(head, size, f"LUKS image '{path}'")
    mode, _, ivgen = hdr.cipher_mode.partition("-")
    key_bits = hdr.key_bytes * 8 // (2 if mode == "xts" else 1)  # XTS splits its key in two
    slots = []
    for slot in hdr.slots:
        entry: dict[str, Any] = {"active": slot.enabled}
        if slot.enabled:
            entry["iters"] = slot.iterations
        entry["key-offset"] = slot.key_offset * luks_header.SECTOR
        if slot.enabled:
            entry["stripes"] = slot.stripes
        slots.append(entry)
    return {
        "virtual-size": size - hdr.payload_bytes,
        "encrypted": True,
        "format-specific": {
            "type": "luks",
            "data": {
                "cipher-alg": f"{hdr.cipher_name}-{key_bits}",
                "cipher-mode": mode,
                "ivgen-alg": ivgen or "plain",
                "hash-alg": hdr.hash_spec,
                "uuid": hdr.uuid,
                "payload-offset": hdr.payload_bytes,
                "master-key-iters": hdr.mk_digest_iterations,
                "slots": slots,
            },
        },
    }


def _dedup(path: Path, head: bytes) -> dict[str, Any]:
    page = dedup_layout.PAGE
    sb, reasons = dedup_layout.pick_superblock([head[:page], head[page : 2 * page]])
    if sb is None:
        raise InfoError(f"dedup image '{path}': no valid superblock ({'; '.join(reasons)})")
    c = sb.counters
    bs = sb.block_size
    return {
        "virtual-size": sb.logical_size,
        "cluster-size": bs,
        "format-specific": {
            "type": "dedup",
            "data": {
                "version": sb.version,
                "uuid": sb.uuid.hex(),
                "epoch": sb.epoch,
                "block-size": bs,
                "physical-blocks": sb.physical_blocks,
                "metadata-size": sb.metadata_size,
                "journal-size": sb.journal_size,
                "index-buckets": sb.index_buckets,
                "logical-bytes-used": c.used_logical * bs,
                "physical-bytes-used": c.used_physical * bs,
                "dedup-ratio": round(c.used_logical / c.used_physical, 3)
                if c.used_physical
                else 1.0,
                "index-hits": c.index_hits,
            },
        },
    }


def backing_path(image: Path, name: str) -> Path:
    """QEMU's rule: a relative backing file name is relative to the image's folder."""
    backing = Path(name)
    return backing if backing.is_absolute() else image.parent / backing


def chain_info(path: Path, fmt: str | None = None) -> list[dict[str, Any]]:
    """The image and every image below it in its backing chain."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    current: Path | None = path
    while current is not None:
        if len(out) >= MAX_CHAIN:
            raise InfoError(f"image '{path}': the backing chain is deeper than {MAX_CHAIN}")
        try:
            st = os.stat(current)
        except OSError as e:
            raise InfoError(f"backing file '{current}' of '{path}': {e.strerror}") from None
        if (st.st_dev, st.st_ino) in seen:
            raise InfoError(f"image '{path}': the backing chain loops at '{current}'")
        seen.add((st.st_dev, st.st_ino))
        info = image_info(current, fmt)
        out.append(info)
        backing = info.get("full-backing-filename")
        fmt = info.get("backing-filename-format")
        current = Path(backing) if backing else None
    return out
