"""The `rbd` driver: a leaf whose storage is an image in a Ceph RBD pool.

- librbd.py     finds Ceph's Python bindings (Debian's python3-rados, python3-rbd)
- client.py     one open image driven from trio through librbd's aio calls
- target.py     QEMU's option names and `rbd:` file names, checked, as a Target
- node.py       the driver: the node contract over librbd, exclusive lock
- snapshots.py  the image's RBD snapshots as the node's `snapshots` control file
- create.py     `fusedisk create -f rbd` and `fusedisk info rbd:...`
"""

from fusedisk.formats.rbd.node import RbdNode

__all__ = ["RbdNode"]
