"""Names the mount shows at its root beside the disks (docs/mount.md).

The spec refuses a disk whose entries (`NAME`, `NAME.img`) would hide one of them.
"""

#: files at the mount's root: the last refused control write, every counter
LAST_ERROR = "last-error"
METRICS = "metrics"
MOUNT_ROOT_FILES = (LAST_ERROR, METRICS)
