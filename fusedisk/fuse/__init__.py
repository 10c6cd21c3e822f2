"""The FUSE front: the virtual tree of disks and control files, and the pyfuse3 adapter."""
