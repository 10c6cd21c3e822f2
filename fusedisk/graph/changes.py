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

Each kind of record is a typed `Change` written beside the operation that makes
it (SnapshotChange in snapshot_record.py, CommitChange in commit.py, StreamChange
in stream.py, ReplaceChange in children.py): it reads and writes its JSON, replays
itself onto a Spec, and says what it does to the snapshot overlays' links.  This
module holds the log, the base class and the dispatch by `op`.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from fusedisk.errors import SpecError
from fusedisk.graph.node import Role
from fusedisk.graph.registry import drivers
from fusedisk.hostio.files import create_file, fsync_folder
from fusedisk.spec_types import Spec

STATE_VERSION = 1


def state_path(spec_path: Path) -> Path:
    return spec_path.with_name(spec_path.name + ".state.json")


def load_changes(spec_path: Path) -> list[Change]:
    """The recorded changes, oldest first, a transaction's changes in its place."""
    return parse_changes(load_records(spec_path), state_path(spec_path))


def parse_changes(records: list[dict[str, Any]], where: Path) -> list[Change]:
    """Records as typed single changes: a `transaction` record (one graph
    transaction, graph/transaction.py) stands for the changes it lists."""
    out: list[Change] = []
    for record in records:
        change = Change.from_record(record, where)
        out.extend(change.changes if isinstance(change, TransactionChange) else [change])
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


def record_change(spec_path: Path, change: Change) -> None:
    """Append one record to the durable log (see save_changes)."""
    save_changes(spec_path, [*load_records(spec_path), change.to_json()])


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


@dataclass
class Replay:
    """What replaying records onto a spec carries from one record to the next."""

    spec: Spec
    where: Path
    #: overlay node -> (snapshot name, its file): checked once every record is replayed
    overlay_files: dict[str, tuple[str, str]] = field(default_factory=dict)

    def has(self, *names: str) -> bool:
        return all(name in self.spec.nodes for name in names)

    def refuse(self, sentence: str) -> SpecError:
        """A record that no longer fits the spec: the mount is refused."""
        return SpecError(f"{self.where}: {sentence}")

    def repoint(self, old: str, new: str) -> None:
        _repoint(self.spec, old, new)

    def make_read_only(self, name: str) -> None:
        _make_read_only(self.spec, name)

    def set_writable(self, name: str) -> None:
        _set_writable(self.spec, name)

    def remove_unused(self, name: str) -> None:
        _remove_unused(self.spec, name)


class Change:
    """One recorded graph change.  Subclasses name their `op`, read and write
    their JSON, and replay themselves; the base knows every kind by its `op`."""

    op: ClassVar[str] = ""
    _kinds: ClassVar[dict[str, type[Change]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.op:
            Change._kinds[cls.op] = cls

    @classmethod
    def from_record(cls, record: Any, where: Path) -> Change:
        """The typed change of one JSON record; a record of no known kind, or one
        that lacks a field its kind needs, refuses the spec with a sentence."""
        op = record.get("op") if isinstance(record, dict) else None
        kind = Change._kinds.get(op) if isinstance(op, str) else None
        if kind is None:
            raise SpecError(f"{where}: unknown recorded change {record!r}")
        try:
            return kind.from_json(record, where)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SpecError(f"{where}: damaged recorded {op} change ({e!r}): {record!r}") from None

    @classmethod
    def from_json(cls, record: dict[str, Any], where: Path) -> Change:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def replay(self, replay: Replay) -> None:
        """Make the spec what the graph became after this change."""
        raise NotImplementedError

    def relink(self, links: dict[str, str | None]) -> None:
        """What this change does to the overlays' links to their bases (overlay_links)."""


@dataclass(frozen=True)
class TransactionChange(Change):
    """Several changes made durable together by one graph transaction."""

    op: ClassVar[str] = "transaction"
    changes: list[Change]

    @classmethod
    def from_json(cls, record: dict[str, Any], where: Path) -> Change:
        changes = record["changes"]
        if not isinstance(changes, list):
            raise ValueError("'changes' is not a list")
        return cls([Change.from_record(c, where) for c in changes])

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "changes": [c.to_json() for c in self.changes]}

    def replay(self, replay: Replay) -> None:
        for change in self.changes:
            change.replay(replay)

    def relink(self, links: dict[str, str | None]) -> None:
        for change in self.changes:
            change.relink(links)


def one_record(changes: list[Change]) -> Change:
    """What one transaction records: its one change, or all of them together."""
    return changes[0] if len(changes) == 1 else TransactionChange(changes)


def overlay_links(changes: list[Change]) -> dict[str, str | None]:
    """Overlay node -> its base, for the overlays the changes leave in the graph.

    A committed overlay is gone, as is one a quorum replaced; a streamed one (and
    every overlay of the chain it streamed from) maps to None: it no longer has its
    snapshot's base.
    """
    links: dict[str, str | None] = {}
    for change in changes:
        change.relink(links)
    return links


def apply_changes(spec: Spec, changes: list[Change]) -> Spec:
    """The spec as the recorded changes left it (the input Spec is not modified)."""
    if not changes:
        return spec
    spec = replace(
        spec,
        nodes={k: replace(v, children=dict(v.children)) for k, v in spec.nodes.items()},
        disks={k: replace(v) for k, v in spec.disks.items()},
    )
    replay = Replay(spec, state_path(spec.path))
    for change in changes:
        change.replay(replay)
    used = _reachable(spec)
    for name, (snapshot, filename) in replay.overlay_files.items():
        if name in used and not Path(filename).exists():
            raise SpecError(
                f"{replay.where}: snapshot '{snapshot}': overlay '{filename}' is missing; "
                "refusing to open an older layer"
            )
    return spec
