"""The `throttle` driver: QEMU's I/O limits, alone or in shared throttle groups.

- bucket.py  the leaky bucket as a meter: pure arithmetic, no clock, no tasks
- node.py    the trio glue: queues, round-robin in a group, run-time changes, drain
"""

from fusedisk.filters.throttle.node import ThrottleGroup, ThrottleNode

__all__ = ["ThrottleGroup", "ThrottleNode"]
