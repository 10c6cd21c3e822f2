"""The `raw` driver: the bytes of its child as they are, optionally a window of them."""

from fusedisk.formats.raw.node import RawNode

__all__ = ["RawNode"]
