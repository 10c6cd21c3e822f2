"""The `copy-on-read` driver: data read from the backing chain is written into the top image."""

from fusedisk.filters.copy_on_read.node import CopyOnReadNode

__all__ = ["CopyOnReadNode"]
