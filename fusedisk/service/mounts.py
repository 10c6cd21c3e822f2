"""Which mount a path is on, from the mount table: live, dead, or not fusedisk's.

`status`, `top` and `job` read a mount's files, and `mount` needs its mount point
to be a usable folder.  A daemon that died without unmounting (SIGKILL with its
watchdog gone, an OOM kill) leaves a *dead* mount: every access gives ENOTCONN
("Transport endpoint is not connected").  These commands then say so, and how to
clear it, instead of a traceback or "not a fusedisk mount".  The mount table
(/proc/self/mountinfo) is read without touching the path, which a dead mount
would refuse.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fusedisk.errors import FuseDiskError

FSTYPE = "fuse.fusedisk"


class NotAMount(FuseDiskError):
    """The path is not (on) a fusedisk mount."""


class DeadMount(FuseDiskError):
    """The path is on a FUSE mount whose daemon is gone."""


@dataclass(frozen=True)
class MountEntry:
    mountpoint: Path
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[MountEntry]:
    """Every mount of this process's namespace, oldest first (mountinfo's order)."""
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            fields, tail = before.split(), after.split()
            if len(fields) > 4 and len(tail) >= 2:
                entries.append(MountEntry(Path(_unescape(fields[4])), tail[0], _unescape(tail[1])))
    return entries


def mount_of(path: Path) -> MountEntry | None:
    """The mount that holds `path`: the newest mount at its longest mounted prefix.

    Symlinks and `..` are resolved as far as they can be (a dead mount refuses
    lookups, and realpath then keeps the rest as written).  None when no entry
    holds it: in a chroot, mountinfo lists only the mounts below the process's
    root, and the root itself need not be one."""
    where = Path(os.path.realpath(path))
    best: MountEntry | None = None
    for entry in mount_table():
        holds = where == entry.mountpoint or entry.mountpoint in where.parents
        if holds and (best is None or len(entry.mountpoint.parts) >= len(best.mountpoint.parts)):
            best = entry
    return best


#: what a mount whose daemon is gone answers: ENOTCONN, or ECONNABORTED once the
#: kernel aborted the connection (as it does when a FUSE-over-io_uring daemon dies)
DEAD_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


def is_dead(mountpoint: Path) -> bool:
    try:
        os.stat(mountpoint)
    except OSError as e:
        return e.errno in DEAD_ERRNOS
    return False


def dead_mount_error(entry: MountEntry) -> DeadMount:
    what = "fusedisk mount" if entry.fstype == FSTYPE else f"FUSE mount ({entry.fstype})"
    return DeadMount(
        f"'{entry.mountpoint}' is a dead {what}: its daemon is gone (Transport endpoint is "
        f"not connected); clear it with `fusermount3 -u {entry.mountpoint}`"
    )


def refuse_dead(path: Path) -> None:
    """Raise DeadMount if `path` is on a mount whose daemon is gone."""
    entry = mount_of(path)
    if entry is not None and is_dead(entry.mountpoint):
        raise dead_mount_error(entry)


def fusedisk_mount_of(path: Path) -> Path:
    """The mount point of the live fusedisk mount that holds `path`."""
    entry = mount_of(path)
    if entry is None:
        raise NotAMount(f"'{path}' is not in a fusedisk mount")
    if is_dead(entry.mountpoint):
        raise dead_mount_error(entry)
    if entry.fstype != FSTYPE:
        raise NotAMount(
            f"'{path}' is not in a fusedisk mount (it is on {entry.fstype} "
            f"mounted at '{entry.mountpoint}')"
        )
    return entry.mountpoint
