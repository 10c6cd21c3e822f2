"""The `quorum` driver: N sibling children holding the same disk, reads decided by vote.

- vote.py      the vote: pure functions on what children answered
- health.py    per-child states, counters and log lines, repair of a child that lost a vote
- children.py  what the quorum offers the graph's scrub and replace jobs
- node.py      the driver: options, fan-out of requests
"""

from fusedisk.filters.quorum.node import QuorumNode

__all__ = ["QuorumNode"]
