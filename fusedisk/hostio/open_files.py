"""The daemon's open-file limit: raised at start, with a reserve the NBD export cannot take.

The soft RLIMIT_NOFILE is 1024 on most systems (and under systemd unless the
unit says otherwise), while the hard limit is far higher (524288 under
systemd).  About 1,000 idle NBD connections then took every descriptor: new
clients hung in accept(2), and a snapshot failed with EINVAL because its
state file could not be opened.  So, as QEMU does at start, the soft limit is
raised to the hard one, and the NBD export caps its connections below it,
keeping RESERVED descriptors for the graph's own files (images, snapshot
overlays and state files, write-behind duplicates, io_uring, /dev/fuse).
"""

from __future__ import annotations

import logging
import os
import resource

log = logging.getLogger("fusedisk")

#: descriptors kept for the graph's own files, whatever the clients do
RESERVED = 256
#: NBD connections at most, however high the limit
MAX_CONNECTIONS = 4096
#: and at least this many, however low (a limit that low leaves no reserve)
MIN_CONNECTIONS = 16
#: what "no hard limit" is taken to mean (the kernel's own per-process ceiling)
_NR_OPEN = "/proc/sys/fs/nr_open"


def _ceiling(hard: int) -> int:
    if hard != resource.RLIM_INFINITY:
        return hard
    try:
        with open(_NR_OPEN) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_open_file_limit() -> int:
    """Set the soft open-file limit to the hard one; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _ceiling(hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
    return int(soft)


def open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def connection_cap() -> int:
    """NBD connections allowed: what the limit leaves after the reserve and what is open."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = _ceiling(soft)
    room = limit - RESERVED - open_descriptors()
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, room))
