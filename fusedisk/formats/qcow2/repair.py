"""Repair of a dirty image: recount every reference, rewrite refcounts and COPIED flags.

References: QEMU docs/interop/qcow2.txt, incompatible bit 0 ("make sure to
scan L1/L2 tables to repair refcounts before accessing the image").  An
image is dirty when QEMU used lazy refcounts, or when fusedisk itself was
killed while the image was open read-write: then the refcounts may count
clusters nothing uses any more (leaks).  The repair reads every table
first and writes only when the whole image has been counted.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from fusedisk.formats.qcow2.layout import (
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    REFTABLE_OFFSET_MASK,
    decode_compressed,
)
from fusedisk.formats.qcow2.mapping import decode_l2

if TYPE_CHECKING:
    from fusedisk.formats.qcow2.image import Qcow2Image


async def count_references(image: Qcow2Image) -> Counter[int]:
    """How many times each host cluster is referenced, as `qemu-img check` counts."""
    h, m, cs, cb = image.h, image.map, image.cs, image.cluster_bits
    refs: Counter[int] = Counter()

    def ref(offset: int, length: int) -> None:
        for c in range(offset >> cb, ((offset + max(length, 1) - 1) >> cb) + 1):
            refs[c] += 1

    ref(0, cs)
    for offset, length in image.bitmap_store.references():
        ref(offset, length)
    ref(h.refcount_table_offset, h.refcount_table_clusters * cs)
    for e in image.refs.table.tolist():
        if e & REFTABLE_OFFSET_MASK:
            ref(e & REFTABLE_OFFSET_MASK, cs)
    if image.snapshots:
        ref(h.snapshots_offset, image.snapshot_table_length)
    l1s = [(h.l1_table_offset, m.l1)]
    for s in image.snapshots:
        l1 = decode_l2(await image.file.read(s.l1_table_offset, s.l1_size * 8)) if s.l1_size else (
            np.zeros(0, dtype=np.uint64))  # fmt: skip
        l1s.append((s.l1_table_offset, l1))
    for l1_offset, l1 in l1s:
        if len(l1):
            ref(l1_offset, len(l1) * 8)
        for e in l1.tolist():
            off = e & OFFSET_MASK
            if not off:
                continue
            ref(off, cs)
            table = await m.table(off)
            entries = table[0::2] if m.extended else table
            compressed = (entries & np.uint64(OFLAG_COMPRESSED)) != 0
            if not h.has_data_file:
                hosts = entries & np.uint64(OFFSET_MASK)
                used = ~compressed & (hosts != 0)
                refs.update((hosts[used] >> np.uint64(cb)).tolist())
            for ce in entries[compressed].tolist():
                ref(*decode_compressed(ce, cb))
    return refs


async def repair(image: Qcow2Image) -> None:
    wanted = await count_references(image)
    await image.refs.set_all(dict(wanted))
    # COPIED flags of the active tables: set exactly where the refcount is one
    m = image.map
    for i, e in enumerate(m.l1.tolist()):
        off = e & OFFSET_MASK
        if not off:
            continue
        want = await image.refs.get(off >> image.cluster_bits) == 1
        if bool(e & OFLAG_COPIED) != want:
            m.l1[i] = off | (OFLAG_COPIED if want else 0)
            m.l1_dirty.add(i)
        table = await m.table(off)
        step = 2 if m.extended else 1
        changed = False
        for j in range(0, len(table), step):
            x = int(table[j])
            if x & OFLAG_COMPRESSED:
                flag = False
            elif not m.is_allocated(x):
                continue
            elif image.h.has_data_file:
                flag = True
            else:
                flag = await image.refs.get((x & OFFSET_MASK) >> image.cluster_bits) == 1
            if bool(x & OFLAG_COPIED) != flag:
                table[j] = (x | OFLAG_COPIED) if flag else (x & ~OFLAG_COPIED)
                changed = True
        if changed:
            m.cache.mark_dirty(off)
    await image.writeback(apply_frees=False)
