"""Host-file primitives the leaf drivers share: fallocate and full pread/pwrite.

Python has no binding for fallocate(2) with flags (os.posix_fallocate has
none), so it is called through ctypes.  Reads and writes loop until complete,
because pread/pwrite may return short counts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """Read exactly `length` bytes; what lies past the end of the file reads as zeroes."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            parts.append(bytes(length - got))
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def pwrite_full(fd: int, data: bytes, offset: int) -> None:
    written = os.pwrite(fd, data, offset)
    if written == len(data):
        return
    view = memoryview(data)
    while written < len(data):
        written += os.pwrite(fd, view[written:], offset + written)


def write_zero_bytes(fd: int, offset: int, length: int) -> None:
    """The slow way to zero a range, for files that support no fallocate mode."""
    chunk = bytes(min(length, 1 << 20))
    while length > 0:
        n = min(length, len(chunk))
        pwrite_full(fd, chunk[:n], offset)
        offset += n
        length -= n
