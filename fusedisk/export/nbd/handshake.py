"""The fixed newstyle negotiation: which disk a client gets, and on what terms.

Options are answered one by one until NBD_OPT_GO (or the old
NBD_OPT_EXPORT_NAME) picks a disk, or the client aborts.  A malformed option
payload gets NBD_REP_ERR_INVALID and the negotiation goes on (the payload was
read whole, so the stream is still in step); a bad magic, unknown client
flags or an oversized option end the connection, and so does an
NBD_OPT_EXPORT_NAME that cannot be granted (HangUp: that option has no error
reply, and a client would read one as the export's size).
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from fusedisk.export.nbd import meta
from fusedisk.export.nbd import protocol as p
from fusedisk.export.nbd.connection import Connection
from fusedisk.graph.disk import Disk

#: the context id we give base:allocation
BASE_ALLOCATION_ID = 1
PREFERRED_BLOCK = 4096


class HangUp(p.ProtocolError):
    """The connection ends here, with no option reply (one would be misread)."""


class TLSFailed(HangUp):
    """The TLS handshake failed: the stream is unusable, the connection ends."""


@dataclass
class Session:
    """What the negotiation settled for the transmission phase."""

    name: str
    disk: Disk
    structured: bool
    base_allocation: bool  # block status may be asked
    #: qemu:dirty-bitmap contexts: id -> bitmap name (export/nbd/meta.py)
    bitmaps: dict[int, str] = field(default_factory=dict)


def export_flags(disk: Disk, structured: bool) -> int:
    flags = (
        p.TF_HAS_FLAGS
        | p.TF_SEND_FLUSH
        | p.TF_SEND_FUA
        | p.TF_SEND_TRIM
        | p.TF_SEND_WRITE_ZEROES
        | p.TF_SEND_FAST_ZERO
        # every connection reaches the same Disk, whose flush covers all of
        # them: what multi-conn asks for
        | p.TF_CAN_MULTI_CONN
    )
    if structured:
        flags |= p.TF_SEND_DF
    if disk.read_only:
        flags |= p.TF_READ_ONLY
    return flags


def find_disk(disks: Mapping[str, Disk], name: str) -> Disk | None:
    """A disk by name; the empty name (a client's default) is the first disk."""
    if name == "":
        return next(iter(disks.values()), None)
    return disks.get(name)


class Negotiation:
    def __init__(
        self, conn: Connection, disks: Mapping[str, Disk], tls: ssl.SSLContext | None = None
    ) -> None:
        self.conn = conn
        self.disks = disks
        self.tls = tls  # when set, nothing but STARTTLS and ABORT before TLS
        self.encrypted = False
        self.structured = False
        self.no_zeroes = False
        self.meta_export: str | None = None  # export for which meta contexts were set
        self.meta_contexts: list[str] = []  # the contexts set, in order (meta.py)

    async def run(self) -> Session | None:
        """Negotiate; None if the client aborted."""
        await self.conn.send(
            p.HANDSHAKE_HEADER.pack(
                p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
            )
        )
        (client_flags,) = struct.unpack(">I", await self.conn.receive_exactly(4))
        if client_flags & ~p.KNOWN_CLIENT_FLAGS:
            raise p.ProtocolError(f"unknown client flags {client_flags:#x}")
        if not client_flags & p.FLAG_C_FIXED_NEWSTYLE:
            raise p.ProtocolError("the client does not speak fixed newstyle")
        self.no_zeroes = bool(client_flags & p.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = p.OPTION_HEADER.unpack(
                await self.conn.receive_exactly(p.OPTION_HEADER.size)
            )
            if magic != p.IHAVEOPT:
                raise p.ProtocolError(f"bad option magic {magic:#x}")
            if length > p.MAX_OPTION:
                raise p.ProtocolError(f"option {option} of {length} bytes is too large")
            data = await self.conn.receive_exactly(length)
            try:
                session = await self.option(option, data)
            except HangUp:
                raise
            except p.ProtocolError as e:
                await self.reply(option, p.REP_ERR_INVALID, str(e).encode())
                continue
            if session is not None or option == p.OPT_ABORT:
                return session

    async def reply(self, option: int, kind: int, payload: bytes = b"") -> None:
        await self.conn.send(p.option_reply(option, kind, payload))

    async def option(self, option: int, data: bytes) -> Session | None:
        if option == p.OPT_ABORT:
            await self.reply(option, p.REP_ACK)
            return None
        if option == p.OPT_STARTTLS:
            await self.start_tls(data)
            return None
        if self.tls is not None and not self.encrypted:
            if option == p.OPT_EXPORT_NAME:
                raise HangUp("NBD_OPT_EXPORT_NAME before TLS on a TLS-only server")
            await self.reply(option, p.REP_ERR_TLS_REQD, b"this server requires TLS first")
            return None
        if option == p.OPT_EXPORT_NAME:
            return await self.export_name(data)
        if option in (p.OPT_GO, p.OPT_INFO):
            return await self.go_or_info(option, data)
        if option == p.OPT_LIST:
            if data:
                raise p.ProtocolError("NBD_OPT_LIST takes no data")
            for name in self.disks:
                await self.reply(option, p.REP_SERVER, p.name_payload(name))
            await self.reply(option, p.REP_ACK)
            return None
        if option == p.OPT_STRUCTURED_REPLY:
            if data:
                raise p.ProtocolError("NBD_OPT_STRUCTURED_REPLY takes no data")
            self.structured = True
            await self.reply(option, p.REP_ACK)
            return None
        if option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            await self.meta_context(option, data)
            return None
        await self.reply(option, p.REP_ERR_UNSUP, b"option not supported")
        return None

    async def start_tls(self, data: bytes) -> None:
        if self.tls is None:
            await self.reply(p.OPT_STARTTLS, p.REP_ERR_POLICY, b"TLS is not configured")
            return
        if data:
            raise p.ProtocolError("NBD_OPT_STARTTLS takes no data")
        if self.encrypted:
            raise p.ProtocolError("TLS is already on")
        await self.reply(p.OPT_STARTTLS, p.REP_ACK)
        try:
            await self.conn.start_tls(self.tls)
        except p.ProtocolError as e:
            raise TLSFailed(str(e)) from None
        self.encrypted = True
        self.structured = False  # what was said in clear text does not count
        self.meta_export = None

    async def export_name(self, data: bytes) -> Session:
        try:
            name = p.parse_export_name(data)
        except p.ProtocolError as e:
            raise HangUp(str(e)) from None
        disk = find_disk(self.disks, name)
        if disk is None:
            # this old option has no error reply: the spec says to hang up (a client
            # would read an option reply's magic as the export's size)
            raise HangUp(f"NBD_OPT_EXPORT_NAME: no disk named {name!r}")
        tail = b"" if self.no_zeroes else bytes(124)
        await self.conn.send(
            struct.pack(">QH", disk.size, export_flags(disk, self.structured)) + tail
        )
        return self.session(name, disk)

    async def go_or_info(self, option: int, data: bytes) -> Session | None:
        request = p.parse_info_request(data)
        disk = find_disk(self.disks, request.name)
        if disk is None:
            await self.reply(option, p.REP_ERR_UNKNOWN, f"no disk named {request.name!r}".encode())
            return None
        flags = export_flags(disk, self.structured)
        await self.reply(option, p.REP_INFO, p.info_export(disk.size, flags))
        # block sizes are sent unasked (the protocol allows it): requests of
        # any alignment are fine, up to 32 MiB
        await self.reply(option, p.REP_INFO, p.info_block_size(1, PREFERRED_BLOCK, p.MAX_REQUEST))
        if p.INFO_NAME in request.infos:
            await self.reply(
                option, p.REP_INFO, struct.pack(">H", p.INFO_NAME) + request.name.encode()
            )
        await self.reply(option, p.REP_ACK)
        if option == p.OPT_INFO:
            return None
        return self.session(request.name, disk)

    async def meta_context(self, option: int, data: bytes) -> None:
        request = p.parse_meta_request(data)
        if option == p.OPT_SET_META_CONTEXT and not self.structured:
            raise p.ProtocolError("NBD_OPT_SET_META_CONTEXT needs structured replies first")
        if find_disk(self.disks, request.export) is None:
            message = f"no disk named {request.export!r}"
            await self.reply(option, p.REP_ERR_UNKNOWN, message.encode())
            return
        listing = option == p.OPT_LIST_META_CONTEXT
        disk = find_disk(self.disks, request.export)
        assert disk is not None
        chosen = meta.select(disk, request.queries, listing)
        if option == p.OPT_SET_META_CONTEXT:
            self.meta_export = request.export if chosen else None
            self.meta_contexts = chosen
        for i, name in enumerate(chosen):
            context_id = 0 if listing else _context_id(chosen, i)
            await self.reply(
                option, p.REP_META_CONTEXT, struct.pack(">I", context_id) + name.encode()
            )
        await self.reply(option, p.REP_ACK)

    def session(self, name: str, disk: Disk) -> Session:
        has_meta = self.structured and self.meta_export is not None
        if has_meta and find_disk(self.disks, self.meta_export or "") is not disk:
            has_meta = False
        contexts = self.meta_contexts if has_meta else []
        bitmaps = {}
        for i, context in enumerate(contexts):
            bitmap = meta.bitmap_name(context)
            if bitmap is not None:
                bitmaps[_context_id(contexts, i)] = bitmap
        base = meta.BASE_ALLOCATION in contexts
        return Session(name or disk.name, disk, self.structured, base, bitmaps)


def _context_id(contexts: list[str], i: int) -> int:
    """base:allocation is 1; the others count from 2 in the order they were set."""
    if contexts[i] == meta.BASE_ALLOCATION:
        return BASE_ALLOCATION_ID
    return 2 + sum(1 for c in contexts[:i] if c != meta.BASE_ALLOCATION)
