"""One libnbd handle, driven from trio through libnbd's aio interface.

libnbd does the protocol (handshake, structured replies, many commands in
flight, block status); we do the waiting.  A pump task waits for the socket
in the direction libnbd asks (`aio_get_direction`) with trio's
wait_readable/wait_writable and tells libnbd (`aio_notify_read/write`);
libnbd then calls the completion callbacks of finished commands, which wake
the tasks awaiting them.  A caller issues its command itself (`aio_pread`...)
and wakes the pump if libnbd now wants to write, so no command waits for an
unrelated reply.

Nothing here blocks the event loop: libnbd's aio calls never block.  When the
connection dies, every command still waiting fails with ConnectionLost, and
`lost` is set, so the node can reconnect and retry.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from fusedisk.export.nbd.address import Address
from fusedisk.formats.nbd.libnbd import libnbd

log = logging.getLogger("fusedisk")

DIRECTION_READ = 1
DIRECTION_WRITE = 2


#: libnbd's errnos for a command on a connection that is over
GONE = (errno.ESHUTDOWN, errno.ENOTCONN)


class ConnectionLost(Exception):
    """The connection to the server is gone; the command may be retried elsewhere."""


@dataclass(frozen=True)
class ExportInfo:
    size: int
    read_only: bool
    can_flush: bool
    can_trim: bool
    can_zero: bool
    can_fua: bool
    base_allocation: bool
    min_block: int
    max_block: int


class _Pending:
    __slots__ = ("buffer", "done", "error")

    def __init__(self, buffer: Any) -> None:
        self.done = trio.Event()
        self.error = 0
        self.buffer = buffer  # kept alive until libnbd is done with it


class NbdClient:
    """A connected handle; `command` runs one aio command and waits for it."""

    def __init__(self, handle: Any, server: Address) -> None:
        self.h = handle
        self.server = server
        self.lost = trio.Event()
        self.lost_at: float | None = None  # trio clock when the connection dropped
        self._pending: set[_Pending] = set()
        self._wait: trio.CancelScope | None = None  # the pump's wait for the socket
        self._waiting_for = 0
        self._pump_scope = trio.CancelScope()
        self._pump_done = trio.Event()

    # -- connecting ------------------------------------------------------------

    @classmethod
    async def connect(
        cls, server: Address, export: str, timeout: float, tls_creds: str | None = None
    ) -> NbdClient:
        """Connect and negotiate; OSError (with the server's words) if that fails.

        With `tls_creds` (a folder: ca-cert.pem, client-cert.pem, client-key.pem)
        TLS is required and the server's certificate checked against the CA.
        """
        nbd = libnbd()
        h = nbd.NBD()
        try:
            h.set_handle_name(f"fusedisk:{export}")
            if tls_creds:
                h.set_tls(nbd.TLS_REQUIRE)
                h.set_tls_certificates(tls_creds)
            h.set_export_name(export)
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            with trio.fail_after(timeout):
                if server.path is not None:
                    h.aio_connect_unix(server.path)
                else:
                    h.aio_connect_tcp(server.host, str(server.port))
                while not h.aio_is_ready():
                    if h.aio_is_dead() or h.aio_is_closed():
                        raise OSError(errno.ECONNRESET, "the server closed the connection")
                    await _step(h)
        except nbd.Error as e:
            _close_handle(h)
            raise OSError(e.errno or errno.EIO, e.string) from None
        except trio.TooSlowError:
            _close_handle(h)
            raise OSError(errno.ETIMEDOUT, f"no answer within {timeout:g} s") from None
        except BaseException:
            _close_handle(h)
            raise
        client = cls(h, server)
        trio.lowlevel.spawn_system_task(client._pump, name=f"nbd pump {server}")
        return client

    def info(self) -> ExportInfo:
        nbd = libnbd()
        h = self.h
        return ExportInfo(
            size=h.get_size(),
            read_only=bool(h.is_read_only()),
            can_flush=bool(h.can_flush()),
            can_trim=bool(h.can_trim()),
            can_zero=bool(h.can_zero()),
            can_fua=bool(h.can_fua()),
            base_allocation=bool(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)),
            min_block=h.get_block_size(nbd.SIZE_MINIMUM) or 1,
            max_block=h.get_block_size(nbd.SIZE_MAXIMUM) or 0,
        )

    # -- the pump ------------------------------------------------------------------

    async def _pump(self) -> None:
        h = self.h
        nbd = libnbd()
        try:
            with self._pump_scope:
                while not self._dead():
                    direction = h.aio_get_direction()
                    # while a request is half sent, replies may arrive meanwhile
                    self._waiting_for = direction or DIRECTION_READ
                    ready = 0
                    with trio.CancelScope() as self._wait:
                        ready = await _wait_either(h.aio_get_fd(), self._waiting_for)
                    self._wait = None
                    # libnbd must only hear of a socket that is really ready:
                    # a read notification in the middle of a send parks the
                    # send until a reply comes, and none would
                    if ready & DIRECTION_WRITE:
                        h.aio_notify_write()
                    elif ready & DIRECTION_READ:
                        h.aio_notify_read()
        except nbd.Error as e:
            log.warning("nbd server %s: connection lost: %s", self.server, e.string)
        except Exception:
            log.exception("nbd server %s: unexpected error in the client", self.server)
        finally:
            self._mark_lost()
            self._pump_done.set()

    def _mark_lost(self) -> None:
        if self.lost_at is None:
            self.lost_at = trio.current_time()
        self._fail_pending()
        self.lost.set()

    def abandon(self) -> None:
        """Give the connection up now (a server that stopped answering): every
        command waiting fails with ConnectionLost, and `lost` is set at once."""
        self._mark_lost()
        self._pump_scope.cancel()

    def _fail_pending(self) -> None:
        for pending in self._pending:
            if not pending.done.is_set():
                pending.error = errno.ENOTCONN
                pending.done.set()
        self._pending.clear()

    def _dead(self) -> bool:
        return bool(self.h.aio_is_dead() or self.h.aio_is_closed())

    def _wake_pump(self) -> None:
        """Make the pump look again: libnbd now wants another direction, or died."""
        if self._wait is None:
            return
        if self._dead() or self.h.aio_get_direction() != self._waiting_for:
            self._wait.cancel()

    # -- commands ----------------------------------------------------------------------

    async def command(
        self, issue: Callable[[Callable[[Any], int]], Any], buffer: Any = None
    ) -> None:
        """Run one command: `issue(completion)` calls the aio function.

        Raises ConnectionLost if the connection died before the reply, and
        OSError with the server's errno if the server refused the command.
        If the caller is cancelled the command stays in flight; its reply is
        dropped when it comes.
        """
        if self.lost.is_set():
            raise ConnectionLost(f"not connected to {self.server}")
        pending = _Pending(buffer)

        def completion(error: Any) -> int:
            if not pending.done.is_set():
                pending.error = int(getattr(error, "value", error) or 0)
                pending.done.set()
            self._pending.discard(pending)
            return 1  # retire the command

        nbd = libnbd()
        try:
            issue(completion)
        except nbd.Error as e:
            if self._dead() or e.errno in GONE:
                self._wake_pump()
                raise ConnectionLost(e.string) from None
            raise OSError(e.errno or errno.EIO, e.string) from None
        self._pending.add(pending)
        self._wake_pump()
        await pending.done.wait()
        if pending.error and (self.lost.is_set() or self._dead()):
            raise ConnectionLost(f"connection to {self.server} lost")
        if pending.error == errno.ESHUTDOWN:
            # the server says it is stopping (nbdkit and qemu-nbd answer so while
            # they shut down): it is going away, which is not the request's fault
            log.warning("nbd server %s: shutting down (it answered ESHUTDOWN); dropping "
                        "the connection", self.server)  # fmt: skip
            self.abandon()
            raise ConnectionLost(f"the NBD server at {self.server} is shutting down")
        if pending.error:
            raise OSError(pending.error, os.strerror(pending.error))

    async def close(self, timeout: float = 2.0) -> None:
        """Say goodbye (NBD_CMD_DISC) if the server still listens, then drop the handle."""
        nbd = libnbd()
        h = self.h
        if not self.lost.is_set():
            try:
                h.aio_disconnect()
                self._wake_pump()
                with trio.move_on_after(timeout):
                    await self._pump_done.wait()
            except nbd.Error:
                pass
        self._pump_scope.cancel()
        await self._pump_done.wait()
        _close_handle(h)


async def _wait_either(fd: int, direction: int) -> int:
    """Wait until `fd` is ready in one of `direction`'s ways; which one it was."""
    if direction & DIRECTION_READ == 0:
        await trio.lowlevel.wait_writable(fd)
        return DIRECTION_WRITE
    if direction & DIRECTION_WRITE == 0:
        await trio.lowlevel.wait_readable(fd)
        return DIRECTION_READ
    ready = 0
    async with trio.open_nursery() as nursery:

        async def wait(waiter: Callable[[int], Awaitable[None]], flag: int) -> None:
            nonlocal ready
            await waiter(fd)
            ready = flag
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait, trio.lowlevel.wait_readable, DIRECTION_READ)
        nursery.start_soon(wait, trio.lowlevel.wait_writable, DIRECTION_WRITE)
    return ready


async def _step(h: Any) -> None:
    """One round of the handshake: wait as libnbd asks, then tell it."""
    if await _wait_either(h.aio_get_fd(), h.aio_get_direction()) & DIRECTION_WRITE:
        h.aio_notify_write()
    else:
        h.aio_notify_read()


def _close_handle(h: Any) -> None:
    """Close libnbd's socket; trio is told first, as no task may wait on a closed fd."""
    try:
        fd = h.aio_get_fd()
    except Exception:
        fd = -1
    if fd >= 0:
        trio.lowlevel.notify_closing(fd)
    # libnbd 1.14's binding closes only in __del__; call it now, once
    if hasattr(h, "_o"):
        h.__del__()
        del h._o
