"""Whether this kernel can serve FUSE over io_uring, and switching it on.

The kernel needs CONFIG_FUSE_IO_URING (Linux 6.14+) and the `fuse` module's
`enable_uring` parameter on (it is off by default; root may write it, and
docs/mount.md says how to keep it on); io_uring itself must not be disabled.
The ring wants one queue per possible CPU, hence `possible_cpus`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fusedisk.hostio import uring_core

PARAMETER = Path("/sys/module/fuse/parameters/enable_uring")
HOW_TO = "echo Y > /sys/module/fuse/parameters/enable_uring (see docs/mount.md)"


def possible_cpus() -> int:
    """How many CPUs the kernel may run a caller on: one queue each ("0-1" -> 2)."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def unavailable() -> str | None:
    """Why FUSE over io_uring cannot be used here (a sentence), or None if it may."""
    try:
        enabled = PARAMETER.read_text().strip()
    except OSError:
        return "this kernel has no FUSE over io_uring (CONFIG_FUSE_IO_URING, Linux 6.14+)"
    if enabled not in ("Y", "1"):
        return f"FUSE over io_uring is off in this kernel; as root: {HOW_TO}"
    try:
        if Path("/proc/sys/kernel/io_uring_disabled").read_text().strip() not in ("", "0"):
            return "io_uring is disabled (/proc/sys/kernel/io_uring_disabled)"
    except OSError:
        pass
    return uring_core.available()


def turn_on() -> bool:
    """Switch the kernel's FUSE over io_uring on (root only; what the demo does, and
    what docs/mount.md says how to make lasting).  True if it is on afterwards."""
    with contextlib.suppress(OSError):
        if PARAMETER.read_text().strip() not in ("Y", "1"):
            PARAMETER.write_text("Y\n")
    return unavailable() is None
