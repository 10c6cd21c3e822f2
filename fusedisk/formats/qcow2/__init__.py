"""The qcow2 format driver (QEMU's copy-on-write images), split by concern:

- layout.py     header fields, feature bits, entry bit fields; packing a header
- header.py     parsing and checking a header: fields, extensions, features, tables
- mapping.py    guest -> host cluster mapping, the L2 cache
- refcount.py   refcounts and host cluster allocation
- snapshots.py  the internal snapshot table
- compress.py   deflate and zstd compressed clusters
- repair.py     recounting references of a dirty image
- create.py     making new images (`fusedisk create`, snapshots)
- node.py       the driver: requests, locking, crash-safe flush
"""

from fusedisk.formats.qcow2.node import Qcow2Node

__all__ = ["Qcow2Node"]
