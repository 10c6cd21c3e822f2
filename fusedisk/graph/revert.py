"""Revert: back to a snapshot, throwing away what was written since.

revert (in the request): a fresh empty overlay on the same base is created
    beside the active one under a temporary name and opened; one transaction
    re-points the user's edge to it and renames its file over the old one (the
    atomic rename is the point of no return: node and file names stay the
    same, so no record is needed).
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from fusedisk.errors import FuseDiskError, describe
from fusedisk.graph.chain import (
    backing_of,
    rename_node,
    snapshot_record,
    temp_name,
    user_edge,
)
from fusedisk.graph.changes import load_changes, overlay_links
from fusedisk.graph.jobs import Job, JobError
from fusedisk.graph.node import Node, Role, walk
from fusedisk.graph.registry import overlay_driver
from fusedisk.graph.snapshot import backing_reference, image_of, leaf_driver, repoint

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk
    from fusedisk.graph.graph import Graph

log = logging.getLogger("fusedisk")


# -- revert -------------------------------------------------------------------------------------


class RevertJob(Job):
    """Throw away what was written since snapshot `name` (the newest if empty).

    Each overlay of the snapshot that is still the active layer is replaced by a
    fresh empty one on the same base, under the same file and node names.
    """

    kind = "revert"

    def __init__(self, graph: Graph, disk: Disk, name: str) -> None:
        super().__init__(graph, disk)
        self.graph = graph
        self.name = name.strip()
        self.targets: list[tuple[Node, Node, Path]] = []
        self.fresh: list[tuple[Node, Node, Path]] = []  # (file node, overlay node, temp file)
        self.files: list[str] = []

    def claims(self) -> list[Node]:
        return list(walk(self.disk.top))

    async def setup(self) -> None:
        graph, disk = self.graph, self.disk
        record = snapshot_record(graph, disk, self.name, "revert")
        self.target = record.name
        links = overlay_links(load_changes(graph.spec.path))
        in_disk = {id(n) for n in walk(disk.top)}
        for overlay in record.overlays:
            node = graph.nodes.get(overlay.node)
            if node is None or id(node) not in in_disk or links.get(node.name) != overlay.base:
                continue
            if user_edge(node).role == Role.BACKING:
                continue  # a newer snapshot covers it
            self.targets.append((node, backing_of(node), image_of(node)))
        if not self.targets:
            raise JobError(
                f"disk '{disk.name}': revert: no overlay of snapshot '{record.name}' is the "
                "active layer (revert or commit the newer snapshots first)"
            )
        try:
            for node, base, path in self.targets:
                await self._fresh_overlay(node, base, path)
        except (FuseDiskError, OSError) as e:
            raise JobError(
                f"disk '{disk.name}': revert to '{record.name}' failed: {describe(e)}"
            ) from e

    async def _fresh_overlay(self, node: Node, base: Node, path: Path) -> None:
        graph = self.graph
        driver = overlay_driver()
        temp = path.with_name(f".{path.name}.revert")
        self.txn.undo_later(partial(temp.unlink, missing_ok=True))
        temp.unlink(missing_ok=True)
        backing, backing_format = backing_reference(base, path)
        driver.create_overlay(temp, node.size, backing, backing_format)
        file_node = await graph.add_node(
            temp_name(graph, f"{node.name}.file"), leaf_driver(node), {"filename": str(temp)}, {}
        )
        self.txn.undo_later(partial(graph.remove_node, file_node))
        new = await graph.add_node(
            temp_name(graph, node.name), driver.driver, {}, {"file": file_node, "backing": base}
        )
        self.txn.undo_later(partial(graph.remove_node, new))
        self.fresh.append((file_node, new, temp))

    async def prepare(self) -> None:
        steps = [repoint(user_edge(old), new) for (old, _, _), (_, new, _) in
                 zip(self.targets, self.fresh, strict=True)]  # fmt: skip
        await self.txn.apply(steps, durable=self._rename_files, then=[self._forget_old])
        self.files = [str(path) for _, _, path in self.targets]
        log.info("disk '%s': reverted to snapshot '%s': %s", self.disk.name, self.target,
                 ", ".join(self.files))  # fmt: skip

    def _rename_files(self) -> None:
        """The point of no return: each fresh file takes the old one's name."""
        for (_, _, path), (file_node, _, temp) in zip(self.targets, self.fresh, strict=True):
            os.rename(temp, path)
            file_node.options["filename"] = str(path)
        for folder in {path.parent for _, _, path in self.targets}:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    async def _forget_old(self) -> None:
        for (old, _, _), (file_node, new, _) in zip(self.targets, self.fresh, strict=True):
            old_file = old.children["file"].node.name
            await self.graph.remove_node(old)
            rename_node(self.graph, file_node, old_file)
            rename_node(self.graph, new, old.name)


async def revert(graph: Graph, disk: Disk, name: str) -> list[str]:
    """Revert to snapshot `name` (the newest if empty); returns the overlay files reset."""
    job = RevertJob(graph, disk, name)
    await graph.jobs.start(job)
    return job.files
