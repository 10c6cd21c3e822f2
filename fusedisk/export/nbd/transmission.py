"""The transmission phase: requests onto the Disk, many in flight per connection.

The reader loop parses one request after another and starts each in its own
task, so a slow flush does not hold up the reads queued behind it (clients
such as qemu and nbdcopy keep tens of requests in flight).  Replies go back
in completion order, each whole (Connection.send).  At most MAX_IN_FLIGHT
requests run per connection: the reader stops reading until one finishes,
which bounds the memory a client can pin.

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
from fusedisk.export.nbd.connection import ClientGone, Connection
from fusedisk.export.nbd.handshake import BASE_ALLOCATION_ID, Session
from fusedisk.graph.disk import is_zero
from fusedisk.graph.extents import Status

log = logging.getLogger("fusedisk")

MAX_IN_FLIGHT = 64
#: block status replies carry at most this many extents (the client asks again)
MAX_EXTENTS = 16384


class RequestError(Exception):
    """A request refused with an NBD error, before or instead of touching the disk."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


class Transmission:
    def __init__(self, conn: Connection, session: Session) -> None:
        self.conn = conn
        self.session = session
        self.disk = session.disk
        self._slots = trio.Semaphore(MAX_IN_FLIGHT)
        self._wrote = False  # the client wrote (a write, trim or write-zeroes)

    async def run(self) -> None:
        """Serve requests until the client disconnects; in-flight ones finish first.

        Raises ClientGone or ProtocolError (after the in-flight requests are
        done) when the client vanished or broke the protocol.
        """
        async with trio.open_nursery() as outer:
            await outer.start(self.conn.writer)
            async with trio.open_nursery() as nursery:
                ended = await self._read_requests(nursery)
            self.conn.finish_writing()
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
        while True:
            await self._slots.acquire()
            try:
                req = p.parse_request(await self.conn.receive_exactly(p.REQUEST.size))
                payload = b""
                if req.type == p.CMD_WRITE:
                    if req.length > p.MAX_REQUEST:
                        # its payload cannot be trusted to be skipped: hang up
                        raise p.ProtocolError(
                            f"write of {req.length} bytes is larger than {p.MAX_REQUEST}"
                        )
                    payload = await self.conn.receive_exactly(req.length)
            except (ClientGone, p.ProtocolError) as e:
                self._slots.release()
                return e
            except BaseException:
                self._slots.release()
                raise
            if req.type == p.CMD_DISC:
                self._slots.release()
                return None
            nursery.start_soon(self._serve, req, payload)

    async def _serve(self, req: p.Request, payload: bytes) -> None:
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
            await self.conn.send(p.error_chunk(req.cookie, error, message))
        else:
            await self.conn.send(p.simple_reply(req.cookie, error))

    async def _done(self, req: p.Request) -> None:
        if self.session.structured:
            await self.conn.send(p.chunk_header(req.cookie, p.REPLY_TYPE_NONE, 0, True))
        else:
            await self.conn.send(p.simple_reply(req.cookie))

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
            await self.conn.send(p.simple_reply(req.cookie), data)
            return
        if not data:
            await self._done(req)
        elif is_zero(data):
            # a hole chunk saves the client reading (and the wire carrying) zeroes
            body = struct.pack(">QI", req.offset, len(data))
            header = p.chunk_header(req.cookie, p.REPLY_TYPE_OFFSET_HOLE, len(body), True)
            await self.conn.send(header + body)
        else:
            header = p.chunk_header(req.cookie, p.REPLY_TYPE_OFFSET_DATA, 8 + len(data), True)
            await self.conn.send(header + req.offset.to_bytes(8, "big"), data)

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
        chunks = []
        if session.base_allocation:
            chunks.append((BASE_ALLOCATION_ID, await self._allocation(req)))
        for context_id, name in session.bitmaps.items():
            pairs = meta.dirty_extents(self.disk, name, req.offset, req.length)
            if pairs is None:
                raise RequestError(p.EINVAL, f"bitmap '{name}' is gone")
            chunks.append((context_id, pairs[:1] if req.flags & p.CMD_FLAG_REQ_ONE else
                           pairs[:MAX_EXTENTS]))  # fmt: skip
        last = len(chunks) - 1
        await self.conn.send(b"".join(p.block_status_chunk(req.cookie, cid, pairs, i == last)
                                      for i, (cid, pairs) in enumerate(chunks)))  # fmt: skip

    async def _allocation(self, req: p.Request) -> list[tuple[int, int]]:
        """base:allocation's (length, flags) pairs."""
        extents = await self.disk.block_status(req.offset, req.length)
        pairs: list[tuple[int, int]] = []
        for ext in extents:
            flags = 0 if ext.status & Status.DATA else p.STATE_HOLE
            if ext.status & Status.ZERO:
                flags |= p.STATE_ZERO
            if pairs and pairs[-1][1] == flags:
                pairs[-1] = (pairs[-1][0] + ext.length, flags)
            else:
                pairs.append((ext.length, flags))
            if len(pairs) > MAX_EXTENTS:
                break
        pairs = pairs[:1] if req.flags & p.CMD_FLAG_REQ_ONE else pairs[:MAX_EXTENTS]
        if not pairs:
            raise RequestError(p.EIO, "the disk reported no extents")
        return pairs
