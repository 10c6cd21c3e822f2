"""From QEMU's names to a `Target`: the node's options, or an `rbd:` file name.

Node options are QEMU's BlockdevOptionsRbd (pool, namespace, image, snapshot,
conf, user, auth-client-required, key-file, server) plus `rados-options`, a
table of librados client options.  QEMU's legacy file name
`rbd:pool[/namespace]/image[@snapshot][:conf=FILE][:id=USER][:mon_host=...][:opt=value]`
is accepted where a file name is (`fusedisk create`, `fusedisk info`); `\\:`
escapes a colon, and any other `opt=value` is a client option, as in QEMU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from fusedisk.errors import OpenError
from fusedisk.formats.rbd.client import Target
from fusedisk.hostio.files import open_host_file

#: a cephx secret is 40 base64 characters; anything much larger is not one
MAX_KEY_FILE = 4096
#: librados client option names: letters, digits and _ (spaces also name them)
_CLIENT_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9_ ]*$")
AUTH_METHODS = ("cephx", "none")


def read_key_file(path: str, where: str) -> str:
    """The cephx secret in `path` (whitespace around it dropped).  Opened as image
    files are (hostio/files.py): a regular file only, without blocking on a FIFO."""
    fd, st = open_host_file(path, False, where)
    try:
        if st.st_size > MAX_KEY_FILE:
            raise OpenError(f"{where}: '{path}' is larger than {MAX_KEY_FILE} bytes; "
                            "a key file holds one cephx secret")  # fmt: skip
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    key = data.decode("ascii", "replace").strip()
    if not key:
        raise OpenError(f"{where}: '{path}' is empty")
    return key


def mon_host(servers: Any, where: str) -> str:
    """QEMU's `server` list ([{host, port}, ...]) as librados' mon_host."""
    if not isinstance(servers, list) or not servers:
        raise OpenError(f"{where}: expected a list of tables such as "
                        "[{host = \"127.0.0.1\", port = \"3300\"}]")  # fmt: skip
    out = []
    for i, server in enumerate(servers):
        if not isinstance(server, Mapping) or set(server) - {"host", "port"}:
            raise OpenError(f"{where}[{i}]: expected a table with 'host' and 'port'")
        host, port = server.get("host"), server.get("port", "6789")
        if not isinstance(host, str) or not host or any(c in host for c in ",; "):
            raise OpenError(f"{where}[{i}]: 'host' must be a host name or address")
        try:
            number = int(port)
        except (TypeError, ValueError):
            number = 0
        if not 0 < number < 65536:
            raise OpenError(f"{where}[{i}]: 'port' must be 1-65535, got {port!r}")
        out.append(f"[{host}]:{number}" if ":" in host else f"{host}:{number}")
    return ",".join(out)


def client_settings(table: Any, where: str) -> dict[str, str]:
    """`rados-options` as librados conf_set pairs (every value as text)."""
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise OpenError(f"{where}: expected a table such as {{rados_osd_op_timeout = 5}}")
    out = {}
    for name, value in table.items():
        if not isinstance(name, str) or not _CLIENT_OPTION.match(name):
            raise OpenError(f"{where}: {name!r} is not a client option name")
        if isinstance(value, bool):
            value = "true" if value else "false"
        if not isinstance(value, str | int | float):
            raise OpenError(f"{where}: option '{name}': expected text or a number")
        out[name] = str(value)
    return out


def auth_methods(value: Any, where: str) -> str | None:
    """QEMU's auth-client-required (cephx, none, or both in order of preference)."""
    if value in (None, ""):
        return None
    items = value if isinstance(value, list) else re.split(r"[,;]", str(value))
    methods = [str(m).strip() for m in items]
    bad = [m for m in methods if m not in AUTH_METHODS]
    if bad or not methods:
        raise OpenError(f"{where}: expected cephx and/or none, got {value!r}")
    return ";".join(methods)


def target_of(options: Mapping[str, Any], where: str) -> Target:
    """The node's options (checked) as a Target; OpenError naming the option."""

    def opt(name: str) -> Any:
        return options.get(name)

    for name in ("pool", "image"):
        if not opt(name):
            raise OpenError(f"{where}: option '{name}' is required")
    key_file = opt("key-file")
    conf = opt("conf")
    if conf:
        # only a check of kind (librados reads it): a FIFO or device is refused here
        os.close(open_host_file(str(conf), False, f"{where}: option 'conf'")[0])
    return Target(
        pool=str(opt("pool")),
        image=str(opt("image")),
        namespace=str(opt("namespace") or ""),
        snapshot=str(opt("snapshot")) if opt("snapshot") else None,
        conf=str(conf) if conf else None,
        user=str(opt("user")) if opt("user") else None,
        key=read_key_file(str(key_file), f"{where}: option 'key-file'") if key_file else None,
        mon_host=mon_host(opt("server"), f"{where}: option 'server'") if opt("server") else None,
        auth_client_required=auth_methods(
            opt("auth-client-required"), f"{where}: option 'auth-client-required'"
        ),
        settings=client_settings(opt("rados-options"), f"{where}: option 'rados-options'"),
    )


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, current, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            current.append(text[i + 1])
            i += 2
            continue
        if c == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    parts.append("".join(current))
    return parts


def parse_filename(name: str) -> dict[str, Any]:
    """QEMU's `rbd:pool/[namespace/]image[@snap][:key=value...]` as node options;
    ValueError saying what is wrong."""
    if not name.startswith("rbd:"):
        raise ValueError(f"'{name}' does not start with 'rbd:'")
    head, *pairs = _split_unescaped(name[4:], ":")
    path, _, snapshot = head.partition("@")
    parts = path.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"'{name}': expected rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE")
    options: dict[str, Any] = {"pool": parts[0], "image": parts[-1]}
    if len(parts) == 3:
        options["namespace"] = parts[1]
    if snapshot:
        options["snapshot"] = snapshot
    settings: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"'{name}': '{pair}' is not key=value")
        if key == "conf":
            options["conf"] = value
        elif key == "id":
            options["user"] = value
        elif key == "auth_supported":
            options["auth-client-required"] = value
        else:
            settings[key] = value  # mon_host, keyring, key, rados_osd_op_timeout...
    if settings:
        options["rados-options"] = settings
    return options
