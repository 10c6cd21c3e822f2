"""Where each disk's last backup with each bitmap is: the next incremental's backing file.

Kept beside the spec as `SPEC.backups.json` (write, fsync, rename, as the change
log in changes.py), so an incremental backup after a remount still finds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fusedisk.errors import SpecError

VERSION = 1


def record_path(spec_path: Path) -> Path:
    return spec_path.with_name(spec_path.name + ".backups.json")


def _load(spec_path: Path) -> dict[str, Any]:
    path = record_path(spec_path)
    try:
        doc = json.loads(path.read_text())
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
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (json.dumps(doc, indent=2) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
