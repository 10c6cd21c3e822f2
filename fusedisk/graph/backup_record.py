"""Where each disk's last backup with each bitmap is: the next incremental's backing file.

Kept beside the spec as `SPEC.backups.json` (write, fsync, rename, as the change
log in changes.py), so an incremental backup after a remount still finds it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from fusedisk.errors import SpecError
from fusedisk.hostio.files import create_file, fsync_folder

VERSION = 1


def record_path(spec_path: Path) -> Path:
    return spec_path.with_name(spec_path.name + ".backups.json")


def _load(spec_path: Path) -> dict[str, Any]:
    path = record_path(spec_path)
    try:  # fusedisk writes this file itself: a symlink or FIFO there is refused, unread
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            doc = json.loads(f.read())
    except FileNotFoundError:
        return {"version": VERSION, "disks": {}}
    except (OSError, ValueError) as e:
        raise SpecError(f"{path}: cannot read the backup record: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(
            doc.get("disks"), dict):  # fmt: skip
        raise SpecError(f"{path}: not a fusedisk backup record of version {VERSION}")
    return doc


def last(spec_path: Path, disk: str, bitmap: str) -> str | None:
    """The last backup of `disk` made with `bitmap`, or None."""
    found = _load(spec_path)["disks"].get(disk, {}).get(bitmap)
    return found if isinstance(found, str) else None


def save(spec_path: Path, disk: str, bitmap: str, dest: str) -> None:
    doc = _load(spec_path)
    doc["disks"].setdefault(disk, {})[bitmap] = dest
    path = record_path(spec_path)
    tmp = path.with_name(path.name + ".tmp")
    data = (json.dumps(doc, indent=2) + "\n").encode()
    # a stale temporary, or a symlink planted there, is replaced, never followed
    create_file(tmp, f"cannot write '{tmp}'", chunks=((0, data),), replace=True)
    os.rename(tmp, path)
    fsync_folder(path.parent)
