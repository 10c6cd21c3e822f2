"""What the daemon's NBD connections share: bytes in flight, the block-status walk."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from fusedisk.export.nbd.budget import DAEMON_BYTES, Budget


@dataclass
class DaemonLimits:
    """One per daemon (per `serve_nbd`), handed to each of its connections."""

    #: reply data and write payloads of all connections together (budget.py)
    bytes: Budget = field(default_factory=lambda: Budget(DAEMON_BYTES))
    #: one slice of a block-status walk at a time (block_status.py)
    walks: trio.Lock = field(default_factory=trio.Lock)
