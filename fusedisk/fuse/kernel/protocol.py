"""The FUSE kernel protocol: opcodes, flags and the wire structs we use.

References: the kernel's include/uapi/linux/fuse.h (protocol 7.38 here; the
kernel of these machines offers 7.45 and talks the smaller of the two minors)
and Documentation/filesystems/fuse.rst.  Only what fusedisk serves is here;
everything is little-endian and 64-bit aligned, as the header promises.

Parsing is kept apart from serving so it can be tested and fuzzed alone:
`parse_header` and the `*_IN` structs never trust a length the kernel did not
give, and `RequestError` is the one way a malformed request is reported.
"""

from __future__ import annotations

import errno
import struct
from enum import IntEnum

from fusedisk.errors import FuseDiskError

KERNEL_MAJOR = 7
#: the newest minor whose struct layouts this module knows
OUR_MINOR = 38
#: the oldest minor we accept from the kernel (INIT_EXT, max_pages, lseek, fallocate)
MIN_MINOR = 31


class Op(IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    GETXATTR = 22  # not served (ENOSYS): named for the O_TRUNC bookkeeping of the session
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    LSEEK = 46


# INIT flags (fuse_init_in.flags / fuse_init_out.flags; flags2 holds bits 32..63)
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr: 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsec nsec
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
WRITE_OUT = struct.Struct("<II")
LSEEK_OUT = struct.Struct("<Q")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs: 80 bytes
DIRENT = struct.Struct("<QQII")  # ino off namelen type

INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags
INIT_IN_FLAGS2 = struct.Struct("<I")  # follows INIT_IN when INIT_EXT is set
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # 64 bytes
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # valid pad fh size lock atime mtime ctime ...
OPEN_IN = struct.Struct("<II")
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags pad
WRITE_IN = READ_IN  # fh offset size write_flags lock_owner flags pad
RELEASE_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
FLUSH_IN = struct.Struct("<QIIQ")  # fh, unused, padding, lock_owner
FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode pad
LSEEK_IN = struct.Struct("<QQII")  # fh offset whence pad
BATCH_FORGET_IN = struct.Struct("<II")

#: what a read of /dev/fuse may hold besides the data of a WRITE
HEADROOM = 4096


class RequestError(FuseDiskError):
    """A request the kernel sent that cannot be parsed; answered with EINVAL."""

    errno = errno.EINVAL


def parse_header(buf: memoryview, n: int) -> tuple[int, int, int, int, int]:
    """(opcode, unique, nodeid, pid, body_offset) of one request of `n` bytes; pid is
    the calling thread's."""
    if n < IN_HEADER.size:
        raise RequestError(f"short request: {n} bytes")
    length, opcode, unique, nodeid, _uid, _gid, pid, extlen, _ = IN_HEADER.unpack_from(buf)
    if length != n:
        raise RequestError(f"request length {length} but {n} bytes read")
    body = IN_HEADER.size
    if body + extlen * 8 > n:
        raise RequestError(f"extensions of {extlen * 8} bytes past the request's end")
    return opcode, unique, nodeid, pid, body


def unpack(fmt: struct.Struct, buf: memoryview, offset: int, end: int) -> tuple:
    """A struct from the body, or RequestError if the body is too short."""
    if offset + fmt.size > end:
        raise RequestError(f"body of {end - offset} bytes, need {fmt.size}")
    return fmt.unpack_from(buf, offset)


def name_at(buf: memoryview, offset: int, end: int) -> str:
    """A NUL-terminated file name in the body (LOOKUP)."""
    raw = bytes(buf[offset:end])
    cut = raw.find(b"\0")
    if cut < 0:
        raise RequestError("name without a terminating NUL")
    return raw[:cut].decode("utf-8", "surrogateescape")


def pack_attr(
    ino: int, size: int, blocks: int, time_s: int, time_ns: int, mode: int, nlink: int,
    uid: int, gid: int,
) -> bytes:  # fmt: skip
    return ATTR.pack(
        ino, size, blocks, time_s, time_s, time_s, time_ns, time_ns, time_ns,
        mode, nlink, uid, gid, 0, 4096, 0,
    )  # fmt: skip


def split_timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def pack_dirent(ino: int, next_offset: int, name: bytes, dtype: int) -> bytes:
    record = DIRENT.pack(ino, next_offset, len(name), dtype) + name
    return record + b"\0" * (-len(record) % 8)
