"""One client's socket: exact-length reads, and replies that never interleave.

During the handshake replies are sent in turn.  In the transmission phase
requests are served concurrently, so many tasks have replies at once: they
queue them whole (header and data together) and one writer task sends what
has queued up in a single send(2) per scheduler pass.  At 16 requests in
flight that is one syscall and one wake-up of the client for several
replies, where a send per reply made the daemon's sends its largest cost
(measured with cProfile under fio: 72 µs per send(2) on a loaded machine).
What may queue is bounded by the bytes in flight (budget.py): a request
gives its bytes back once its reply has gone to the socket (`send`'s
`on_sent`), so a client that does not read its replies stops being read.

A client that vanishes is not an error of the daemon: reads raise
ClientGone, replies after that are dropped quietly, and the requests already
running still finish.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

import trio

from fusedisk.export.nbd.protocol import ProtocolError

#: a batch of replies up to this size goes out joined in one send(2)
COALESCE = 1 << 20
#: a client that takes no piece of its replies for this long is hung up on: while
#: it does not read, its replies hold their bytes in flight (budget.py)
STALL_TIMEOUT = 30.0
STALL_PIECE = 1 << 20

log = logging.getLogger("fusedisk")


class ClientGone(Exception):
    """The client closed the connection (possibly in the middle of a message)."""


class Connection:
    def __init__(self, stream: trio.abc.Stream, peer: str) -> None:
        self.stream = stream
        self.peer = peer
        self._buf = bytearray()
        self.broken = False
        self._queue: list[bytes] = []
        self._sent_calls: list[Callable[[], None]] = []  # when the queue has been sent
        self._wake: trio.Event | None = None  # set when the writer task is running
        self._closing = False
        self._writer_ran = False
        self._sending_since: float | None = None  # when the send under way started

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

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """NBD_OPT_STARTTLS was acknowledged: everything after is TLS."""
        if self._buf:
            raise ProtocolError("the client sent data between NBD_OPT_STARTTLS and TLS")
        stream = trio.SSLStream(self.stream, context, server_side=True)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as e:
            raise ProtocolError(f"TLS handshake failed: {e.__cause__ or e}") from None
        self.stream = stream

    async def send(self, *parts: bytes, on_sent: Callable[[], None] | None = None) -> None:
        """Send `parts` back to back, never interleaved with another reply.

        Dropped if the client has gone.  With the writer running, this queues
        and returns.  `on_sent` is called once the parts have gone to the
        socket (or were dropped).
        """
        if self.broken or self._wake is None:
            # before the writer (the handshake) replies go one by one; after it (the
            # daemon stopping while requests finish) they are dropped, as several
            # tasks sending at once would interleave
            if not self.broken and not self._writer_ran:
                await self._send_now(list(parts))
            if on_sent is not None:
                on_sent()
            return
        self._queue.extend(part for part in parts if part)
        if on_sent is not None:
            self._sent_calls.append(on_sent)
        self._wake.set()

    async def _send_now(self, parts: list[bytes]) -> None:
        total = sum(len(part) for part in parts)
        if len(parts) > 1 and total <= COALESCE:
            parts = [b"".join(parts)]
        try:
            for part in parts:
                view = memoryview(part)
                for at in range(0, len(view), STALL_PIECE):
                    # watched by _watch_stalls: a cancel scope per send cost ~5 % of the
                    # CPU of a 4 KiB request
                    self._sending_since = trio.current_time()
                    await self.stream.send_all(view[at : at + STALL_PIECE])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.broken = True
        finally:
            self._sending_since = None

    async def _watch_stalls(self) -> None:
        """Hang up on a client that has taken no piece of its replies for STALL_TIMEOUT,
        so the bytes its replies hold go back to the budgets and the reader stops
        waiting for it (the blocked send then fails, and the connection is broken)."""
        while not self.broken:
            await trio.sleep(STALL_TIMEOUT / 4)
            since = self._sending_since
            if since is not None and trio.current_time() - since >= STALL_TIMEOUT:
                log.warning("nbd %s: the client has read no reply for %g s; disconnecting",
                            self.peer, STALL_TIMEOUT)  # fmt: skip
                self.broken = True
                await trio.aclose_forcefully(self.stream)

    async def writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Send queued replies until `finish_writing` (run in the connection's nursery)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_stalls)
            await self._write_queued(task_status)
            nursery.cancel_scope.cancel()

    async def _write_queued(self, task_status: trio.TaskStatus[None]) -> None:
        wake = self._wake = trio.Event()
        self._writer_ran = True
        task_status.started()
        try:
            while True:
                await wake.wait()
                wake = self._wake = trio.Event()
                while self._queue or self._sent_calls:
                    batch, self._queue = self._queue, []
                    calls, self._sent_calls = self._sent_calls, []
                    if not self.broken:
                        await self._send_now(batch)
                    for call in calls:
                        call()
                if self._closing:
                    return
        finally:
            self._wake = None
            for call in self._sent_calls:  # cancelled: nothing more goes out
                call()
            self._queue, self._sent_calls = [], []

    def finish_writing(self) -> None:
        """The writer sends what is queued, then ends."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
