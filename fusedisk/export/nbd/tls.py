"""TLS for the export: x509 credentials in QEMU's `tls-creds-x509` folder layout.

The folder holds `server-cert.pem` and `server-key.pem`, and `ca-cert.pem`: the
CA that signed the clients' certificates.  As QEMU's `verify-peer=on` (its
default) and nbdkit's `--tls-verify-peer`, a client must present a
certificate signed by that CA.  The same folder works for qemu-nbd
(`--object tls-creds-x509,dir=...`) and nbdkit (`--tls-certificates=...`).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from fusedisk.errors import SpecError

FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def server_context(folder: str | Path) -> ssl.SSLContext:
    """The TLS context of the export; SpecError naming the file if one is missing or bad."""
    base = Path(folder)
    for name in FILES:
        if not (base / name).is_file():
            raise SpecError(f"TLS credentials '{base}': '{name}' is missing (needs "
                            f"{', '.join(FILES)})")  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(base / "server-cert.pem", base / "server-key.pem")
    except (ssl.SSLError, OSError) as e:
        raise SpecError(f"TLS credentials '{base}': server-cert.pem or server-key.pem: "
                        f"{e}") from None  # fmt: skip
    try:
        context.load_verify_locations(base / "ca-cert.pem")
    except (ssl.SSLError, OSError) as e:
        raise SpecError(f"TLS credentials '{base}': ca-cert.pem: {e}") from None
    context.verify_mode = ssl.CERT_REQUIRED
    return context
