"""The transmission phase: requests onto the Disk, many in flight per connection.

The reader loop parses one request after another and starts each in its own
task, so a slow flush does not hold up the reads queued behind it (clients
such as qemu and nbdcopy keep tens of requests in flight).  Replies go back
in completion order, each whole (Connection.send).  At most MAX_IN_FLIGHT
requests run per connection: the reader stops reading until one finishes,
and each request first takes its bytes from the connection's and the daemon's
budgets (budget.py), given back once its reply is on the socket: that bounds
the memory a client can pin, even one that never reads its replies.

A write is answered once its data is in the host file, not merely queued
beside it (WRITE_THROUGH): the end of a connection that wrote flushes the
disk, but a client that exits without NBD_CMD_DISC does not wait for that.

Disk operations run shielded from cancellation: a write cut in half inside a
format (qcow2 metadata) would be worse than the delay of letting it finish
when the daemon stops.  A client that vanishes leaves its requests running to
the end; their replies are dropped.
"""

from __future__ import annotations

import logging
import struct

import trio

from fusedisk.errors import FuseDiskError, to_errno
from fusedisk.export.nbd import meta
from fusedisk.export.nbd import protocol as p
from fusedisk.export.nbd.block_status import MAX_EXTENTS, walk
from fusedisk.export.nbd.budget import CONNECTION_BYTES, Budget, Hold
from fusedisk.export.nbd.connection import ClientGone, Connection
from fusedisk.export.nbd.handshake import BASE_ALLOCATION_ID, Session
from fusedisk.export.nbd.limits import DaemonLimits
from fusedisk.graph.disk import is_zero
from fusedisk.graph.extents import Status
from fusedisk.hostio.write_behind import WRITE_THROUGH

log = logging.getLogger("fusedisk")

MAX_IN_FLIGHT = 64
#: while connections crowd the cap (limits.py), a client that chose a disk and has
#: sent no request for this long is hung up on: it holds a descriptor for nothing.
#: Otherwise, and once it has sent a request, it may stay quiet as long as it likes:
#: qemu, the kernel's client and our own nbd driver keep idle disks open for hours.
FIRST_REQUEST_TIMEOUT = 30.0
BLOCK_STATUS_BYTES = MAX_EXTENTS * 8


def request_bytes(req: p.Request) -> int:
    """What a request may hold in memory: its data, or its reply's at most."""
    if req.type in (p.CMD_READ, p.CMD_WRITE):
        return min(req.length, p.MAX_REQUEST)
    if req.type == p.CMD_BLOCK_STATUS:
        return BLOCK_STATUS_BYTES
    return 0


class RequestError(Exception):
    """A request refused with an NBD error, before or instead of touching the disk."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


class Transmission:
    def __init__(
        self, conn: Connection, session: Session, limits: DaemonLimits | None = None
    ) -> None:
        self.conn = conn
        self.session = session
        self.disk = session.disk
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self.budget = Budget(CONNECTION_BYTES)
        self.limits = limits or DaemonLimits()
        self._holds: dict[int, Hold] = {}  # id(request) -> its bytes, until its reply is sent
        self._wrote = False  # the client wrote (a write, trim or write-zeroes)

    async def run(self) -> None:
        """Serve requests until the client disconnects; in-flight ones finish first.

        Raises ClientGone or ProtocolError (after the in-flight requests are
        done) when the client vanished or broke the protocol.
        """
        try:
            async with trio.open_nursery() as outer:
                await outer.start(self.conn.writer)
                async with trio.open_nursery() as nursery:
                    ended = await self._read_requests(nursery)
                self.conn.finish_writing()
        finally:  # however it ended: DISC, end of stream, reset, error, cancelled
            await self._flush_at_end()
        if ended is not None:
            raise ended

    async def _flush_at_end(self) -> None:
        """A connection that wrote flushes the disk as it ends, as a close(2) of the disk
        file does: what a client such as nbdcopy wrote is then in the host files."""
        if not self._wrote:
            return
        with trio.CancelScope(shield=True):
            try:
                await self.disk.flush()
            except Exception as e:  # nobody is left to tell but the log
                log.warning("disk '%s': the flush at the end of an NBD connection failed: %s",
                            self.disk.name, e)  # fmt: skip

    async def _read_requests(self, nursery: trio.Nursery) -> Exception | None:
        """Start a task per request; returns why the stream ended (None: NBD_CMD_DISC)."""
        first = True
        while True:
            await self._slots.acquire()
            if self.conn.broken:  # hung up on (its replies were not read): no more
                self._slots.release()
                return ClientGone("it read none of its replies")
            hold = Hold(self.budget, self.limits.bytes)
            try:
                req = p.parse_request(await self._next_header(first))
                first = False
                # not another byte read from this client until the request's fit
                await hold.take(request_bytes(req))
                payload = b""
                if req.type == p.CMD_WRITE:
                    if req.length > p.MAX_REQUEST:
                        # its payload cannot be trusted to be skipped: hang up
                        raise p.ProtocolError(
                            f"write of {req.length} bytes is larger than {p.MAX_REQUEST}"
                        )
                    payload = await self.conn.receive_exactly(req.length)
            except (ClientGone, p.ProtocolError) as e:
                hold.release()
                self._slots.release()
                return e
            except BaseException:
                hold.release()
                self._slots.release()
                raise
            if req.type == p.CMD_DISC:
                hold.release()
                self._slots.release()
                return None
            self._holds[id(req)] = hold
            nursery.start_soon(self._serve, req, payload)

    async def _next_header(self, first: bool) -> bytes:
        """The next request header; while connections crowd the cap, the first must
        come within FIRST_REQUEST_TIMEOUT."""
        if not first:
            return await self.conn.receive_exactly(p.REQUEST.size)
        while True:
            # cancelled in receive_some, so no byte is lost: waiting again is safe
            with trio.move_on_after(FIRST_REQUEST_TIMEOUT):
                return await self.conn.receive_exactly(p.REQUEST.size)
            if self.limits.crowded():
                raise p.ProtocolError(f"no request within {FIRST_REQUEST_TIMEOUT:g} s of "
                                      f"choosing disk '{self.disk.name}', with "
                                      f"{self.limits.connections} connections open")  # fmt: skip

    async def _send(self, req: p.Request, *parts: bytes) -> None:
        """The reply to `req`; its bytes in flight are given back once it is on the socket."""
        hold = self._holds.pop(id(req), None)
        await self.conn.send(*parts, on_sent=hold.release if hold else None)

    async def _serve(self, req: p.Request, payload: bytes) -> None:
        # a write's reply says the data is in the host file: the client may exit
        # without NBD_CMD_DISC and the daemon die before it reads the end of the stream
        WRITE_THROUGH.set(True)
        try:
            error = p.check_request(
                req, self.disk.size, self.disk.read_only, self.session.structured
            )
            if error:
                raise RequestError(error, self._refusal(req, error))
            with trio.CancelScope(shield=True):
                await self._execute(req, payload)
        except RequestError as e:
            await self._error(req, e.error, str(e))
        except (FuseDiskError, OSError) as e:
            log.error("nbd %s, disk '%s': %s failed: %s", self.conn.peer, self.disk.name,
                      req.name, e)  # fmt: skip
            await self._error(req, p.wire_errno(to_errno(e)), str(e))
        except Exception as e:
            log.exception("nbd %s, disk '%s': %s: unexpected error", self.conn.peer,
                          self.disk.name, req.name)  # fmt: skip
            await self._error(req, p.EIO, f"internal error: {e}")
        finally:
            hold = self._holds.pop(id(req), None)
            if hold is not None:  # no reply went out (cancelled)
                hold.release()
            self._slots.release()

    def _refusal(self, req: p.Request, error: int) -> str:
        where = f"{req.name} at {req.offset}+{req.length}"
        if error == p.EPERM:
            return f"disk '{self.disk.name}' is read-only: {where} refused"
        if error in (p.ENOSPC,) or req.offset + req.length > self.disk.size:
            return f"disk '{self.disk.name}': {where} is past its end ({self.disk.size})"
        if error == p.EOVERFLOW:
            return f"{where}: larger than {p.MAX_REQUEST} bytes"
        return f"disk '{self.disk.name}': {where} (flags {req.flags:#x}) is not valid"

    async def _error(self, req: p.Request, error: int, message: str) -> None:
        if self.session.structured:
            await self._send(req, p.error_chunk(req.cookie, error, message))
        else:
            await self._send(req, p.simple_reply(req.cookie, error))

    async def _done(self, req: p.Request) -> None:
        if self.session.structured:
            await self._send(req, p.chunk_header(req.cookie, p.REPLY_TYPE_NONE, 0, True))
        else:
            await self._send(req, p.simple_reply(req.cookie))

    async def _execute(self, req: p.Request, payload: bytes) -> None:
        disk = self.disk
        kind = req.type
        if kind == p.CMD_READ:
            await self._read(req)
            return
        if kind == p.CMD_BLOCK_STATUS:
            await self._block_status(req)
            return
        if kind in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
            self._wrote = True
        if kind == p.CMD_WRITE:
            await disk.write(req.offset, payload)
        elif kind == p.CMD_FLUSH:
            await disk.flush()
        elif kind == p.CMD_TRIM:
            await disk.discard(req.offset, req.length)
        elif kind == p.CMD_WRITE_ZEROES:
            await self._write_zeroes(req)
        if req.flags & p.CMD_FLAG_FUA:
            await disk.flush()
        await self._done(req)

    async def _read(self, req: p.Request) -> None:
        data = await self.disk.read(req.offset, req.length) if req.length else b""
        if not self.session.structured:
            await self._send(req, p.simple_reply(req.cookie), data)
            return
        if not data:
            await self._done(req)
        elif is_zero(data):
            # a hole chunk saves the client reading (and the wire carrying) zeroes
            body = struct.pack(">QI", req.offset, len(data))
            header = p.chunk_header(req.cookie, p.REPLY_TYPE_OFFSET_HOLE, len(body), True)
            await self._send(req, header + body)
        else:
            header = p.chunk_header(req.cookie, p.REPLY_TYPE_OFFSET_DATA, 8 + len(data), True)
            await self._send(req, header + req.offset.to_bytes(8, "big"), data)

    async def _write_zeroes(self, req: p.Request) -> None:
        if req.flags & p.CMD_FLAG_FAST_ZERO and not await self._reads_as_zero(req):
            # nodes do not say whether zeroing is cheap; the client falls back
            # to writing zeroes itself only where it needs them
            raise RequestError(p.ENOTSUP, "fast zero is only done where the disk reads as zero")
        unmap = not req.flags & p.CMD_FLAG_NO_HOLE
        await self.disk.write_zeroes(req.offset, req.length, unmap)

    async def _reads_as_zero(self, req: p.Request) -> bool:
        if req.length == 0:
            return True
        extents = await self.disk.block_status(req.offset, req.length)
        covered = sum(e.length for e in extents if e.status & Status.ZERO)
        return covered >= req.length

    async def _block_status(self, req: p.Request) -> None:
        """One chunk per meta context the client set, sent together (export/nbd/meta.py)."""
        session = self.session
        if not session.base_allocation and not session.bitmaps:
            raise RequestError(p.EINVAL, "block status needs a meta context (base:allocation "
                               "or qemu:dirty-bitmap:NAME)")  # fmt: skip
        one = bool(req.flags & p.CMD_FLAG_REQ_ONE)
        chunks = []
        if session.base_allocation:
            # walked in slices that yield, one at a time in the daemon (block_status.py)
            pairs = await walk(self.disk, req.offset, req.length, one, self.limits.walks)
            if not pairs:
                raise RequestError(p.EIO, "the disk reported no extents")
            chunks.append((BASE_ALLOCATION_ID, pairs))
        for context_id, name in session.bitmaps.items():
            dirty = meta.dirty_extents(self.disk, name, req.offset, req.length)
            if dirty is None:
                raise RequestError(p.EINVAL, f"bitmap '{name}' is gone")
            chunks.append((context_id, dirty[:1] if one else dirty[:MAX_EXTENTS]))
        last = len(chunks) - 1
        await self._send(req, b"".join(p.block_status_chunk(req.cookie, cid, pairs, i == last)
                                       for i, (cid, pairs) in enumerate(chunks)))  # fmt: skip
