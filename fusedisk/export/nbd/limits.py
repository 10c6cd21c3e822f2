"""What the daemon's NBD connections share: bytes in flight, the block-status walk,
and the count of connections against their cap (hostio/open_files.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from fusedisk.export.nbd.budget import DAEMON_BYTES, Budget
from fusedisk.hostio.open_files import MAX_CONNECTIONS

log = logging.getLogger("fusedisk")

#: refusals over the cap are logged at most this often (an attacker could flood the log)
REFUSAL_LOG_INTERVAL = 10.0


@dataclass
class DaemonLimits:
    """One per daemon (per `serve_nbd`), handed to each of its connections."""

    #: reply data and write payloads of all connections together (budget.py)
    bytes: Budget = field(default_factory=lambda: Budget(DAEMON_BYTES))
    #: one slice of a block-status walk at a time (block_status.py)
    walks: trio.Lock = field(default_factory=trio.Lock)
    #: connections at most (the open-file limit's share for clients)
    cap: int = MAX_CONNECTIONS
    connections: int = 0
    refused: int = 0
    _refusals_logged: float = float("-inf")
    _refused_unlogged: int = 0

    def admit(self, peer: str) -> bool:
        """Count a new connection in; False (logged, now and then) when over the cap."""
        if self.connections < self.cap:
            self.connections += 1
            return True
        self.refused += 1
        self._refused_unlogged += 1
        now = trio.current_time()
        if now - self._refusals_logged >= REFUSAL_LOG_INTERVAL:
            log.warning("nbd %s: refused: %d connections are open, the cap (%d refused since "
                        "the last such message)", peer, self.connections,
                        self._refused_unlogged)  # fmt: skip
            self._refusals_logged = now
            self._refused_unlogged = 0
        return False

    def crowded(self) -> bool:
        """More than half the cap in use: idle newcomers may be hung up on."""
        return self.connections > self.cap // 2

    def leave(self) -> None:
        self.connections -= 1
