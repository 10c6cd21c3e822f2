"""Driver `nbd`: a leaf whose bytes live in an export of an NBD server.

QEMU's option names and meaning (`server.type/path/host/port`, `export`,
`reconnect-delay`), so a QEMU user's blockdev carries over.  libnbd speaks
the protocol (client.py drives it from trio); this file maps the node
contract onto NBD commands and the export's flags:

    read / write       NBD_CMD_READ / WRITE, split at the server's maximum size
    flush              NBD_CMD_FLUSH if the server takes it, else nothing to do
    discard            NBD_CMD_TRIM if the server takes it (discard is advisory)
    write_zeroes       NBD_CMD_WRITE_ZEROES (NO_HOLE unless unmap), else zero bytes
    block_status       NBD_CMD_BLOCK_STATUS base:allocation: HOLE -> not DATA,
                       ZERO -> ZERO; every extent is ALLOCATED here (a leaf)

When the connection is lost, a supervisor reconnects in the background; a
request waits for it at most `reconnect-delay` seconds after the loss, then
fails with EIO, as QEMU does (0, the default: fail at once).  Requests in
flight when the connection dropped are sent again on the new one.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from fusedisk.errors import IOFailure, OpenError
from fusedisk.export.nbd.address import DEFAULT_PORT, Address
from fusedisk.formats.nbd.client import ConnectionLost, ExportInfo, NbdClient
from fusedisk.formats.nbd.libnbd import libnbd
from fusedisk.graph.extents import Extent, Status, clip_extents, merge_extents
from fusedisk.graph.node import GraphOp, Node
from fusedisk.graph.options import Option, option_table

log = logging.getLogger("fusedisk")

T = TypeVar("T")

#: the most we send in one command, whatever the server allows
MAX_COMMAND = 32 << 20
#: how long opening (and each reconnection attempt) waits for the server
CONNECT_TIMEOUT = 10.0
#: block status is asked in pieces of at most this much (servers differ in limits)
MAX_STATUS = 1 << 30


class NbdNode(Node):
    driver = "nbd"
    summary = "an export on an NBD server (qemu-nbd, nbdkit, fusedisk serve)"
    option_specs = option_table(
        Option(
            "server.type", "str", None,
            "unix or inet (default: unix when server.path is given, else inet)",
            choices=("unix", "inet"),
        ),
        Option("server.path", "path", None, "the server's unix socket (server.type unix)"),
        Option("server.host", "str", None, "the server's host name or address (inet)"),
        Option("server.port", "int", DEFAULT_PORT, "the server's TCP port (inet)", minimum=1,
               maximum=65535),
        Option("export", "str", "", "the export's name on the server"),
        Option(
            "tls-creds", "path", None,
            "a folder with ca-cert.pem, client-cert.pem, client-key.pem: require TLS",
        ),
        Option(
            "reconnect-delay", "float", 0.0,
            "seconds a request waits for a lost server to come back before failing with EIO",
            minimum=0,
        ),
    )  # fmt: skip
    graph_op = GraphOp.REFUSE  # no host file to put an overlay beside

    _client: NbdClient | None = None
    _supervisor: trio.CancelScope | None = None

    # -- opening -------------------------------------------------------------------

    def _server(self) -> Address:
        o = self.options
        kind = o.get("server.type") or ("unix" if o.get("server.path") else "inet")
        if kind == "unix":
            if not o.get("server.path"):
                raise OpenError(f"node '{self.name}': option 'server.path' is required "
                                "for server.type unix")  # fmt: skip
            return Address(path=str(o["server.path"]))
        if not o.get("server.host"):
            raise OpenError(f"node '{self.name}': option 'server.host' is required "
                            "(or give server.path for a unix socket)")  # fmt: skip
        return Address(host=str(o["server.host"]), port=int(o.get("server.port") or DEFAULT_PORT))

    @property
    def _where(self) -> str:
        option = "server.path" if self.server.path is not None else "server.host"
        return f"node '{self.name}': option '{option}'"

    async def open(self) -> None:
        await super().open()
        self.server = self._server()
        self.export = str(self.options.get("export") or "")
        self.reconnect_delay = float(self.options.get("reconnect-delay") or 0)
        creds = self.options.get("tls-creds")
        self.tls_creds = str(creds) if creds else None
        if self.tls_creds and not os.path.isdir(self.tls_creds):
            raise OpenError(f"node '{self.name}': option 'tls-creds': '{self.tls_creds}' is "
                            "not a folder")  # fmt: skip
        self.reconnects = 0
        try:
            libnbd()
        except ImportError as e:
            raise OpenError(f"node '{self.name}': the nbd driver needs libnbd: {e}") from None
        try:
            client = await NbdClient.connect(
                self.server, self.export, CONNECT_TIMEOUT, self.tls_creds
            )
        except OSError as e:
            raise OpenError(f"{self._where}: cannot open export '{self.export}' on the NBD "
                            f"server at {self.server}: {e.strerror or e}") from None  # fmt: skip
        info = client.info()
        if info.read_only and not self.read_only:
            await client.close()
            raise OpenError(f"node '{self.name}': export '{self.export}' at {self.server} is "
                            "read-only; set read-only = true to use it")  # fmt: skip
        self.export_info: ExportInfo = info
        self.size = info.size
        self.request_alignment = info.min_block
        limit = min(info.max_block or MAX_COMMAND, MAX_COMMAND)
        self.max_command = max(limit - limit % info.min_block, info.min_block)
        self._client = client
        self._changed = trio.Event()  # set (and replaced) whenever _client changes
        self._closing = False
        trio.lowlevel.spawn_system_task(self._supervise, name=f"nbd node {self.name}")

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- reconnection --------------------------------------------------------------

    async def _supervise(self) -> None:
        """Reconnect whenever the connection drops, until the node closes."""
        with trio.CancelScope() as self._supervisor:
            try:
                while not self._closing:
                    client = self._client
                    assert client is not None
                    await client.lost.wait()
                    if self._closing:
                        return
                    log.warning("node '%s': lost the NBD server at %s; reconnecting",
                                self.name, self.server)  # fmt: skip
                    await client.close()
                    self._set_client(await self._reconnect())
                    self.reconnects += 1
                    log.warning("node '%s': reconnected to the NBD server at %s",
                                self.name, self.server)  # fmt: skip
            except Exception:
                log.exception("node '%s': unexpected error while reconnecting", self.name)

    async def _reconnect(self) -> NbdClient:
        pause = 0.1
        while True:
            try:
                client = await NbdClient.connect(
                    self.server, self.export, CONNECT_TIMEOUT, self.tls_creds
                )
            except OSError as e:
                log.debug("node '%s': reconnecting: %s", self.name, e)
            else:
                info = client.info()
                if info.size == self.size and (self.read_only or not info.read_only):
                    return client
                log.error("node '%s': export '%s' at %s came back changed (size %d, "
                          "read-only %s); not using it", self.name, self.export, self.server,
                          info.size, info.read_only)  # fmt: skip
                await client.close()
            await trio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def _connect(self) -> NbdClient:
        return await NbdClient.connect(self.server, self.export, CONNECT_TIMEOUT, self.tls_creds)

    def _set_client(self, client: NbdClient) -> None:
        self._client = client
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def _call(self, what: str, run: Callable[[NbdClient], Awaitable[T]]) -> T:
        """Run `run` on the current connection, waiting out a reconnection if allowed."""
        lost_since: float | None = None
        while True:
            client = self._client
            if client is None:
                raise IOFailure(f"node '{self.name}': {what}: the node is closed")
            if not client.lost.is_set():
                started = trio.current_time()
                try:
                    if not self.reconnect_delay:
                        return await run(client)
                    with trio.move_on_after(self.reconnect_delay):
                        return await run(client)
                    # no reply for reconnect-delay seconds: a frozen server or a
                    # dead path looks like a lost one, and is treated as one
                    log.warning("node '%s': %s: no reply from the NBD server at %s within "
                                "%g s; dropping the connection", self.name, what, self.server,
                                self.reconnect_delay)  # fmt: skip
                    client.abandon()
                    lost_since = started
                except ConnectionLost:
                    pass
                except OSError as e:
                    raise IOFailure(
                        f"node '{self.name}': {what} failed on the NBD server at "
                        f"{self.server}: {e.strerror or e}",
                        e.errno or errno.EIO,
                    ) from None
            now = trio.current_time()
            if lost_since is None:
                lost_since = min(client.lost_at or now, now)
            remaining = lost_since + self.reconnect_delay - now
            if remaining <= 0:
                raise IOFailure(f"node '{self.name}': {what}: the NBD server at {self.server} "
                                f"is unreachable (reconnect-delay {self.reconnect_delay:g} s)",
                                errno.EIO)  # fmt: skip
            if self._client is client:
                with trio.move_on_after(remaining):
                    await self._changed.wait()

    # -- requests --------------------------------------------------------------------

    def _pieces(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        return [(o, min(limit, offset + length - o)) for o in range(offset, offset + length, limit)]

    async def read(self, offset: int, length: int) -> bytes:
        nbd = libnbd()
        out = bytearray(length)
        view = memoryview(out)
        for at, n in self._pieces(offset, length, self.max_command):
            buf = nbd.Buffer.from_buffer(view[at - offset : at - offset + n])

            async def run(c: NbdClient, at: int = at, buf: Any = buf) -> None:
                await c.command(lambda done: c.h.aio_pread(buf, at, completion=done), buf)

            await self._call(f"read at {at}+{n}", run)
        return bytes(out)

    async def write(self, offset: int, data: bytes) -> None:
        nbd = libnbd()
        view = memoryview(data)
        for at, n in self._pieces(offset, len(data), self.max_command):
            buf = nbd.Buffer.from_buffer(view[at - offset : at - offset + n])

            async def run(c: NbdClient, at: int = at, buf: Any = buf) -> None:
                await c.command(lambda done: c.h.aio_pwrite(buf, at, completion=done), buf)

            await self._call(f"write at {at}+{n}", run)

    async def flush(self) -> None:
        if not self.export_info.can_flush:
            return

        async def run(c: NbdClient) -> None:
            await c.command(lambda done: c.h.aio_flush(completion=done))

        await self._call("flush", run)

    async def discard(self, offset: int, length: int) -> None:
        if not self.export_info.can_trim or self.read_only:
            return
        for at, n in self._pieces(offset, length, self._big_piece()):

            async def run(c: NbdClient, at: int = at, n: int = n) -> None:
                await c.command(lambda done: c.h.aio_trim(n, at, completion=done))

            await self._call(f"trim at {at}+{n}", run)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if not self.export_info.can_zero:
            zeroes = bytes(min(length, 1 << 20))
            for at, n in self._pieces(offset, length, len(zeroes) or 1):
                await self.write(at, zeroes[:n])
            return
        flags = 0 if unmap else libnbd().CMD_FLAG_NO_HOLE
        for at, n in self._pieces(offset, length, self._big_piece()):

            async def run(c: NbdClient, at: int = at, n: int = n) -> None:
                await c.command(lambda done: c.h.aio_zero(n, at, completion=done, flags=flags))

            await self._call(f"write-zeroes at {at}+{n}", run)

    def _big_piece(self) -> int:
        """The largest aligned length for commands without a payload (trim, zero)."""
        return MAX_STATUS - MAX_STATUS % self.request_alignment

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if not self.export_info.base_allocation:
            return [Extent(offset, length, Status.DATA | Status.ALLOCATED)]
        nbd = libnbd()
        end = offset + length
        out: list[Extent] = []
        pos = offset
        while pos < end:
            found: list[Extent] = []

            def extent(context: str, start: int, entries: list[int], error: Any,
                       found: list[Extent] = found) -> int:  # fmt: skip
                if context != nbd.CONTEXT_BASE_ALLOCATION:
                    return 0
                at = start
                for i in range(0, len(entries) - 1, 2):
                    n, flags = entries[i], entries[i + 1]
                    status = Status.ALLOCATED
                    if not flags & nbd.STATE_HOLE:
                        status |= Status.DATA
                    if flags & nbd.STATE_ZERO:
                        status |= Status.ZERO
                    found.append(Extent(at, n, status))
                    at += n
                return 0

            count = min(end - pos, self._big_piece())

            async def run(
                c: NbdClient, pos: int = pos, count: int = count, found: list[Extent] = found
            ) -> None:
                found.clear()  # a retry after a reconnection starts afresh
                await c.command(
                    lambda done: c.h.aio_block_status(count, pos, extent, completion=done)
                )

            await self._call(f"block status at {pos}+{count}", run)
            got = clip_extents(found, pos, end - pos)
            if not got or got[0].offset != pos:
                # a server that says nothing useful: call it data
                got = [Extent(pos, end - pos, Status.DATA | Status.ALLOCATED)]
            out.extend(got)
            pos = got[-1].end
        return merge_extents(out)

    def driver_stats(self) -> dict[str, Any]:
        client = self._client
        return {
            "server": str(self.server),
            "export": self.export,
            "connected": client is not None and not client.lost.is_set(),
            "reconnects": self.reconnects,
        }
