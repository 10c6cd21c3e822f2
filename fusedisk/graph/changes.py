"""Durable graph changes: recorded beside the spec, replayed on the next open.

A snapshot changes the graph of a running mount; the user's spec file is never
rewritten.  Instead each change is appended to `<spec>.state.json` (written to
a temporary file, fsync'd, renamed over the old one, the folder fsync'd), and
every open of the spec replays the recorded changes onto the parsed Spec before
any image is opened.  So the disk never silently reopens on an older layer, and
a change that no longer fits the spec (a node renamed) refuses to mount.

The change is recorded *before* the live graph is switched: a crash between the
two leaves a record whose overlays are empty, which is exactly the state the
switched graph would have had.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

from fusedisk.errors import SpecError
from fusedisk.graph.node import Role
from fusedisk.graph.registry import default_options, drivers, overlay_driver
from fusedisk.hostio.files import create_file, fsync_folder
from fusedisk.spec_types import NodeSpec, Spec

STATE_VERSION = 1


def state_path(spec_path: Path) -> Path:
    return spec_path.with_name(spec_path.name + ".state.json")


def load_changes(spec_path: Path) -> list[dict[str, Any]]:
    """The recorded changes, oldest first, a transaction's changes in its place."""
    return expand(load_records(spec_path))


def expand(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records as single changes: a `transaction` record (one graph transaction,
    graph/transaction.py) stands for the changes it lists."""
    out: list[dict[str, Any]] = []
    for record in records:
        if record.get("op") == "transaction" and isinstance(record.get("changes"), list):
            out.extend(record["changes"])
        else:
            out.append(record)
    return out


def load_records(spec_path: Path) -> list[dict[str, Any]]:
    """The records of the log as written (a transaction is one record)."""
    path = state_path(spec_path)
    try:  # fusedisk writes this file itself: a symlink or FIFO there is refused, unread
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            doc = json.loads(f.read())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise SpecError(f"{path}: cannot read the recorded graph changes: {e}") from None
    if (
        not isinstance(doc, dict)
        or doc.get("version") != STATE_VERSION
        or not isinstance(doc.get("changes"), list)
    ):
        raise SpecError(f"{path}: not a fusedisk state file of version {STATE_VERSION}")
    return list(doc["changes"])


def save_changes(spec_path: Path, changes: list[dict[str, Any]]) -> None:
    """Atomically replace the state file: write, fsync, rename, fsync the folder."""
    path = state_path(spec_path)
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps({"version": STATE_VERSION, "changes": changes}, indent=2) + "\n"
    # a stale temporary, or a symlink planted there, is replaced, never followed
    create_file(tmp, f"cannot write '{tmp}'", chunks=((0, data.encode()),), replace=True)
    os.rename(tmp, path)
    fsync_folder(path.parent)


def record_change(spec_path: Path, change: dict[str, Any]) -> None:
    """Append one record to the durable log (see save_changes)."""
    save_changes(spec_path, [*load_records(spec_path), change])


def _user_of(spec: Spec, name: str) -> tuple[str, str, int | None] | None:
    """Who uses node `name`: ("node", parent, index) / ("disk", disk, None)."""
    for node in spec.nodes.values():
        for slot, ref in node.children.items():
            if ref == name:
                return (node.name, slot, None)
            if isinstance(ref, list) and name in ref:
                return (node.name, slot, ref.index(name))
    for disk in spec.disks.values():
        if disk.node == name:
            return (f"disk:{disk.name}", "node", None)
    return None


def _repoint(spec: Spec, old: str, new: str) -> None:
    user = _user_of(spec, old)
    if user is None:
        raise SpecError(f"{spec.path}: recorded change: nothing uses node '{old}' any more")
    owner, slot, index = user
    if owner.startswith("disk:"):
        spec.disks[owner[5:]].node = new
        return
    children = spec.nodes[owner].children
    ref = children[slot]
    if isinstance(ref, list):
        assert index is not None
        children[slot] = [*ref[:index], new, *ref[index + 1 :]]
    else:
        children[slot] = new


def _make_read_only(spec: Spec, name: str) -> None:
    node = spec.nodes[name]
    spec.nodes[name] = replace(node, options={**node.options, "read-only": True})
    for ref in node.children.values():
        for child in [ref] if isinstance(ref, str) else ref:
            _make_read_only(spec, child)


def _set_writable(spec: Spec, name: str) -> None:
    """Undo `_make_read_only` on a commit's base: the node and all but its backing."""
    node = spec.nodes[name]
    spec.nodes[name] = replace(node, options={**node.options, "read-only": False})
    cls = drivers().get(node.driver)
    roles = {slot.name: slot.role for slot in cls.child_slots} if cls else {}
    for slot, ref in node.children.items():
        if roles.get(slot) == Role.BACKING:
            continue
        for child in [ref] if isinstance(ref, str) else ref:
            _set_writable(spec, child)


def _reachable(spec: Spec) -> set[str]:
    """The nodes the disks of the spec open."""
    seen: set[str] = set()
    todo = [disk.node for disk in spec.disks.values()]
    while todo:
        name = todo.pop()
        if name in seen or name not in spec.nodes:
            continue
        seen.add(name)
        for ref in spec.nodes[name].children.values():
            todo.extend([ref] if isinstance(ref, str) else ref)
    return seen


def _remove_unused(spec: Spec, name: str) -> None:
    """Drop node `name` from the spec if nothing uses it, and then its children alike."""
    if name not in spec.nodes or name in spec.parent_of():
        return
    node = spec.nodes.pop(name)
    for ref in node.children.values():
        for child in [ref] if isinstance(ref, str) else ref:
            _remove_unused(spec, child)


def overlay_links(changes: list[dict[str, Any]]) -> dict[str, str | None]:
    """Overlay node -> its base, for the overlays the changes leave in the graph.

    A committed overlay is gone, as is one a quorum replaced; a streamed one (and
    every overlay of the chain it streamed from) maps to None: it no longer has its
    snapshot's base.
    """
    links: dict[str, str | None] = {}
    for change in changes:
        op = change.get("op")
        if op == "snapshot":
            for overlay in change["overlays"]:
                links[overlay["node"]] = overlay["base"]
        elif op == "commit":
            links.pop(change["overlay"], None)
        elif op == "replace":  # a quorum child replaced: that overlay left the graph
            links.pop(change["old"], None)
        elif op == "stream":
            below = links.get(change["node"])
            links[change["node"]] = None
            while below is not None and below in links:
                node, below = below, links[below]
                links[node] = None
    return links


def live_snapshots(changes: list[dict[str, Any]], disk: str) -> list[dict[str, Any]]:
    """The snapshot records of `disk` that still mark a point one can go back to
    (some overlay of it still sits on its base), oldest first."""
    links = overlay_links(changes)
    return [
        c
        for c in changes
        if c.get("op") == "snapshot"
        and c.get("disk") == disk
        and any(links.get(o["node"]) == o["base"] for o in c["overlays"])
    ]


def overlay_specs(overlay: dict[str, Any]) -> list[NodeSpec]:
    """The spec nodes of one recorded overlay: a qcow2 node and its file."""
    node, base, filename = overlay["node"], overlay["base"], overlay["filename"]
    driver = overlay.get("driver") or overlay_driver().driver
    # the leaf driver of the base's image; records older than "file-driver" used `file`
    leaf = overlay.get("file-driver", "file")
    options = default_options(driver)
    file_options = {**default_options(leaf), "filename": filename}
    return [
        NodeSpec(f"{node}.file", leaf, file_options, inline=True),
        NodeSpec(node, driver, options, {"file": f"{node}.file", "backing": base}),
    ]


def apply_changes(spec: Spec, changes: list[dict[str, Any]]) -> Spec:
    """The spec as the recorded changes left it (the input Spec is not modified)."""
    changes = expand(changes)
    if not changes:
        return spec
    spec = replace(
        spec,
        nodes={k: replace(v, children=dict(v.children)) for k, v in spec.nodes.items()},
        disks={k: replace(v) for k, v in spec.disks.items()},
    )
    where = state_path(spec.path)
    overlay_files: dict[str, tuple[str, str]] = {}  # node -> (snapshot, filename)
    for change in changes:
        op = change.get("op")
        if op == "snapshot":
            for overlay in change["overlays"]:
                base = overlay["base"]
                if base not in spec.nodes:
                    raise SpecError(
                        f"{where}: snapshot '{change['name']}' was taken of node "
                        f"'{base}', which the spec no longer has; refusing to open an older layer"
                    )
                _repoint(spec, base, overlay["node"])
                _make_read_only(spec, base)
                for node in overlay_specs(overlay):
                    spec.nodes[node.name] = node
                overlay_files[overlay["node"]] = (change["name"], overlay["filename"])
        elif op == "replace":  # a quorum child replaced by a spare (filters/quorum/node.py)
            old, new = change["old"], change["new"]
            if old not in spec.nodes or new not in spec.nodes:
                raise SpecError(
                    f"{where}: recorded replacement of node '{old}' by '{new}': the spec "
                    "has no such node; refusing to open the replaced child"
                )
            _repoint(spec, old, new)
        elif op == "commit":
            overlay, base = change["overlay"], change["base"]
            if overlay not in spec.nodes or base not in spec.nodes:
                raise SpecError(
                    f"{where}: recorded commit of node '{overlay}' into '{base}': the spec "
                    "has no such node; refusing to open an older layer"
                )
            _repoint(spec, overlay, base)
            children = spec.nodes[overlay].children
            if children.get("backing") == base:
                del children["backing"]
            _remove_unused(spec, overlay)
            _set_writable(spec, base)
        elif op == "stream":
            name = change["node"]
            if name not in spec.nodes:
                raise SpecError(
                    f"{where}: recorded stream into node '{name}': the spec has no such node"
                )
            node = spec.nodes[name]
            node.children.pop("backing", None)
            spec.nodes[name] = replace(node, options={**node.options, "backing": None})
        else:
            raise SpecError(f"{where}: unknown recorded change {change!r}")
    used = _reachable(spec)
    for name, (snapshot, filename) in overlay_files.items():
        if name in used and not Path(filename).exists():
            raise SpecError(
                f"{where}: snapshot '{snapshot}': overlay '{filename}' is missing; "
                "refusing to open an older layer"
            )
    return spec
