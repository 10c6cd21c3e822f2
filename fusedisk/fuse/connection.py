"""Tuning of the kernel side of a FUSE connection, through fusectl.

The kernel lets only `max_background` (12 by default) asynchronous requests of
one connection be outstanding at once, for all disks of the mount together.  A
request a throttle node holds back keeps its slot, so two throttled disks could
starve an unthrottled one beside them (measured: 190 IOPS instead of 5300).
Raising the limit lets each disk's queue be its own business.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger("fusedisk")

FUSECTL = Path("/sys/fs/fuse/connections")
MAX_BACKGROUND = 256


def connection_id(mountpoint: Path) -> int | None:
    """The device minor of the mount, read from mountinfo (a stat() would ask FUSE)."""
    target = str(Path(mountpoint).absolute())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == target and "fuse" in line:
                return int(fields[2].split(":")[1])
    return None


def raise_background_limit(mountpoint: Path) -> None:
    """Best effort: needs root and fusectl; logs what it could not do."""
    minor = connection_id(mountpoint)
    if minor is None:
        log.warning("cannot find the FUSE connection of %s in mountinfo", mountpoint)
        return
    conn = FUSECTL / str(minor)
    if not conn.exists() and os.geteuid() == 0:
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], capture_output=True)
    try:
        (conn / "max_background").write_text(f"{MAX_BACKGROUND}\n")
        (conn / "congestion_threshold").write_text(f"{MAX_BACKGROUND * 3 // 4}\n")
    except OSError as e:
        log.info("kept the kernel's FUSE background limit (%s: %s)", conn, e.strerror)
