"""The `quorum` driver: N sibling children holding the same disk, reads decided by vote.

- vote.py      the vote: pure functions on what children answered
- health.py    per-child states, counters and log lines, repair of a child that lost a vote
- children.py  its ChildSet: add and delete a child, voting or not (the graph's replace)
- scrub.py     its Scrubber: vote and repair one range (the graph's scrub)
- fanout.py    running one request on several children at once (inline or in a nursery)
- node.py      the driver: options, the read vote, writes to every child
"""

from fusedisk.filters.quorum.node import QuorumNode

__all__ = ["QuorumNode"]
