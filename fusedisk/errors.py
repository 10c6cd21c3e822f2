"""The one exception tree of fusedisk, and its single mapping to errno.

Every error a user can meet is a sentence that names the node (and the option,
where one is at fault).  The FUSE front turns any exception into an errno with
`to_errno`, so no handler can let an unexpected exception end the mount.
"""

from __future__ import annotations

import errno as _errno


class FuseDiskError(Exception):
    """Base of every error fusedisk raises on purpose."""

    errno: int = _errno.EIO


class SpecError(FuseDiskError):
    """The spec is wrong; nothing was mounted, created or written."""

    errno = _errno.EINVAL


class OpenError(FuseDiskError):
    """A node could not be opened (missing image, bad header, wrong key...)."""

    errno = _errno.EIO


class CorruptImage(OpenError):
    """An image's metadata is inconsistent; it is refused, never repaired silently."""


class NotSupported(FuseDiskError):
    """The node does not implement this operation."""

    errno = _errno.EOPNOTSUPP


class OutOfRange(FuseDiskError):
    """A request reaches past the end of a node."""

    errno = _errno.ENOSPC


class TooLarge(FuseDiskError):
    """A size a format cannot describe within its limits (qcow2's L1 and refcount
    tables), refused before anything is allocated."""

    errno = _errno.EFBIG


class ReadOnly(FuseDiskError):
    """A write reached a node opened read-only."""

    errno = _errno.EROFS


class ControlError(FuseDiskError):
    """A write to a control file was refused (bad value, or the action failed)."""

    errno = _errno.EINVAL


class IOFailure(FuseDiskError):
    """An I/O error that a driver reports itself (quorum lost, injected fault)."""

    def __init__(self, message: str, errno: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno


def to_errno(exc: BaseException) -> int:
    """The errno a FUSE client sees for `exc`: the only place this is decided."""
    if isinstance(exc, FuseDiskError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return _errno.EIO


def describe(exc: BaseException) -> str:
    """`exc` as the end of a sentence: an OSError without its `[Errno N]` prefix
    (`'/images/d0.s1.qcow2': File name too long`), anything else as it reads."""
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename is None:
            return exc.strerror
        where = f"'{exc.filename}'"
        if exc.filename2 is not None:  # rename, link: both files
            where += f" -> '{exc.filename2}'"
        return f"{where}: {exc.strerror}"
    return str(exc)
