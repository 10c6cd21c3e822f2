"""The `file` driver: a host file or block device, the leaf under every format."""

from fusedisk.formats.file.node import FileNode

__all__ = ["FileNode"]
