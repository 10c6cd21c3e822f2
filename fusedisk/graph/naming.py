"""Names of snapshot overlays: bounded whatever the chain's length and history.

An overlay is named after its *family* — the image and node the user declared,
at the bottom of the part of the chain that snapshots made — and the snapshot:
`images/d0.qcow2` + `s1` gives file `images/d0.s1.qcow2` and node `d0.s1`; the
next snapshot `s2` gives `d0.s2.qcow2` and `d0.s2` (not `d0.s1.s2`), so a chain
of any length keeps names of the same size.  Each new overlay's record keeps its
family (`stem`, `node-stem`), which a commit, revert or stream leaves in place;
records written before this scheme have none, and their family is found by
walking them down to the user's node (their file was `<base stem>.<snapshot>.qcow2`).

Each part (file stem, node stem, snapshot name) longer than `PART_BYTES` is cut
and ends with a hash of the whole, so names stay short and distinct; a name
already taken (a file that exists, a node of the graph, spec or change log) gets
a counter: `d0.s1_2.qcow2`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from fusedisk.graph.changes import Change
from fusedisk.graph.snapshot_record import OverlayRecord, snapshots

#: bytes of a stem or snapshot name kept whole; a file name stays under ~120 bytes
PART_BYTES = 48
_HASH_CHARS = 8
_MAX_COUNTER = 1000


def bounded(text: str, limit: int = PART_BYTES) -> str:
    """`text` if it fits in `limit` bytes (UTF-8), else a prefix and a hash of it."""
    if len(text.encode()) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:_HASH_CHARS]
    keep = text
    while len(keep.encode()) > limit - _HASH_CHARS - 1:
        keep = keep[:-1]
    return f"{keep}-{digest}"


def recorded_overlays(changes: Iterable[Change]) -> dict[str, tuple[str, OverlayRecord]]:
    """Overlay node -> (snapshot name, its overlay record), the newest record of a name."""
    return {
        overlay.node: (change.name, overlay)
        for change in snapshots(changes)
        for overlay in change.overlays
    }


def _old_scheme_stem(snapshot: str, overlay: OverlayRecord) -> str:
    """The base's file stem of an overlay named `<base stem>.<snapshot>.qcow2`."""
    name = Path(overlay.filename).name
    suffix = f".{snapshot}.qcow2"
    return name[: -len(suffix)] if name.endswith(suffix) else Path(name).stem


def family(changes: list[Change], base: str, base_stem: str) -> tuple[str, str]:
    """(file stem, node stem) of the overlays put above node `base`, whose own image
    is named `base_stem` (`d0` for images/d0.qcow2, the node's name for an rbd leaf)."""
    overlays = recorded_overlays(changes)
    name, seen = base, set()
    while name in overlays and name not in seen:
        seen.add(name)
        snapshot, overlay = overlays[name]
        if overlay.stem is not None and overlay.node_stem is not None:
            return overlay.stem, overlay.node_stem
        if overlay.base not in overlays:  # the bottom of an old-scheme chain
            return bounded(_old_scheme_stem(snapshot, overlay)), bounded(overlay.base)
        name = overlay.base
    return bounded(base_stem), bounded(base)


def overlay_names(
    folder: Path,
    stems: tuple[str, str],
    snapshot: str,
    taken_files: set[Path],
    taken_nodes: set[str],
) -> tuple[Path, str]:
    """A file beside the base and a node name for the overlay of `snapshot`: the
    first of `<stem>.<snapshot>`, `<stem>.<snapshot>_2`, ... that nothing holds."""
    stem, node_stem = stems
    part = bounded(snapshot)
    for n in range(1, _MAX_COUNTER):
        suffix = "" if n == 1 else f"_{n}"
        path = folder / f"{stem}.{part}{suffix}.qcow2"
        node = f"{node_stem}.{part}{suffix}"
        free_node = node not in taken_nodes and f"{node}.file" not in taken_nodes
        if free_node and path not in taken_files and not os.path.lexists(path):
            return path, node
    raise FileExistsError(f"{folder}/{stem}.{part}_{_MAX_COUNTER}.qcow2 and all before it exist")
