"""The NBD export: every disk of a graph, served to NBD clients under its name.

A second front on the same Disks as the FUSE mount: requests pass the same
gate, count in the same stats and see the same graph (a snapshot taken in the
control tree applies to NBD clients at once).  Each client connection is its
own task; one that breaks the protocol is logged and dropped, and nothing it
did reaches the others.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from functools import partial
from typing import Any

import trio

from fusedisk.errors import SpecError
from fusedisk.export.nbd.address import Address, parse_address
from fusedisk.export.nbd.connection import ClientGone, Connection
from fusedisk.export.nbd.handshake import Negotiation
from fusedisk.export.nbd.limits import DaemonLimits
from fusedisk.export.nbd.protocol import ProtocolError
from fusedisk.export.nbd.tls import server_context
from fusedisk.export.nbd.transmission import Transmission
from fusedisk.graph.disk import Disk
from fusedisk.graph.graph import Graph
from fusedisk.hostio.open_files import connection_cap

log = logging.getLogger("fusedisk")

#: a client has this long to finish the negotiation (a stuck one holds a task)
NEGOTIATION_TIMEOUT = 30.0
#: how long closing a connection may take (a TLS goodbye to a client that is gone)
CLOSE_TIMEOUT = 5.0


def _someone_listens(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


async def _unix_listener(path: str) -> trio.SocketListener:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"'{path}' exists and is not a socket")
        if _someone_listens(path):
            raise OSError(errno.EADDRINUSE, f"another server listens on '{path}'")
        os.unlink(path)  # a socket left behind by a daemon that is gone
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def open_listeners(address: Address) -> list[trio.SocketListener]:
    try:
        if address.path is not None:
            return [await _unix_listener(address.path)]
        return await trio.open_tcp_listeners(address.port, host=address.host or None)
    except OSError as e:
        raise SpecError(f"cannot listen for NBD on {address}: {e.strerror or e}") from None


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "client"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return "unix client"


async def serve_connection(
    disks: Mapping[str, Disk],
    stream: trio.abc.Stream,
    peer: str,
    tls: ssl.SSLContext | None = None,
    limits: DaemonLimits | None = None,
) -> None:
    """Negotiate with one client and serve it until it leaves (or breaks the protocol).

    `limits` are what the daemon's connections share (limits.py)."""
    conn = Connection(stream, peer)
    try:
        with trio.fail_after(NEGOTIATION_TIMEOUT):
            session = await Negotiation(conn, disks, tls).run()
        if session is None:
            return
        log.info("nbd %s: serving disk '%s'", peer, session.disk.name)
        await Transmission(conn, session, limits).run()
        log.info("nbd %s: disk '%s': disconnected", peer, session.disk.name)
    except ProtocolError as e:
        log.warning("nbd %s: %s; disconnecting", peer, e)
    except ClientGone as e:
        log.info("nbd %s: the client went away (%s)", peer, e)
    except trio.TooSlowError:
        log.warning("nbd %s: no export chosen within %g s; disconnecting", peer,
                    NEGOTIATION_TIMEOUT)  # fmt: skip
    except Exception:
        # never let one client's failure reach the listener (and the mount)
        log.exception("nbd %s: unexpected error; disconnecting", peer)
    finally:
        # shielded, but bounded: closing TLS sends close_notify to a client that
        # may not be reading any more
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            await conn.stream.aclose()


async def serve_nbd(
    graph: Graph,
    address: str,
    *,
    tls_creds: str | None = None,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve every disk of `graph` over NBD at `address` until cancelled.

    With `tls_creds` (a folder, see tls.py) clients must start TLS first.

    Reports started, with the address listened on (the port chosen for port
    0), once clients can connect, so a caller that says "ready" after
    `nursery.start` tells the truth.
    """
    addr = parse_address(address)
    tls = server_context(tls_creds) if tls_creds else None
    listeners = await open_listeners(addr)
    await _serve_listeners(graph, addr, listeners, tls, task_status=task_status)


async def nbd_front(
    graph: Graph, address: str, on_stop: Callable[[Callable[[], None]], Awaitable[None]]
) -> Callable[[Callable[[], None]], Coroutine[Any, Any, None]]:
    """The NBD export beside a FUSE session, through the session's `on_stop` hook.

    Listens now, before the mount, so a bad address fails the mount and a
    client may connect as soon as the mount says it is ready; the returned
    hook serves clients while it waits for `on_stop` (the signals), and
    stops serving when the session ends.
    """
    addr = parse_address(address)
    listeners = await open_listeners(addr)

    async def serve_beside(stop: Callable[[], None]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(_serve_listeners, graph, addr, listeners))
            await on_stop(stop)
            nursery.cancel_scope.cancel()

    return serve_beside


async def _serve_listeners(
    graph: Graph,
    addr: Address,
    listeners: list[trio.SocketListener],
    tls: ssl.SSLContext | None = None,
    *,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    limits = DaemonLimits(cap=connection_cap())

    async def handler(stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        if not limits.admit(peer):
            await trio.aclose_forcefully(stream)
            return
        try:
            await serve_connection(graph.disks, stream, peer, tls, limits)
        finally:
            limits.leave()

    if addr.path is None and listeners:
        host, port = listeners[0].socket.getsockname()[:2]
        addr = Address(host=addr.host or host, port=port)
    log.info("serving %s over NBD at %s%s (at most %d connections)",
             ", ".join(graph.disks) or "no disks", addr, " (TLS required)" if tls else "",
             limits.cap)  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, listeners)
            task_status.started(addr)
    finally:
        if addr.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(addr.path)
