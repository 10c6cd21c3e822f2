"""Which host files may be images, and how they are opened: regular files and block
devices only, never in a way that can block.

A FIFO opened for reading waits for a writer forever, a character device may act
on open (a tape rewinds, a watchdog starts), a directory or socket is no image.
So a name is stat'ed first and refused unless it is a regular file or a block
device; it is then opened with O_NONBLOCK (so a FIFO swapped in meanwhile cannot
block the open either), checked again with fstat, and only then made blocking.
Every refusal is a sentence naming the node, the option and the file.

Names found in image headers (a qcow2's backing file and data file) are
untrusted: the image may come from anyone, and the daemon may run as root.
They resolve relative to the image's folder, as QEMU resolves them, and by
default must stay inside the spec's folders (`header_file_path`); reaching
elsewhere takes the node option `backing-files = "any"` (docs/security.md).

Every file fusedisk creates (images, keys, state files) is made by `create_file`:
O_EXCL|O_NOFOLLOW, so an existing file is never replaced and a symlink planted at
the name is never followed; then fsync'd with its folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from fusedisk.errors import CorruptImage, OpenError

_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _no_nul(path: str, where: str) -> None:
    if "\0" in path:
        raise OpenError(f"{where}: the name {path!r} holds a NUL byte")


def check_kind(st: os.stat_result, path: str, where: str) -> None:
    """Refuse anything but a regular file or block device."""
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise OpenError(
            f"{where}: '{path}' is {_kind(st.st_mode)}; an image must be a regular file "
            "or a block device"
        )


def open_host_file(
    path: str, writable: bool, where: str, direct: bool = False
) -> tuple[int, os.stat_result]:
    """Open an image file without blocking (with O_DIRECT if `direct`); returns the
    descriptor and its fstat."""
    _no_nul(path, where)
    try:
        check_kind(os.stat(path), path, where)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | (os.O_DIRECT if direct else 0)
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        hint = (
            " (the file system refuses O_DIRECT: set cache.direct = false)"
            if direct and e.errno == errno.EINVAL
            else ""
        )
        raise OpenError(f"{where}: cannot open '{path}': {e.strerror}{hint}") from None
    try:
        st = os.fstat(fd)
        check_kind(st, path, where)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def check_header_file(path: str, where: str) -> None:
    """A file an image header names (backing file, data file), checked before any node
    opens it: it must exist and be a regular file or a block device."""
    _no_nul(path, where)
    try:
        st = os.stat(path)
    except OSError as e:
        raise OpenError(f"{where}: cannot open '{path}': {e.strerror}") from None
    check_kind(st, path, where)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def header_file_path(
    name: str, image_folder: str, roots: list[str], anywhere: bool, where: str
) -> str:
    """The path of a file an image header names, checked before anything opens it.

    `name` resolves against `image_folder`; unless `anywhere`, the real path
    (symlinks and `..` resolved) must lie in one of `roots` (real paths: the
    spec's folder and the folder of the image the spec names).  It must be a
    regular file or a block device.
    """
    if "\0" in name:
        raise CorruptImage(f"{where}: its name {name!r} holds a NUL byte")
    path = name if os.path.isabs(name) else os.path.join(image_folder, name)
    if not anywhere:
        real = os.path.realpath(path)
        if not any(_inside(real, root) for root in roots):
            raise OpenError(
                f"{where}: '{name}' is '{real}', outside the spec's folders "
                f"({', '.join(roots)}); set option 'backing-files' = \"any\" on this node "
                "to let its image headers name files anywhere"
            )
    check_header_file(path, where)
    return path


def read_head(path: str, length: int, where: str) -> bytes:
    """The first `length` bytes of an image file (to probe its format)."""
    fd, _ = open_host_file(path, False, where)
    try:
        return os.pread(fd, length, 0)
    finally:
        os.close(fd)


def create_file(
    path: str | os.PathLike[str],
    where: str,
    *,
    chunks: tuple[tuple[int, bytes], ...] = (),
    size: int | None = None,
    mode: int = 0o644,
    replace: bool = False,
) -> None:
    """The one way fusedisk creates a file: images, keys, state files, demo specs.

    O_EXCL|O_NOFOLLOW, so an existing file is never overwritten and a symlink
    planted at the name is never followed (with `replace`, the old name, symlink
    or not, is unlinked first; a symlink's target is left alone).  `chunks` are
    written at their offsets, the file is extended to `size`, then the file and
    its folder are fsync'd, so a created image survives a crash.  Errors are
    OpenError sentences that start with `where`.
    """
    if replace:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise OpenError(f"{where}: the file exists (remove it first)") from None
    except OSError as e:
        hint = " (a symlink at that name is never followed)" if e.errno == errno.ELOOP else ""
        raise OpenError(f"{where}: {e.strerror}{hint}") from None
    try:
        for offset, data in chunks:
            os.pwrite(fd, data, offset)
        if size is not None:
            os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as e:
        raise OpenError(f"{where}: {e.strerror}") from None
    finally:
        os.close(fd)
    fsync_folder(os.path.dirname(os.fspath(path)) or ".")


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make a new or renamed name in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: str | os.PathLike[str], data: bytes, mode: int, replace: bool) -> None:
    """Create a file at a name fusedisk chose, holding `data` (see `create_file`)."""
    create_file(path, f"cannot create '{path}'", chunks=((0, data),), mode=mode, replace=replace)


def backing_path(image: str | os.PathLike[str], name: str) -> str:
    """QEMU's rule: a relative backing file name is relative to the image's folder."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.fspath(image)), name)


def image_size(path: str, where: str) -> int:
    """The size of an image file, or of a block device (whose st_size is 0)."""
    fd, _ = open_host_file(path, False, where)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
