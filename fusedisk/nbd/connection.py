"""One client's socket: exact-length reads, and replies that never interleave.

Requests are served concurrently, so several tasks want to send at once; a
lock keeps each reply (header and data) whole on the wire.  A client that
vanishes is not an error of the daemon: reads raise ClientGone, sends after
that are dropped quietly, and the requests already running still finish.
"""

from __future__ import annotations

import trio


class ClientGone(Exception):
    """The client closed the connection (possibly in the middle of a message)."""


class Connection:
    def __init__(self, stream: trio.abc.Stream, peer: str) -> None:
        self.stream = stream
        self.peer = peer
        self._buf = bytearray()
        self._send_lock = trio.Lock()
        self.broken = False

    async def receive_exactly(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            try:
                chunk = await self.stream.receive_some(max(n - len(buf), 65536))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise ClientGone(str(e) or type(e).__name__) from None
            if not chunk:
                raise ClientGone("end of stream" + (" mid-message" if buf else ""))
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    async def send(self, *parts: bytes) -> None:
        """Send `parts` back to back, whole; dropped if the client has gone."""
        async with self._send_lock:
            if self.broken:
                return
            try:
                for part in parts:
                    if part:
                        await self.stream.send_all(part)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.broken = True
