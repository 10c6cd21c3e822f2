"""Driver `dedup`: a deduplicating format with its metadata and its data on two children.

See driver.py for the request paths, docs/drivers/dedup.md for its use and
docs/formats/dedup.md for the on-disk layout.
"""

from fusedisk.formats.dedup.driver import DedupNode

__all__ = ["DedupNode"]
