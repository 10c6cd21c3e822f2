"""Exports: the graph's disks served to other programs over a protocol (nbd/).

The FUSE mount is the other front (fusedisk/fuse/); both are thin adapters on a Disk."""
