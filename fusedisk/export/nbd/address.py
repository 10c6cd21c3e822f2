"""An NBD server's address, as both ends name it: `unix:PATH` or `HOST:PORT`.

Shared by the export (where it listens) and the nbd driver (where it connects).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fusedisk.errors import SpecError

#: NBD's registered TCP port
DEFAULT_PORT = 10809


@dataclass(frozen=True)
class Address:
    """A unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str) -> Address:
    """`unix:PATH`, `HOST:PORT` or `[IPV6]:PORT`."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise SpecError(f"NBD address '{text}': the unix socket path is empty")
        return Address(path=os.path.abspath(path))
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise SpecError(f"NBD address '{text}': expected unix:PATH or HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise SpecError(f"NBD address '{text}': the port must be a number from 0 to 65535")
    return Address(host=host, port=port)
