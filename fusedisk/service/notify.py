"""sd_notify: tell systemd (Type=notify units) that the mount is ready, or stopping.

The protocol is one datagram of `KEY=VALUE` lines to the unix socket named by
$NOTIFY_SOCKET (a leading '@' means the abstract namespace); a few lines, so no
library.  Without $NOTIFY_SOCKET (not started by systemd) nothing is sent.  The
variable is taken out of the environment when read, so programs the daemon starts
do not report in its name.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("fusedisk")


class Notifier:
    def __init__(self, path: str | None) -> None:
        self.path = path or None

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    def send(self, *lines: str) -> bool:
        """Send `lines` (e.g. "READY=1"); True if sent, False if not asked for or failed."""
        if self.path is None:
            return False
        address = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(address)
                s.sendall("\n".join(lines).encode())
        except OSError as e:
            log.warning("sd_notify to %s failed: %s", self.path, e)
            return False
        return True

    def ready(self, mountpoint: object) -> None:
        """The mount is up: a Type=notify unit counts as started from here."""
        self.send("READY=1", f"MAINPID={os.getpid()}", f"STATUS=serving at {mountpoint}")

    def stopping(self) -> None:
        """Unmounted, every disk flushed and closed; the process exits next."""
        self.send("STOPPING=1", "STATUS=unmounted; disks flushed and closed")
