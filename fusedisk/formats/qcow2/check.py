"""`fusedisk check` for qcow2: every reference counted and compared with the refcounts,
as `qemu-img check` does, read-only.

References: QEMU block/qcow2-refcount.c (qcow2_check_refcounts, compare_refcounts,
check_oflag_copied).  A cluster referenced more often than its refcount says is
an error: the allocator may hand it out again and data lands on it (on an L1
table, say).  A refcount above the references is a leak: space lost, nothing
at risk.  The COPIED flag of active L1 and L2 entries must say "refcount is
one" exactly when it is.  Exit status as qemu-img: 0 clean, 2 errors, 3 leaks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fusedisk.formats.dedup.check import CheckReport
from fusedisk.formats.qcow2.layout import OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED
from fusedisk.formats.qcow2.repair import count_references

if TYPE_CHECKING:
    from fusedisk.formats.qcow2.image import Qcow2Image


async def check_image(image: Qcow2Image) -> CheckReport:
    report = CheckReport()
    references = await count_references(image)
    refcounts = await image.refs.used_clusters()
    cs = image.cs
    file_clusters = -(-image.file.size // cs)
    for cluster in sorted(set(references) | set(refcounts)):
        wanted, have = references.get(cluster, 0), refcounts.get(cluster, 0)
        if cluster >= file_clusters and wanted:
            report.error(f"cluster {cluster} is referenced but lies past the end of the file")
        elif have < wanted:
            report.error(f"cluster {cluster}: refcount={have} reference={wanted}")
        elif have > wanted:
            report.leak(f"cluster {cluster}: refcount={have} reference={wanted}")
    await _check_copied(image, report, refcounts)
    report.summary["image_end_offset"] = file_clusters * cs
    return report


async def _check_copied(image: Qcow2Image, report: CheckReport, refcounts: dict[int, int]) -> None:
    """COPIED set on an active L1 or L2 entry exactly where the refcount is one."""
    m, cb = image.map, image.cluster_bits
    for i, e in enumerate(m.l1.tolist()):
        off = e & OFFSET_MASK
        if not off:
            continue
        one = refcounts.get(off >> cb, 0) == 1
        if one != bool(e & OFLAG_COPIED):
            report.error(f"OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:#x} refcount "
                         f"{refcounts.get(off >> cb, 0)}")  # fmt: skip
        if image.h.has_data_file:
            continue
        table = await m.table(off)
        entries = table[0::2] if m.extended else table
        for j in np.flatnonzero(entries & np.uint64(OFFSET_MASK)).tolist():
            x = int(entries[j])
            if x & OFLAG_COMPRESSED:
                continue
            rc = refcounts.get((x & OFFSET_MASK) >> cb, 0)
            if (rc == 1) != bool(x & OFLAG_COPIED):
                report.error(f"OFLAG_COPIED data cluster: l2_entry={x:#x} refcount={rc}")
