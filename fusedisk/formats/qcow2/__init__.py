"""The qcow2 format driver (QEMU's copy-on-write images), split by concern:

- layout.py     header fields, feature bits, entry bit fields; packing a header
- header.py     parsing and checking a header: fields, extensions, features, tables
- mapping.py    guest -> host cluster mapping, the L2 cache
- refcount.py   refcounts and host cluster allocation
- snapshots.py  the internal snapshot table
- compress.py   deflate and zstd compressed clusters
- repair.py     recounting references of a dirty image
- create.py     making new images (`fusedisk create`, snapshots)
- image.py      Qcow2Image, the engine (no Node), built of core.py, opening.py,
                flushing.py (crash-safe writeback), reading.py, writing.py (claims,
                allocation), zeroing.py and growth.py
- bitmaps.py    persistent dirty bitmaps
- node.py       the driver: the node's glue around Qcow2Image
"""

from fusedisk.formats.qcow2.node import Qcow2Node

__all__ = ["Qcow2Node"]
