"""The change record of a snapshot: what snapshot.py writes, and its replay.

A snapshot's record names each overlay put in (its node, the base it sits on,
its file, its drivers, and the family its names come from: graph/naming.py) and
replays as: the base's user points at the overlay, the base turns read-only, and
the overlay's nodes join the spec.  Commit, revert, stream and `<disk>/snapshot`
read these records too, through `live_snapshots`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from fusedisk.graph.changes import Change, Replay, overlay_links
from fusedisk.graph.registry import default_options, overlay_driver
from fusedisk.spec_types import NodeSpec


@dataclass(frozen=True)
class OverlayRecord:
    """One overlay of a snapshot.  Records older than a field lack it: `driver`
    (the overlay driver then), `file_driver` (`file`), `stem` and `node_stem`
    (their family is found by walking the chain: graph/naming.py)."""

    node: str
    base: str
    filename: str
    driver: str | None = None
    file_driver: str | None = None
    stem: str | None = None
    node_stem: str | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> OverlayRecord:
        def text(key: str, required: bool = False) -> str | None:
            value = doc[key] if required else doc.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"overlay field '{key}' is not text")
            return value

        return cls(
            str(text("node", True)), str(text("base", True)), str(text("filename", True)),
            text("driver"), text("file-driver"), text("stem"), text("node-stem"),
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """Only the fields it has, under their JSON names (old records stay as written)."""
        fields = {"node": self.node, "base": self.base, "filename": self.filename,
                  "driver": self.driver, "file-driver": self.file_driver, "stem": self.stem,
                  "node-stem": self.node_stem}  # fmt: skip
        return {key: value for key, value in fields.items() if value is not None}

    def node_specs(self) -> list[NodeSpec]:
        """The spec nodes of the overlay: its image node and that node's file."""
        driver = self.driver or overlay_driver().driver
        leaf = self.file_driver or "file"
        file_options = {**default_options(leaf), "filename": self.filename}
        return [
            NodeSpec(f"{self.node}.file", leaf, file_options, inline=True),
            NodeSpec(self.node, driver, default_options(driver),
                     {"file": f"{self.node}.file", "backing": self.base}),
        ]  # fmt: skip


@dataclass(frozen=True)
class SnapshotChange(Change):
    op: ClassVar[str] = "snapshot"
    name: str
    time: str
    disk: str
    overlays: tuple[OverlayRecord, ...]

    @classmethod
    def from_json(cls, record: dict[str, Any], where: Path) -> Change:
        overlays = record["overlays"]
        if not isinstance(overlays, list):
            raise ValueError("'overlays' is not a list")
        return cls(str(record["name"]), str(record.get("time", "")), str(record.get("disk", "")),
                   tuple(OverlayRecord.from_json(o) for o in overlays))  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "name": self.name, "time": self.time, "disk": self.disk,
                "overlays": [o.to_json() for o in self.overlays]}  # fmt: skip

    def replay(self, replay: Replay) -> None:
        for overlay in self.overlays:
            if not replay.has(overlay.base):
                raise replay.refuse(
                    f"snapshot '{self.name}' was taken of node '{overlay.base}', which the "
                    "spec no longer has; refusing to open an older layer"
                )
            replay.repoint(overlay.base, overlay.node)
            replay.make_read_only(overlay.base)
            for node in overlay.node_specs():
                replay.spec.nodes[node.name] = node
            replay.overlay_files[overlay.node] = (self.name, overlay.filename)

    def relink(self, links: dict[str, str | None]) -> None:
        for overlay in self.overlays:
            links[overlay.node] = overlay.base


def live_snapshots(changes: list[Change], disk: str) -> list[SnapshotChange]:
    """The snapshots of `disk` that still mark a point one can go back to (some
    overlay of it still sits on its base), oldest first."""
    links = overlay_links(changes)
    return [
        c
        for c in changes
        if isinstance(c, SnapshotChange)
        and c.disk == disk
        and any(links.get(o.node) == o.base for o in c.overlays)
    ]


def snapshots(changes: Iterable[Change]) -> list[SnapshotChange]:
    """The snapshot records among `changes`, in order."""
    return [c for c in changes if isinstance(c, SnapshotChange)]
