"""The internal snapshot table (read only: fusedisk reads and writes the active layer).

References: QEMU docs/interop/qcow2.txt, "Snapshots".  The table is needed
to validate the image (snapshot L1 tables must lie inside the file and not
overlap other metadata) and to count references when a dirty image is
repaired.  Writes keep snapshots intact through refcounts: a cluster with a
refcount above one is copied before it is written.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fusedisk.errors import CorruptImage
from fusedisk.formats.qcow2.layout import MAX_L1_BYTES

_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    vm_state_size: int
    disk_size: int | None


async def read_snapshot_table(
    read: Callable[[int, int], Awaitable[bytes]],
    offset: int,
    count: int,
    cluster_size: int,
    file_size: int,
    where: str,
) -> tuple[list[Snapshot], int]:
    """The snapshots and the table's length in bytes."""
    snaps: list[Snapshot] = []
    pos = offset

    async def take(n: int) -> bytes:
        if pos + n > file_size:
            raise CorruptImage(f"{where}: the snapshot table runs past the end of the file")
        return await read(pos, n)

    for i in range(count):
        fields = _ENTRY.unpack(await take(_ENTRY.size))
        l1_off, l1_size, id_len, name_len, _sec, _nsec, _vmclock, vm32, extra_len = fields
        if extra_len > 1024:
            raise CorruptImage(f"{where}: snapshot {i} has {extra_len} bytes of extra data")
        pos += _ENTRY.size
        extra = await take(extra_len) if extra_len else b""
        pos += extra_len
        vm_state = vm32
        disk_size = None
        if len(extra) >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        names = await take(id_len + name_len)
        pos += id_len + name_len
        pos += -(pos - offset) % 8
        if l1_off % cluster_size:
            raise CorruptImage(
                f"{where}: snapshot {i}: L1 table offset {l1_off:#x} is not cluster-aligned"
            )
        if l1_size * 8 > MAX_L1_BYTES:
            raise CorruptImage(f"{where}: snapshot {i}: L1 table of {l1_size} entries is absurd")
        if l1_size and (l1_off == 0 or l1_off + l1_size * 8 > file_size):
            raise CorruptImage(f"{where}: snapshot {i}: L1 table lies past the end of the file")
        snaps.append(
            Snapshot(
                id=names[:id_len].decode(errors="replace"),
                name=names[id_len:].decode(errors="replace"),
                l1_table_offset=l1_off,
                l1_size=l1_size,
                vm_state_size=vm_state,
                disk_size=disk_size,
            )
        )
    return snaps, pos - offset
