"""The `nbd` driver: a leaf whose storage is an export on an NBD server.

- libnbd.py  finds libnbd's Python binding (Debian's python3-libnbd)
- client.py  one libnbd handle driven from trio through its aio interface
- node.py    the driver: QEMU's options, reconnection, the node contract
"""

from fusedisk.formats.nbd.node import NbdNode

__all__ = ["NbdNode"]
