"""Image locking as QEMU does it, so fusedisk and QEMU refuse each other as two QEMUs do.

References: QEMU block/file-posix.c (raw_apply_lock_bytes, raw_check_lock_bytes)
and include/block/block-common.h (BLK_PERM_*).  Each block-layer permission n
has two bytes in the image file, locked with shared open-file-description
(OFD) locks, F_RDLCK:

- byte 100 + n: "I hold permission n" (consistent read 0, write 1, resize 3...);
- byte 200 + n: "I do not let others hold permission n".

An opener first takes its own bytes, then tests (F_OFD_GETLK with F_WRLCK,
which any other description's lock conflicts with) byte 200 + n of every
permission it holds and byte 100 + n of every one it does not share; on a
conflict it gives its bytes back and refuses.  Taking before testing means two
openers that race both see each other: both may refuse, neither writes alone.

fusedisk claims what a QEMU format node claims on its file (qemu-img, qemu-io
on a qcow2, or a `-drive` without share-rw): read-write takes consistent read,
write and resize; read-only takes consistent read; both refuse to share write
and resize.  So a second read-write open anywhere is refused, read-only opens
coexist, and a read-only open of an image being written is refused (as
`qemu-img info` is on a running guest's disk, without `-U`).

Within one fusedisk process the nodes on one host file share one lock
descriptor, and the locks taken are the union of theirs: OFD locks never
conflict with their own description, which lets a commit open a base
read-write beside its read-only node for a moment (QEMU's reopen does the
same on one descriptor).  A read-write open beside a node of the same process
that still writes the file is refused.  The table of those descriptors is per process because OFD
locks are; it is the one piece of module state here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import struct
from dataclasses import dataclass, field
from typing import Protocol

from fusedisk.errors import OpenError

PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize", "graph modification")
PERM_BASE = 100
SHARED_BASE = 200

# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = struct.Struct("@hhqqi4x")
#: errors that mean "this filesystem has no byte-range locks" (locking = auto then skips)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


@dataclass(frozen=True)
class Claim:
    """The permissions one node holds and those it refuses to share."""

    perms: frozenset[int]
    unshared: frozenset[int]


READER = Claim(frozenset({PERM_CONSISTENT_READ}), frozenset({PERM_WRITE, PERM_RESIZE}))
WRITER = Claim(
    frozenset({PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE}),
    frozenset({PERM_WRITE, PERM_RESIZE}),
)


class Owner(Protocol):
    """The node holding a lock: its name for errors, and whether it writes now (a node
    made read-only at run time, the base of a snapshot, no longer does)."""

    name: str
    read_only: bool


class LockConflict(Exception):
    """Another process holds a byte we must test free (the message says which)."""


def _lock(fd: int, byte: int, kind: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))


def _held_elsewhere(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on `byte`."""
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)


def _bytes_of(claims: list[Claim]) -> set[int]:
    out: set[int] = set()
    for c in claims:
        out.update(PERM_BASE + p for p in c.perms)
        out.update(SHARED_BASE + p for p in c.unshared)
    return out


def _apply(fd: int, now: set[int], wanted: set[int]) -> None:
    for byte in sorted(wanted - now):
        _lock(fd, byte, fcntl.F_RDLCK)
    for byte in sorted(now - wanted):
        _lock(fd, byte, fcntl.F_UNLCK)


def _check(fd: int, claim: Claim) -> None:
    for p in sorted(claim.perms):
        if _held_elsewhere(fd, SHARED_BASE + p):
            raise LockConflict(f'Failed to get "{PERM_NAMES[p]}" lock')
    for p in sorted(claim.unshared):
        if _held_elsewhere(fd, PERM_BASE + p):
            raise LockConflict(f'Failed to get shared "{PERM_NAMES[p]}" lock')


@dataclass
class _Inode:
    """The lock descriptor of one host file and the nodes of this process using it."""

    fd: int
    holders: dict[int, tuple[Owner, Claim]] = field(default_factory=dict)


_inodes: dict[tuple[int, int], _Inode] = {}
_tokens = itertools.count()


class ImageLock:
    """One node's claim on a host file; `release` gives it back (idempotent)."""

    def __init__(self, key: tuple[int, int], token: int) -> None:
        self._key = key
        self._token = token

    def downgrade(self) -> None:
        """The node will only read from now on (a snapshot's base): hold read-only locks,
        so others may open the file read-only, as with QEMU's reopen."""
        with contextlib.suppress(OSError, LockConflict):
            self._reclaim(READER)

    def upgrade(self, where: str) -> None:
        """The node writes again (a snapshot undone, a commit's base): take the read-write
        locks back, refused if another process opened the file meanwhile."""
        try:
            self._reclaim(WRITER)
        except LockConflict as e:
            with contextlib.suppress(OSError, LockConflict):
                self._reclaim(READER)
            raise OpenError(f"{where} is in use by another process ({e})") from None

    def _reclaim(self, claim: Claim) -> None:
        inode = _inodes.get(self._key)
        if inode is None or self._token not in inode.holders:
            return
        before = _bytes_of([c for _, c in inode.holders.values()])
        owner, _ = inode.holders[self._token]
        inode.holders[self._token] = (owner, claim)
        _apply(inode.fd, before, _bytes_of([c for _, c in inode.holders.values()]))
        _check(inode.fd, claim)

    def release(self) -> None:
        inode = _inodes.get(self._key)
        if inode is None or self._token not in inode.holders:
            return
        before = _bytes_of([c for _, c in inode.holders.values()])
        del inode.holders[self._token]
        if not inode.holders:
            del _inodes[self._key]
            os.close(inode.fd)  # closing the description drops all its locks
            return
        # a lock kept too long refuses others; it never lets data be lost
        with contextlib.suppress(OSError):
            _apply(inode.fd, before, _bytes_of([c for _, c in inode.holders.values()]))


def lock_image(fd: int, owner: Owner, mode: str, where: str) -> ImageLock | None:
    """Take QEMU's lock bytes on the host file open at `fd` for node `owner` (read-write
    unless it is read-only).

    `mode` is the node's `locking` option: "off" takes nothing, "on" refuses a
    file whose filesystem has no byte-range locks, "auto" skips those.
    Raises OpenError, naming `where` (node, option and file), on a conflict.
    """
    if mode == "off":
        return None
    writable = not owner.read_only
    claim = WRITER if writable else READER
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    inode = _inodes.get(key)
    fresh = inode is None
    if inode is None:
        inode = _Inode(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC))
    if writable:
        for other, _ in inode.holders.values():
            if not other.read_only:
                raise OpenError(
                    f"{where} is already open read-write in this mount, by node '{other.name}'"
                )
    before = _bytes_of([c for _, c in inode.holders.values()])
    after = before | _bytes_of([claim])
    try:
        _apply(inode.fd, before, after)
        _check(inode.fd, claim)
    except (OSError, LockConflict) as e:
        with contextlib.suppress(OSError):
            _apply(inode.fd, after, before)
        if fresh:
            os.close(inode.fd)
        if isinstance(e, LockConflict):
            raise OpenError(
                f"{where} is in use by another process ({e}; QEMU and fusedisk lock "
                "images they open); close it there first, or set option 'locking' = "
                '"off" if sharing it is safe'
            ) from None
        if mode == "auto" and e.errno in _NO_LOCKS:
            return None
        raise OpenError(f"{where}: cannot lock the file (option 'locking'): {e.strerror}") from None
    token = next(_tokens)
    inode.holders[token] = (owner, claim)
    _inodes[key] = inode
    return ImageLock(key, token)
