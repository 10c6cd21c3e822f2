"""Bytes in flight: what NBD requests may hold in memory, per connection and per daemon.

A request's bytes (a read's reply data, a write's payload) are taken from
its connection's budget and from the daemon's before the request is read
further, and given back once its reply has gone to the socket.  So a client
that pipelines 32 MiB reads and never reads the replies stops being read
once its connection's budget is out, and many such clients together stop at
the daemon's: the memory they pin is bounded (qemu-nbd bounds it by 16
requests of at most 32 MiB per client, nbdkit by its threads and maximum
request size).  A request larger than a whole budget takes all of it, so it
runs alone rather than never.
"""

from __future__ import annotations

import trio

MiB = 1 << 20
#: reply data (or write payloads) one connection may hold at once
CONNECTION_BYTES = 64 * MiB
#: ... and all connections of the daemon together
DAEMON_BYTES = 256 * MiB


class Budget:
    """A count of bytes that tasks take and give back, waiting while it is spent."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._freed = trio.Event()
        self._waiting = 0  # tasks in `take`: without any, giving back wakes nobody

    def cost(self, nbytes: int) -> int:
        """What `nbytes` take from this budget (never more than all of it)."""
        return min(nbytes, self.limit)

    async def take(self, nbytes: int) -> None:
        """Wait until `nbytes` (a `cost`) fit, then hold them."""
        while self.used + nbytes > self.limit:
            self._waiting += 1
            try:
                await self._freed.wait()
            finally:
                self._waiting -= 1
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def give(self, nbytes: int) -> None:
        if nbytes:
            self.used -= nbytes
            if self._waiting:
                freed, self._freed = self._freed, trio.Event()
                freed.set()


class Hold:
    """The bytes one request holds in its connection's budget and the daemon's."""

    __slots__ = ("_connection", "_daemon", "_nbytes")

    def __init__(self, connection: Budget, daemon: Budget) -> None:
        self._connection = connection
        self._daemon = daemon
        self._nbytes = 0

    async def take(self, nbytes: int) -> None:
        nbytes = min(self._connection.cost(nbytes), self._daemon.cost(nbytes))
        await self._connection.take(nbytes)
        try:
            await self._daemon.take(nbytes)
        except BaseException:
            self._connection.give(nbytes)
            raise
        self._nbytes = nbytes

    def release(self) -> None:
        """Give the bytes back (once; later calls do nothing)."""
        nbytes, self._nbytes = self._nbytes, 0
        if nbytes:
            self._connection.give(nbytes)
            self._daemon.give(nbytes)
