"""Unmount a fusedisk mount whose daemon died: `python -m fusedisk.fuse.kernel.watchdog MNT DEV`.

Started by the daemon right after mount(2), with the read end of a pipe as
stdin.  The daemon writes "clean" before a normal exit; end of file without it
means the daemon died (SIGKILL, a crash), and the watchdog detaches the mount
at MNT if it is still the FUSE connection DEV ('major:minor'), so nothing
mounted later at the same path is touched.  It ignores the signals a terminal
or service manager sends, so it outlives the daemon it watches.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from fusedisk.fuse.kernel.mounting import MNT_DETACH, _libc, canonical, mounted_device


def main(argv: list[str]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # The daemon passes the canonical path; resolving again costs nothing (a dead
    # mount's root answers ENOTCONN at once, which realpath tolerates).
    mountpoint, device = canonical(Path(argv[0])), argv[1]
    said = b""
    while chunk := os.read(0, 64):
        said += chunk
    if said.startswith(b"clean"):
        return 0
    if mounted_device(mountpoint) == device:
        _libc.umount2(bytes(mountpoint), MNT_DETACH)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
