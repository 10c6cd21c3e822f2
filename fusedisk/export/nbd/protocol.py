"""The NBD wire format: constants, and parsing of what a client sends.

References: the NBD protocol (github.com/NetworkBlockDevice/nbd, doc/proto.md),
fixed newstyle negotiation with structured replies and `base:allocation`.

Everything a client sends is parsed here, by pure functions over bytes that
raise `ProtocolError` on anything malformed, so the parsers can be fuzzed
without a socket (tests/test_nbd_protocol.py).  Building replies is here too;
doing something with a request is not (handshake.py, transmission.py).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

# -- handshake ----------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9  # option replies

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client flags
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags, per export
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_FAST_ZERO = 1 << 11

META_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0  # base:allocation flags
STATE_ZERO = 1 << 1

# -- transmission -------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disconnect",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_WRITE_ZEROES: "write-zeroes",
    CMD_BLOCK_STATUS: "block-status",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
#: the command flags each command may carry; anything else is EINVAL
ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

# errors on the wire are these values, whatever the host's errno numbering
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108
_WIRE_ERRORS = {
    errno.EPERM: EPERM,
    errno.EROFS: EPERM,
    errno.EIO: EIO,
    errno.ENOMEM: ENOMEM,
    errno.EINVAL: EINVAL,
    errno.ENOSPC: ENOSPC,
    errno.EFBIG: ENOSPC,
    errno.EOVERFLOW: EOVERFLOW,
    errno.EOPNOTSUPP: ENOTSUP,
    errno.ENOSYS: ENOTSUP,
    errno.ESHUTDOWN: ESHUTDOWN,
}

#: the largest request (payload or reply data) a client may send or ask for
MAX_REQUEST = 32 << 20
#: the largest option a client may send during the handshake
MAX_OPTION = 64 << 10
MAX_NAME = 4096

HANDSHAKE_HEADER = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot continue."""


def wire_errno(host_errno: int) -> int:
    """The NBD error value for a host errno (NBD fixes its own numbering)."""
    return _WIRE_ERRORS.get(host_errno, EIO)


# -- parsing what a client sends ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.type, f"command {self.type}")


def parse_request(header: bytes) -> Request:
    """A 28-byte request header; a bad magic means the stream is lost."""
    magic, flags, kind, cookie, offset, length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, kind, cookie, offset, length)


def check_request(req: Request, size: int, read_only: bool, structured: bool) -> int:
    """0 if `req` may be served on an export of `size` bytes, else the NBD error.

    Called after the header is read and (for a write) before its payload is,
    so a refused write's payload is still read and dropped by the caller.
    """
    allowed = ALLOWED_FLAGS.get(req.type)
    if allowed is None:
        return EINVAL
    if req.flags & ~allowed:
        return EINVAL
    if req.type == CMD_BLOCK_STATUS and not structured:
        return EINVAL
    if req.type in (CMD_FLUSH, CMD_DISC):
        return 0
    if req.type in (CMD_READ, CMD_WRITE) and req.length > MAX_REQUEST:
        return EOVERFLOW if req.type == CMD_READ else EINVAL
    if req.length == 0 and req.type == CMD_BLOCK_STATUS:
        return EINVAL
    if req.offset + req.length > size:
        return ENOSPC if req.type in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    if read_only and req.type in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
        return EPERM
    return 0


class Cursor:
    """Reads fields from an option's payload; running off its end is a ProtocolError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError(f"{self.what}: truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def string(self, limit: int = MAX_NAME) -> str:
        n = self.u32()
        if n > limit:
            raise ProtocolError(f"{self.what}: a string of {n} bytes is too long")
        try:
            return self.take(n).decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.what}: a name is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{self.what}: {len(self.data) - self.pos} bytes too many")


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """The payload of NBD_OPT_INFO and NBD_OPT_GO."""

    name: str
    infos: tuple[int, ...]


def parse_info_request(data: bytes) -> InfoRequest:
    cur = Cursor(data, "NBD_OPT_GO/INFO")
    name = cur.string()
    count = cur.u16()
    infos = tuple(cur.u16() for _ in range(count))
    cur.end()
    return InfoRequest(name, infos)


@dataclass(frozen=True, slots=True)
class MetaRequest:
    """The payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT."""

    export: str
    queries: tuple[str, ...]


def parse_meta_request(data: bytes) -> MetaRequest:
    cur = Cursor(data, "NBD_OPT_*_META_CONTEXT")
    export = cur.string()
    count = cur.u32()
    if count > 1024:
        raise ProtocolError(f"NBD_OPT_*_META_CONTEXT: {count} queries is too many")
    queries = tuple(cur.string() for _ in range(count))
    cur.end()
    return MetaRequest(export, queries)


def parse_export_name(data: bytes) -> str:
    """NBD_OPT_EXPORT_NAME: the whole payload is the name."""
    if len(data) > MAX_NAME:
        raise ProtocolError("NBD_OPT_EXPORT_NAME: the name is too long")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ProtocolError("NBD_OPT_EXPORT_NAME: the name is not UTF-8") from None


# -- building replies ---------------------------------------------------------


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REPLY_MAGIC, option, reply, len(payload)) + payload


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def name_payload(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, kind: int, length: int, done: bool) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    text = message.encode()[:4096]
    payload = struct.pack(">IH", error, len(text)) + text
    return chunk_header(cookie, REPLY_TYPE_ERROR, len(payload), True) + payload


def block_status_chunk(
    cookie: int, context: int, extents: list[tuple[int, int]], done: bool = True
) -> bytes:
    """`extents` as (length, flags) pairs of one meta context; `done` on the last chunk."""
    flat = [value for pair in extents for value in pair]
    payload = struct.pack(f">I{len(flat)}I", context, *flat)  # one call, not one per extent
    return chunk_header(cookie, REPLY_TYPE_BLOCK_STATUS, len(payload), done) + payload
