"""Opening a dedup image: find its superblock or format empty children, then replay.

`find_or_format` reads the two superblock slots of `metadata` and picks the
valid one with the higher epoch; when neither holds the magic and the node has
`format = true`, it formats the children, but only if both read as empty (it
names what they seem to hold otherwise).  `replay` brings the journal's
committed transactions home (journal.py); a read-only node keeps them in
memory instead, as an overlay over `metadata`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from fusedisk.errors import CorruptImage, OpenError
from fusedisk.formats.dedup.journal import Journal
from fusedisk.formats.dedup.layout import (
    INCOMPAT_KNOWN,
    MAGIC,
    PAGE,
    RO_COMPAT_KNOWN,
    SUPERBLOCK_SLOTS,
    Counters,
    Superblock,
    default_physical_blocks,
    pick_superblock,
)
from fusedisk.formats.dedup.store import BlockStore
from fusedisk.graph.extents import Status

log = logging.getLogger("fusedisk")

MiB = 1 << 20

#: headers of other formats, to name what a child holds when refusing to format it
_KNOWN_HEADERS = (
    (0, b"QFI\xfb", "a qcow2 image"),
    (0, b"LUKS\xba\xbe", "a LUKS header"),
    (0, MAGIC, "a dedup metadata superblock"),
    (0, b"FDDJTXN\x00", "a dedup journal"),
    (512, b"EFI PART", "a GPT partition table"),
    (0x438, b"\x53\xef", "an ext2/3/4 filesystem"),
    (510, b"\x55\xaa", "a partition table or boot sector"),
)
_ZERO_MIB = bytes(MiB)


async def find_or_format(
    name: str,
    options: Mapping[str, Any],
    md: BlockStore,
    dt: BlockStore,
    read_only: bool,
) -> Superblock:
    """The image's superblock, formatting empty children first if the options ask."""
    sb = await read_superblock(name, md, read_only)
    if sb is None:
        return await _format(name, options, md, dt, read_only)
    if options["format"]:
        _check_format_options_match(name, options, md, sb)
    return sb


async def read_superblock(name: str, md: BlockStore, read_only: bool) -> Superblock | None:
    """The image's superblock; None if the child holds no dedup image at all."""
    slots = []
    for i in range(SUPERBLOCK_SLOTS):
        end = (i + 1) * PAGE
        slots.append(await md.read(i * PAGE, PAGE) if md.size >= end else b"")
    if not any(raw[:8] == MAGIC for raw in slots):
        return None
    sb, reasons = pick_superblock(slots)
    where = f"node '{name}': {md.desc}"
    if sb is None:
        raise CorruptImage(f"{where} has no valid dedup superblock ({'; '.join(reasons)})")
    problem = sb.validate()
    if problem:
        raise CorruptImage(f"{where}: the dedup superblock is invalid: {problem}")
    if sb.incompat & ~INCOMPAT_KNOWN:
        raise OpenError(
            f"{where}: the image uses features this version does not know "
            f"(incompatible feature bits {sb.incompat:#x})"
        )
    if sb.ro_compat & ~RO_COMPAT_KNOWN and not read_only:
        raise OpenError(
            f"{where}: the image uses features this version can only read "
            f"(bits {sb.ro_compat:#x}); open it with read-only = true"
        )
    if md.size < sb.metadata_size:
        raise CorruptImage(
            f"{where} is truncated: it has {md.size} bytes, the image needs {sb.metadata_size}"
        )
    return sb


def _check_format_options_match(
    name: str, options: Mapping[str, Any], md: BlockStore, sb: Superblock
) -> None:
    size, bs = options["size"], options["block-size"]
    if bs is not None and bs != sb.block_size:
        raise OpenError(
            f"node '{name}': option 'block-size': the image on "
            f"{md.desc} was formatted with {sb.block_size}"
        )
    if size is not None and -(-size // sb.block_size) != sb.logical_blocks:
        raise OpenError(
            f"node '{name}': option 'size': the image on {md.desc} "
            f"was formatted with {sb.logical_size} bytes"
        )


async def _contents(edge: BlockStore) -> str | None:
    """None if the child reads as all zeroes, else what it seems to hold."""
    size = edge.size
    if size == 0:
        return None
    head = await edge.read(0, min(size, 2 * PAGE))
    for offset, magic, what in _KNOWN_HEADERS:
        if head[offset : offset + len(magic)] == magic:
            return what
    for ext in await edge.block_status(0, size):
        if ext.status & Status.ZERO:
            continue
        for at in range(ext.offset, ext.end, MiB):
            n = min(MiB, ext.end - at)
            if await edge.read(at, n) != _ZERO_MIB[:n]:
                return "data"
    return None


async def _format(
    name: str,
    options: Mapping[str, Any],
    md: BlockStore,
    dt: BlockStore,
    read_only: bool,
) -> Superblock:
    where = f"node '{name}'"
    if not options["format"]:
        raise OpenError(
            f"{where}: {md.desc} holds no dedup image; set format = true "
            "(with size) to format empty children, or run `fusedisk dedup create`"
        )
    if read_only:
        raise OpenError(f"{where}: option 'format': cannot format a read-only node")
    size = options["size"]
    if size is None:
        raise OpenError(f"{where}: option 'size' is required to format")
    bs = options["block-size"] or 4096
    if bs & (bs - 1):
        raise OpenError(f"{where}: option 'block-size': {bs} is not a power of two")
    for edge in (md, dt):
        what = await _contents(edge)
        if what is not None:
            raise OpenError(
                f"{where}: option 'format': {edge.desc} is not empty (it holds "
                f"{what}); format = true only formats empty children"
            )
    sb = _new_superblock(where, size, bs, dt, int(options["journal-size"]))
    await _write_superblock(where, sb, md)
    log.info(
        "node '%s': formatted a %d-byte dedup image (block size %d, %d bytes of metadata)",
        name,
        sb.logical_size,
        bs,
        sb.metadata_size,
    )
    return sb


def _new_superblock(where: str, size: int, bs: int, dt: BlockStore, journal: int) -> Superblock:
    """The layout of a new image; a data child that cannot grow bounds its blocks."""
    logical_blocks = -(-size // bs)
    physical = None
    if not dt.grows:
        physical = min(default_physical_blocks(logical_blocks), dt.size // bs)
        if physical < 1:
            raise OpenError(f"{where}: {dt.desc} is smaller than one block ({bs} bytes)")
    sb = Superblock.create(size, bs, physical, journal)
    problem = sb.validate()
    if problem:
        raise OpenError(f"{where}: cannot format: {problem}")
    return sb


async def _write_superblock(where: str, sb: Superblock, md: BlockStore) -> None:
    """Grow `metadata` to the image's size, then write both superblock slots."""
    if md.size < sb.metadata_size:
        try:
            await md.truncate(sb.metadata_size)
        except Exception as e:
            raise OpenError(
                f"{where}: {md.desc} is too small for the metadata "
                f"({sb.metadata_size} bytes needed) and cannot grow: {e}"
            ) from None
    await md.flush()
    # Both slots, so the magic is at offset 0 too; the higher epoch (slot 1) is used.
    sb.epoch = 0
    await md.write(0, sb.pack())
    sb.epoch = 1
    await md.write(PAGE, sb.pack())
    await md.flush()


async def replay(
    name: str,
    sb: Superblock,
    journal: Journal,
    md: BlockStore,
    validate: Callable[[int, bytearray], None],
    overlay: dict[int, bytes] | None,
) -> Counters:
    """Bring the committed transactions home; the counters they end with.

    With an `overlay` (a read-only node), the page images go there instead.
    """
    txns = await journal.scan(validate)
    if not txns:
        return sb.counters.copy()
    counters = txns[-1].header.counters.copy()
    problem = counters_problem(sb, counters)
    if problem:
        raise CorruptImage(f"node '{name}': journal: {problem}")
    pages = sum(len(t.keys) for t in txns)
    if overlay is not None:
        for txn in txns:  # at most one image per page: bounded by the journal size
            overlay.update(await journal.images(txn))
        log.info(
            "node '%s': %d journal transactions (%d pages) read but not replayed: "
            "the node is read-only",
            name,
            len(txns),
            pages,
        )
        return counters
    for txn in txns:
        for pno, image in await journal.images(txn):
            await md.write(pno * PAGE, image)
    await journal.checkpoint(counters)
    log.info(
        "node '%s': replayed %d journal transactions (%d pages) after an unclean shutdown",
        name,
        len(txns),
        pages,
    )
    return counters


def counters_problem(sb: Superblock, c: Counters) -> str | None:
    """Why the image-wide counters cannot be right for this geometry, or None."""
    if not (c.used_physical <= c.hwm <= sb.physical_blocks and c.used_logical <= sb.logical_blocks):
        return (
            f"the counters are out of range (high-water mark {c.hwm}, {c.used_physical} "
            f"physical and {c.used_logical} logical blocks used, {sb.physical_blocks} physical "
            f"and {sb.logical_blocks} logical blocks)"
        )
    return None
