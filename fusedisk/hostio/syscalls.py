"""The blocking host calls behind a HostFile, as plain functions of a file descriptor.

They run in a worker thread or, when they cannot block, inline (host_file.py
decides which): fallocate with flags (Python has none, so through ctypes),
reads and writes that loop until complete (pread/pwrite may return short
counts), O_DIRECT reads and writes through page-aligned buffers (mmap) kept
per thread, the O_DIRECT alignment of a file (statx), and reads that land
directly in the `bytes` object returned (made unfilled, as C code makes them,
and filled by preadv2 through ctypes): one copy instead of two.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
from collections.abc import Callable

Buffer = bytes | bytearray | memoryview

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


def pwrite_full(fd: int, data: Buffer, offset: int) -> None:
    written = os.pwrite(fd, data, offset)
    if written == len(data):
        return
    view = memoryview(data)
    while written < len(data):
        written += os.pwrite(fd, view[written:], offset + written)


def write_zero_bytes(
    fd: int, offset: int, length: int, write: Callable[[int, Buffer, int], None] = pwrite_full
) -> None:
    """The slow way to zero a range, for files that support no fallocate mode."""
    chunk = bytes(min(length, 1 << 20))
    view = memoryview(chunk)
    while length > 0:
        n = min(length, len(chunk))
        write(fd, view[:n], offset)
        offset += n
        length -= n


# -- O_DIRECT -----------------------------------------------------------------------


class _AlignedBuffers(threading.local):
    """A page-aligned buffer per thread (mmap), grown on demand and reused."""

    def __init__(self) -> None:
        self.size = 0
        self.map: mmap.mmap | None = None

    def get(self, size: int) -> memoryview:
        if size > self.size:
            if self.map is not None:
                self.map.close()
            self.size = max(size, 1 << 20)
            self.size = -(-self.size // mmap.PAGESIZE) * mmap.PAGESIZE
            self.map = mmap.mmap(-1, self.size)
        assert self.map is not None
        return memoryview(self.map)[:size]


_aligned = _AlignedBuffers()


def direct_pread(fd: int, length: int, offset: int) -> bytes:
    """pread for an O_DIRECT file: into an aligned buffer; past the end reads as zeroes."""
    buf = _aligned.get(length)
    try:
        got = 0
        while got < length:
            n = os.preadv(fd, [buf[got:]], offset + got)
            got += n
            if n == 0 or got % mmap.PAGESIZE:
                break  # a short O_DIRECT read: the end of the file
        return bytes(buf[:got]) + bytes(length - got) if got < length else bytes(buf)
    finally:
        buf.release()


def direct_pwrite(fd: int, data: Buffer, offset: int) -> None:
    """pwrite for an O_DIRECT file: the data is copied into an aligned buffer first."""
    buf = _aligned.get(len(data))
    try:
        buf[:] = data
        written = 0
        while written < len(data):
            written += os.pwritev(fd, [buf[written:]], offset + written)
    finally:
        buf.release()


class _Statx(ctypes.Structure):
    # struct statx up to the direct I/O alignment fields (linux/stat.h), padded to 256 bytes
    _fields_ = [
        ("mask", ctypes.c_uint32),
        ("head", ctypes.c_uint8 * 148),
        ("dio_mem_align", ctypes.c_uint32),
        ("dio_offset_align", ctypes.c_uint32),
        ("tail", ctypes.c_uint8 * 96),
    ]


_STATX_DIOALIGN = 0x2000
_AT_EMPTY_PATH = 0x1000


def _statx_dio_alignment(fd: int) -> int | None:
    statx = getattr(_libc, "statx", None)
    if statx is None:
        return None
    buf = _Statx()
    if statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, ctypes.byref(buf)) != 0:
        return None
    if not buf.mask & _STATX_DIOALIGN or buf.dio_offset_align == 0:
        return None
    return int(max(buf.dio_offset_align, buf.dio_mem_align, 1))


def direct_io_alignment(fd: int) -> int:
    """The offset and length alignment O_DIRECT needs on `fd`.

    statx(STATX_DIOALIGN) answers where the kernel and file system know it
    (ext4, xfs, block devices on kernel ≥ 6.1); otherwise a read of 512, then
    4096 bytes at offset 0 is tried, and the first that does not fail with
    EINVAL wins.  Raises OSError when the file refuses O_DIRECT reads.
    """
    found = _statx_dio_alignment(fd)
    if found is not None:
        return found
    for align in (512, 4096):
        try:
            direct_pread(fd, align, 0)
        except OSError as e:
            if e.errno == errno.EINVAL:
                continue
            raise
        return align
    raise OSError(errno.EINVAL, "no O_DIRECT alignment up to 4096 works")


# -- reads in one copy ---------------------------------------------------------------

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc.preadv2.argtypes = [
    ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_int, ctypes.c_longlong, ctypes.c_int
]  # fmt: skip
_libc.preadv2.restype = ctypes.c_ssize_t

#: reads from this size on land directly in the bytes object returned (ctypes costs
#: ~4 µs a call, a second copy of 256 KiB about as much)
ONE_COPY_MIN = 256 << 10


def new_bytes(length: int) -> bytes:
    """A fresh, not yet filled bytes object (as C code makes them), for a read to fill."""
    assert length > 1  # 0 and 1 byte objects are shared singletons
    data: bytes = _new_bytes(None, length)
    return data


def preadv_nowait_into(fd: int, data: bytes, offset: int) -> int:
    """preadv2(RWF_NOWAIT) into a fresh bytes object from `new_bytes`: the count read.

    Raises OSError as os.preadv does (BlockingIOError when the page cache lacks
    the data).  The GIL is released during the call (ctypes does).
    """
    iov = _Iovec(ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value, len(data))
    n = int(_libc.preadv2(fd, ctypes.byref(iov), 1, offset, os.RWF_NOWAIT))
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return n
