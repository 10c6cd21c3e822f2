"""The `faults` driver: injected errors, corruption, delays -- a testing tool."""

from fusedisk.filters.faults.node import FaultsNode

__all__ = ["FaultsNode"]
