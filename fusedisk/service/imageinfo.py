"""What `fusedisk info IMAGE` shows: `qemu-img info` for every format fusedisk reads.

The driver is named (-f), claimed by a protocol prefix (`rbd:...`), or probed
from the file's first bytes by every driver's `probe` slot (anything no format
claims is raw); the driver's own `info` slot describes the image, with the fields
named as `qemu-img info --output=json` names them, so a script can read either.
Nothing is written and no secret is read: a LUKS header shows its cipher, hash,
UUID and key slots, never key material or digests.  A qcow2 backing chain is
followed as QEMU resolves it (a relative backing name is relative to the image's
folder), at most 64 deep.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fusedisk.errors import FuseDiskError
from fusedisk.graph import registry

MAX_CHAIN = 64


class InfoError(FuseDiskError):
    pass


def image_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """One image's description, in `qemu-img info --output=json`'s terms: the
    fields every image has here, the rest from its driver's `info` slot."""
    target = str(path)
    where = f"image '{path}'"
    try:
        st = None if registry.protocol_driver(target) else os.stat(path)
        driver = registry.image_driver(target, fmt, where)
        described = driver.info(target)
    except OSError as e:
        raise InfoError(f"{where}: {e.strerror}") from None
    except FuseDiskError as e:
        raise InfoError(str(e)) from None
    info: dict[str, Any] = {"filename": target, "format": driver.driver}
    if st is not None:
        info["actual-size"] = st.st_blocks * 512
    info.update(described)
    info.setdefault("dirty-flag", False)
    return info


def chain_info(path: Path, fmt: str | None = None) -> list[dict[str, Any]]:
    """The image and every image below it in its backing chain."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    current: Path | None = path
    while current is not None:
        if len(out) >= MAX_CHAIN:
            raise InfoError(f"image '{path}': the backing chain is deeper than {MAX_CHAIN}")
        if registry.protocol_driver(str(current)) is None:
            try:
                st = os.stat(current)
            except OSError as e:
                raise InfoError(f"backing file '{current}' of '{path}': {e.strerror}") from None
            if (st.st_dev, st.st_ino) in seen:
                raise InfoError(f"image '{path}': the backing chain loops at '{current}'")
            seen.add((st.st_dev, st.st_ino))
        info = image_info(current, fmt)
        out.append(info)
        backing = info.get("full-backing-filename")
        fmt = info.get("backing-filename-format")
        current = Path(backing) if backing else None
    return out
