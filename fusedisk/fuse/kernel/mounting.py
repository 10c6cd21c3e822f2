"""Mounting and unmounting a FUSE connection without libfuse.

As root, fusedisk opens /dev/fuse and calls mount(2) itself (`fd=`, `rootmode=`,
`user_id=`, `group_id=` are what the kernel requires).  Without root it asks
fusermount3, the setuid helper every FUSE file system uses, which mounts and
passes the /dev/fuse descriptor back over a socket (`_FUSE_COMMFD`), and which
with `auto_unmount` stays behind to unmount if the daemon dies.

A daemon killed with SIGKILL must not leave a dead mount ("Transport endpoint
is not connected") behind.  For the root path a small watchdog process
(`python -m fusedisk.fuse.kernel.watchdog`) holds the read end of a pipe whose
write end only the daemon has: when the daemon dies the pipe closes and the
watchdog detaches the mount, if it is still ours.  A clean exit tells the
watchdog first, so it never touches a later mount at the same path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fusedisk.errors import FuseDiskError

MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountFailed(FuseDiskError):
    """The kernel or fusermount3 refused the mount."""


@dataclass
class KernelMount:
    """A mounted FUSE connection: its /dev/fuse descriptor and how to undo it."""

    fd: int
    mountpoint: Path
    #: root: the write end of the watchdog's pipe; its end of file means "daemon died"
    watchdog: int | None = None
    #: without root: fusermount3 (auto_unmount), which waits for our socket to close
    helper: subprocess.Popen[bytes] | None = None
    helper_socket: socket.socket | None = None

    def unmount(self) -> None:
        """Detach the mount (lazily: files still open keep working until closed)."""
        if self.helper is not None:
            subprocess.run(
                ["fusermount3", "-u", "-z", "--", str(self.mountpoint)], capture_output=True
            )
        else:
            _libc.umount2(os.fsencode(self.mountpoint), MNT_DETACH)

    def close(self) -> None:
        """Drop the connection and tell the watchdog the exit was clean."""
        if self.watchdog is not None:
            with contextlib.suppress(OSError):
                os.write(self.watchdog, b"clean")
            with contextlib.suppress(OSError):
                os.close(self.watchdog)
            self.watchdog = None
        if self.helper_socket is not None:
            self.helper_socket.close()
            self.helper_socket = None
        if self.helper is not None:
            try:
                self.helper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.helper.kill()
            self.helper = None
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted_device(mountpoint: Path) -> str | None:
    """'major:minor' of the newest mount at `mountpoint`, from mountinfo (no stat);
    `mountpoint` must be `canonical` (mountinfo holds resolved paths)."""
    target = str(Path(mountpoint).absolute())
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                found = fields[2]
    return found


def access_options(allow_other: bool) -> list[str]:
    """Who may use the mount: the kernel checks modes; others only with --allow-other."""
    return ["default_permissions", *(["allow_other"] if allow_other else [])]


def escape_option(value: str) -> str:
    """A value inside a comma-separated -o list, as fusermount3 and libfuse read one:
    a comma is escaped with a backslash, and so is a backslash.  A spec named
    `x,ro` must not mount read-only, nor `y,allow_other` open the mount to everyone."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def mount_options(fsname: str, subtype: str, allow_other: bool) -> list[str]:
    """The -o options of a helper (fusermount3, libfuse): names, then access."""
    return [
        f"fsname={escape_option(fsname)}",
        f"subtype={escape_option(subtype)}",
        *access_options(allow_other),
    ]


def canonical(mountpoint: Path) -> Path:
    """The path mountinfo will show: symlinks and `..` resolved.  Call it before
    mounting: resolving the root of a mount not yet serving would wait for it."""
    return Path(os.path.realpath(mountpoint))


def mount(mountpoint: Path, fsname: str, subtype: str, allow_other: bool) -> KernelMount:
    """Mount a FUSE file system at `mountpoint`; root uses mount(2), others fusermount3."""
    mountpoint = canonical(mountpoint)
    if os.geteuid() == 0:
        return _mount_as_root(mountpoint, fsname, subtype, allow_other)
    return _mount_with_fusermount(mountpoint, fsname, subtype, allow_other)


def _mount_as_root(mountpoint: Path, fsname: str, subtype: str, allow_other: bool) -> KernelMount:
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        rootmode = stat.S_IFMT(os.stat(mountpoint).st_mode)
        data = [f"fd={fd}", f"rootmode={rootmode:o}", f"user_id={os.getuid()}",
                f"group_id={os.getgid()}", *access_options(allow_other)]  # fmt: skip
        rc = _libc.mount(
            fsname.encode(), os.fsencode(mountpoint), f"fuse.{subtype}".encode(),
            MS_NOSUID | MS_NODEV, ",".join(data).encode(),
        )  # fmt: skip
        if rc != 0:
            err = ctypes.get_errno()
            raise MountFailed(f"cannot mount at '{mountpoint}': {os.strerror(err)}")
        watch_read, watch_write = os.pipe2(os.O_CLOEXEC)
        # Not os.stat: the mount answers nothing until INIT is served.
        device = mounted_device(mountpoint) or "?"
        subprocess.Popen(
            [sys.executable, "-m", "fusedisk.fuse.kernel.watchdog", str(mountpoint), device],
            stdin=watch_read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        os.close(watch_read)
        return KernelMount(fd, mountpoint, watchdog=watch_write)
    except BaseException:
        os.close(fd)
        raise


def _mount_with_fusermount(
    mountpoint: Path, fsname: str, subtype: str, allow_other: bool
) -> KernelMount:
    helper = shutil.which("fusermount3")
    if helper is None:
        raise MountFailed(
            "mounting without root needs fusermount3 (Debian package fuse3), which is not installed"
        )
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    options = ",".join([*mount_options(fsname, subtype, allow_other), "auto_unmount"])
    proc = subprocess.Popen(
        [helper, "-o", options, "--", str(mountpoint)],
        env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
        pass_fds=[theirs.fileno()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    theirs.close()
    try:
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    except OSError:
        fds = []
    if not fds:
        _, err = proc.communicate(timeout=10)
        ours.close()
        raise MountFailed(f"fusermount3 could not mount at '{mountpoint}': {err.decode().strip()}")
    # With auto_unmount, fusermount3 stays until our end of the socket closes.
    return KernelMount(fds[0], mountpoint, helper=proc, helper_socket=ours)
