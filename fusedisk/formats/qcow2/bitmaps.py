"""Persistent dirty bitmaps in a qcow2 image, kept as QEMU keeps them.

References: QEMU docs/interop/qcow2.txt ("Bitmaps" header extension, "Bitmap
directory", "Bitmap table", "Bitmap data", autoclear bit 0) and, for when the
flags change, block/qcow2-bitmap.c (bitmaps are marked in use when the image
is opened read-write and stored, in use cleared, when it is closed).

The life of the extension while fusedisk has the image open:

    any open         every bitmap is loaded; one found `in_use` was left by a
                     writer that crashed: it is inconsistent, kept as it is on
                     disk (its directory entry and clusters untouched), never
                     trusted, and can only be removed
    read-write open  store: every bitmap written with `in_use` set, so a crash
                     from now on leaves them marked inconsistent
    add / remove     store again (still in use)
    close            store with `in_use` clear and `auto` = enabled; the
                     autoclear bit 0 says the extension is consistent

A store never changes what the header points at: new data clusters, bitmap
tables and directory are written and their refcounts synced, then the header's
extension (and the autoclear bit) switches in one write of the first cluster,
then the old clusters are freed.  A crash leaves the old or the new extension,
and at worst leaked clusters.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fusedisk.errors import ControlError, CorruptImage, NotSupported
from fusedisk.formats.qcow2.layout import AUTOCLEAR_BITMAPS, EXT_BITMAPS, EXT_END, OFF_AUTOCLEAR
from fusedisk.graph.bitmaps import BitmapSet, DirtyBitmap, check_granularity

if TYPE_CHECKING:
    from fusedisk.formats.qcow2.image import Qcow2Image

log = logging.getLogger("fusedisk")

_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, directory offset
_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, granularity bits,
#                                     name size, extra data size
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
TYPE_DIRTY_TRACKING = 1
MAX_BITMAPS = 65535
MAX_DIRECTORY = 1024 * MAX_BITMAPS
TABLE_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
TABLE_RESERVED = 0xFF00_0000_0000_01FE
ALL_ONES = 1  # a table entry without offset whose cluster reads as all ones


@dataclass
class Entry:
    """A bitmap directory entry as it is on disk."""

    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    extra: bytes = b""

    def pack(self) -> bytes:
        name = self.name.encode()
        out = _ENTRY.pack(self.table_offset, self.table_size, self.flags, self.type,
                          self.granularity_bits, len(name), len(self.extra))  # fmt: skip
        out += self.extra + name
        return out + bytes(-len(out) % 8)

    @property
    def usable(self) -> bool:
        """A dirty-tracking bitmap fusedisk can load (as QEMU: granularity 512 B..2 GiB)."""
        unknown_extra = self.extra and not self.flags & FLAG_EXTRA_DATA_COMPATIBLE
        return self.type == TYPE_DIRTY_TRACKING and 9 <= self.granularity_bits <= 31 and (
            not unknown_extra)  # fmt: skip


def table_entries(disk_size: int, granularity: int, cluster_size: int) -> int:
    """Entries of the bitmap table of a bitmap over `disk_size` bytes."""
    granules = (disk_size + granularity - 1) // granularity
    data_bytes = (granules + 7) // 8
    return -(-data_bytes // cluster_size)


def parse_directory(buf: bytes, count: int, where: str) -> list[Entry]:
    entries, pos, names = [], 0, set()
    for i in range(count):
        if pos + _ENTRY.size > len(buf):
            raise CorruptImage(f"{where}: the bitmap directory ends inside entry {i}")
        toff, tsize, flags, kind, gbits, name_size, extra_size = _ENTRY.unpack_from(buf, pos)
        end = pos + _ENTRY.size + extra_size + name_size
        if name_size == 0 or end > len(buf):
            raise CorruptImage(f"{where}: bitmap directory entry {i} is malformed")
        extra = bytes(buf[pos + _ENTRY.size : pos + _ENTRY.size + extra_size])
        raw = bytes(buf[pos + _ENTRY.size + extra_size : end])
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            raise CorruptImage(f"{where}: bitmap {i}'s name is not valid UTF-8") from None
        if name in names:
            raise CorruptImage(f"{where}: two bitmaps are named '{name}'")
        names.add(name)
        entries.append(Entry(toff, tsize, flags, kind, gbits, name, extra))
        pos = end + (-end % 8)
    return entries


def directory_location(
    ext: bytes, cluster_size: int, file_size: int, where: str
) -> tuple[int, int, int]:
    """(count, size, offset) of the bitmap directory the extension's bytes name, checked."""
    if len(ext) < _EXT.size:
        raise CorruptImage(f"{where}: the bitmaps header extension is too short")
    count, _, dsize, doff = _EXT.unpack_from(ext)
    if not 0 < count <= MAX_BITMAPS or not 0 < dsize <= MAX_DIRECTORY:
        raise CorruptImage(f"{where}: the bitmaps extension's directory ({count} bitmaps, "
                           f"{dsize} bytes) is invalid")  # fmt: skip
    if doff % cluster_size or doff + dsize > file_size:
        raise CorruptImage(f"{where}: the bitmap directory at {doff:#x} is misplaced")
    return count, dsize, doff


def describe_entries(entries: list[Entry]) -> list[dict[str, object]]:
    """The bitmaps as `qemu-img info --output=json` lists them."""
    out: list[dict[str, object]] = []
    for e in entries:
        flags = [name for bit, name in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto"))
                 if e.flags & bit]  # fmt: skip
        out.append({"flags": flags, "name": e.name, "granularity": 1 << e.granularity_bits})
    return out


class BitmapStore:
    """What an image's bitmaps extension holds, and how to rewrite it (module doc)."""

    def __init__(self, image: Qcow2Image) -> None:
        self.image = image
        self.entries: list[Entry] = []
        #: each on-disk bitmap's table, by name
        self.tables: dict[str, np.ndarray] = {}
        self.dir_offset = 0
        self.dir_size = 0

    def references(self) -> list[tuple[int, int]]:
        """(offset, length) of every cluster range the extension uses, for refcount checks."""
        cs = self.image.cs
        out = [(self.dir_offset, self.dir_size)] if self.dir_size else []
        for e in self.entries:
            out.append((e.table_offset, e.table_size * 8))
            hosts = self.tables[e.name] & np.uint64(TABLE_OFFSET_MASK)
            out.extend((int(x), cs) for x in hosts[hosts != 0].tolist())
        return out

    # -- loading ---------------------------------------------------------------

    async def load(self, bitmaps: BitmapSet) -> None:
        image, h = self.image, self.image.h
        where = image.where
        if not h.has_bitmaps:
            return
        if h.version < 3 or not h.autoclear & AUTOCLEAR_BITMAPS:
            log.warning(
                "%s: a program that does not keep bitmaps wrote this image after them; "
                "its bitmaps are inconsistent and ignored", where,
            )  # fmt: skip
            return
        count, dsize, doff = directory_location(h.bitmaps_ext, image.cs, image.file.size, where)
        entries = parse_directory(await image.file.read(doff, dsize), count, where)
        self.entries, self.dir_offset, self.dir_size = entries, doff, dsize
        for e in entries:
            self.tables[e.name] = await self._read_table(e)
            bitmaps.add(await self._bitmap(e))
        self._claim_clusters()

    async def _read_table(self, e: Entry) -> np.ndarray:
        image, where = self.image, f"{self.image.where}: bitmap '{e.name}'"
        if e.usable and e.table_size != table_entries(image.h.size, 1 << e.granularity_bits,
                                                      image.cs):  # fmt: skip
            raise CorruptImage(f"{where}: its table has {e.table_size} entries, which does not "
                               "match the disk size")  # fmt: skip
        length = e.table_size * 8
        if e.table_offset % image.cs or not e.table_offset or (
                e.table_offset + length > image.file.size):  # fmt: skip
            raise CorruptImage(f"{where}: its table at {e.table_offset:#x} is misplaced")
        table = np.frombuffer(await image.file.read(e.table_offset, length), dtype=">u8")
        table = table.astype(np.uint64)
        if (table & np.uint64(TABLE_RESERVED)).any():
            raise CorruptImage(f"{where}: its table has reserved bits set")
        hosts = table & np.uint64(TABLE_OFFSET_MASK)
        past = hosts + np.uint64(image.cs) > np.uint64(image.file.size)
        if (hosts % np.uint64(image.cs)).any() or (past & (hosts != 0)).any():
            raise CorruptImage(f"{where}: its table points outside the file or at unaligned data")
        return table

    async def _bitmap(self, e: Entry) -> DirtyBitmap:
        image = self.image
        inconsistent = bool(e.flags & FLAG_IN_USE) or not e.usable
        granularity = 1 << e.granularity_bits if e.usable else 1 << 16
        if not inconsistent:
            try:
                check_granularity(granularity, f"{image.where}: bitmap '{e.name}'", image.h.size)
            except ControlError as err:
                raise NotSupported(str(err)) from None
        bitmap = DirtyBitmap(e.name, image.h.size, granularity, enabled=bool(e.flags & FLAG_AUTO),
                             persistent=True, inconsistent=inconsistent)  # fmt: skip
        if inconsistent:
            if e.flags & FLAG_IN_USE:
                log.warning("%s: bitmap '%s' is marked in use: it was not stored cleanly (a "
                            "crash?) and is inconsistent", image.where, e.name)  # fmt: skip
            return bitmap
        cs, parts = image.cs, []
        for x in self.tables[e.name].tolist():
            host = x & TABLE_OFFSET_MASK
            if host:
                parts.append(await image.file.read(host, cs))
            else:
                parts.append(b"\xff" * cs if x & ALL_ONES else bytes(cs))
        bitmap.load_bytes(b"".join(parts))
        return bitmap

    def _claim_clusters(self) -> None:
        """Tell the image which clusters are ours: never data, never handed out twice."""
        image, cb = self.image, self.image.cluster_bits
        for off, length in self.references():
            for c in range(off >> cb, ((off + max(length, 1) - 1) >> cb) + 1):
                if c in image._meta:
                    raise CorruptImage(f"{image.where}: the bitmaps' cluster at {c << cb:#x} "
                                       "overlaps other metadata")  # fmt: skip
                image._meta_add(c)

    # -- storing -----------------------------------------------------------------

    def _kept(self, bitmap: DirtyBitmap) -> Entry | None:
        """The on-disk entry of an inconsistent bitmap, which a store keeps as it is."""
        if not bitmap.inconsistent:
            return None
        return next((e for e in self.entries if e.name == bitmap.name), None)

    async def store(self, bitmaps: BitmapSet, in_use: bool) -> None:
        """Write every persistent bitmap (see the module doc); the metadata lock is held."""
        image = self.image
        persistent = bitmaps.persistent()
        if not persistent and not image.h.has_bitmaps:
            return
        if persistent and image.h.version < 3:
            raise NotSupported(f"{image.where}: a version 2 image cannot keep bitmaps "
                               "(convert it with 'qemu-img amend -o compat=1.1')")  # fmt: skip
        entries, tables = [], {}
        for bitmap in persistent:
            kept = self._kept(bitmap)
            if kept is None:
                kept, tables[bitmap.name] = await self._write_bitmap(bitmap, in_use)
            else:
                tables[bitmap.name] = self.tables[bitmap.name]
            entries.append(kept)
        directory = b"".join(e.pack() for e in entries)
        doff = await self._write_clusters(directory) if entries else 0
        await image.writeback(apply_frees=False)  # the new clusters' refcounts, synced
        ext = _EXT.pack(len(entries), 0, len(directory), doff) if entries else None
        await rewrite_extension(image, EXT_BITMAPS, ext)
        old = self.references()
        self.entries, self.tables = entries, tables
        self.dir_offset, self.dir_size = doff, len(directory)
        still = set(self.references())  # an inconsistent bitmap's clusters stay
        for off, length in old:
            if (off, length) not in still:
                image.refs.queue_free(off, length)
        await image.writeback()

    async def _write_bitmap(self, bitmap: DirtyBitmap, in_use: bool) -> tuple[Entry, np.ndarray]:
        cs = self.image.cs
        n = table_entries(bitmap.size, bitmap.granularity, cs)
        data = bitmap.to_bytes()
        data += bytes(n * cs - len(data))
        chunks = np.frombuffer(data, dtype=np.uint8).reshape(n, cs)
        dirty = np.flatnonzero(chunks.any(axis=1))
        table = np.zeros(n, dtype=np.uint64)
        if len(dirty):
            host = await self._write_clusters(chunks[dirty].tobytes())
            table[dirty] = host + np.arange(len(dirty), dtype=np.uint64) * np.uint64(cs)
        toff = await self._write_clusters(table.astype(">u8").tobytes())
        flags = (FLAG_IN_USE if in_use else 0) | (FLAG_AUTO if bitmap.enabled else 0)
        entry = Entry(toff, n, flags, TYPE_DIRTY_TRACKING, bitmap.shift, bitmap.name)
        return entry, table

    async def _write_clusters(self, data: bytes) -> int:
        """Allocate clusters for `data`, write it there (padded), return the offset."""
        image, cs = self.image, self.image.cs
        count = -(-len(data) // cs)
        offset = await image.refs.allocate(count)
        for c in range(count):
            image._meta_add((offset >> image.cluster_bits) + c)
        await image.file.write(offset, data + bytes(count * cs - len(data)))
        return offset


async def rewrite_extension(image: Qcow2Image, ext_type: int, data: bytes | None) -> None:
    """Put (or, with None, drop) one header extension, in one write of the first cluster.

    The backing file name, which sits after the extensions, moves with them.
    For the bitmaps extension the autoclear bit 0 follows: set with it, clear
    without it.
    """
    h, cs = image.h, image.cs
    start = h.header_length
    head = bytearray(await image.file.read(0, min(cs, image.file.size)))
    exts, pos = [], start
    while pos + 8 <= len(head):
        kind, length = struct.unpack_from(">II", head, pos)
        if kind == EXT_END:
            break
        if kind != ext_type:
            exts.append(bytes(head[pos : pos + 8 + length + (-length % 8)]))
        pos += 8 + length + (-length % 8)
    old_end = max(pos + 8, h.backing_file_offset + h.backing_file_size)
    if data is not None:
        exts.append(struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8))
    body = b"".join(exts) + bytes(8)
    backing = b""
    if h.backing_file_offset:
        backing = bytes(head[h.backing_file_offset : h.backing_file_offset + h.backing_file_size])
    end = start + len(body) + len(backing)
    if end > cs:
        raise NotSupported(f"{image.where}: the header's first cluster has no room for "
                           "the bitmaps extension")  # fmt: skip
    out = bytearray(head[:start]) + body + backing
    out += bytes(max(0, old_end - len(out)))
    if backing:
        struct.pack_into(">Q", out, 8, start + len(body))
    if ext_type == EXT_BITMAPS:
        autoclear = h.autoclear | AUTOCLEAR_BITMAPS if data else h.autoclear & ~AUTOCLEAR_BITMAPS
        struct.pack_into(">Q", out, OFF_AUTOCLEAR, autoclear)
        h.autoclear = autoclear
        h.has_bitmaps = data is not None
        h.bitmaps_ext = data or b""
    await image.file.write(0, bytes(out))
    await image.file.flush()
    if backing:
        h.backing_file_offset = start + len(body)
