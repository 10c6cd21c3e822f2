"""The `throttle` driver: QEMU's I/O limits, alone or in shared throttle groups.

- bucket.py  the leaky bucket as a meter: pure arithmetic, no clock, no tasks
- group.py   a throttle group: queues, round-robin among members, run-time changes, drain
- node.py    the node: joins its group, sends requests through it (thin glue)
"""

from fusedisk.filters.throttle.group import ThrottleGroup
from fusedisk.filters.throttle.node import ThrottleNode

__all__ = ["ThrottleGroup", "ThrottleNode"]
