"""The Graph: every node of a spec, opened, with its disks.

Opening builds children before parents and stops at the first error, closing
what it had opened, so a spec whose image cannot be opened is refused before
anything is mounted.  Walks go by edges (and so by roles), never by driver.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fusedisk.errors import FuseDiskError, OpenError
from fusedisk.graph.changes import (
    Change,
    apply_changes,
    load_changes,
    load_records,
    parse_changes,
    save_changes,
    state_path,
)
from fusedisk.graph.children import ReplaceChange
from fusedisk.graph.commit import CommitChange
from fusedisk.graph.disk import Disk
from fusedisk.graph.jobs import Jobs
from fusedisk.graph.node import Node, walk
from fusedisk.graph.registry import default_options, drivers
from fusedisk.graph.snapshot_record import SnapshotChange
from fusedisk.graph.stream import StreamChange
from fusedisk.spec_types import DiskSpec, Spec

log = logging.getLogger("fusedisk")

#: the kinds of change record a replay meets (each registers itself by its `op`
#: when its module loads; naming them here makes sure they have loaded)
RECORD_KINDS = (CommitChange, ReplaceChange, SnapshotChange, StreamChange)


class Graph:
    """All opened nodes of one spec and the disks exported from them."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec  # as the recorded graph changes left it
        #: the spec as its author wrote it (what they declared read-only stays so)
        self.user_spec = spec
        self.nodes: dict[str, Node] = {}  # in open order: children before parents
        self.disks: dict[str, Disk] = {}
        #: graph-level objects nodes share, by (section, name): throttle groups
        self.shared_objects: dict[tuple[str, str], Any] = {}
        #: every graph operation runs as a job of this registry (graph/jobs.py)
        self.jobs = Jobs(self)

    @property
    def base_dir(self) -> Path:
        return self.spec.base_dir

    @classmethod
    async def open(cls, spec: Spec, read_only: bool = False) -> Graph:
        """Open every disk of `spec`, as the recorded graph changes left it.

        With `read_only`, every node opens read-only and nothing is written
        (`fusedisk check`).
        """
        user_spec = spec
        spec = apply_changes(spec, load_changes(spec.path))
        if read_only:
            spec = dataclasses.replace(
                spec,
                nodes={
                    name: dataclasses.replace(n, options={**n.options, "read-only": True})
                    for name, n in spec.nodes.items()
                },
            )
        graph = cls(spec)
        graph.user_spec = user_spec
        try:
            for disk_spec in graph.spec.disks.values():
                top = await graph._open_spec_node(disk_spec.node)
                graph.disks[disk_spec.name] = graph._make_disk(disk_spec, top)
        except BaseException:
            await graph.close(flush=False)
            raise
        return graph

    def _make_disk(self, disk_spec: DiskSpec, top: Node) -> Disk:
        disk = Disk(disk_spec, top)
        disk.claim = lambda kind: self.jobs.claim(kind, disk, list(walk(disk.top)))
        return disk

    async def _open_spec_node(self, name: str) -> Node:
        if name in self.nodes:
            return self.nodes[name]
        node_spec = self.spec.nodes[name]
        children: dict[str, Node | list[Node]] = {}
        for slot, ref in node_spec.children.items():
            if isinstance(ref, list):
                children[slot] = [await self._open_spec_node(r) for r in ref]
            else:
                children[slot] = await self._open_spec_node(ref)
        cls = drivers()[node_spec.driver]
        return await self._open(cls(name, node_spec.options, children, self))

    async def _open(self, node: Node) -> Node:
        try:
            await node.open()
        except FuseDiskError:
            raise
        except OSError as e:
            raise OpenError(f"node '{node.name}' ({node.driver}): {e.strerror or e}") from e
        self.nodes[node.name] = node
        return node

    async def open_spare(self, name: str) -> Node:
        """Open a node of the spec that no disk uses yet (a spare for a quorum).

        Refuses a node that is already open: a node has one parent.
        """
        if name in self.nodes:
            raise OpenError(f"node '{name}' is already in use")
        if name not in self.spec.nodes:
            raise OpenError(f"there is no node named '{name}' in the spec")
        return await self._open_spec_node(name)

    def commit_record(self, record: Change) -> None:
        """Make one graph transaction durable (graph/changes.py).

        The new log is replayed on the user's spec first: a record the next
        mount would refuse is never written (the transaction is undone instead).
        """
        records = [*load_records(self.spec.path), record.to_json()]
        apply_changes(self.user_spec, parse_changes(records, state_path(self.spec.path)))
        save_changes(self.spec.path, records)

    def disks_of(self, nodes: list[Node]) -> list[Disk]:
        """The disks whose trees hold any of `nodes`."""
        wanted = {id(n) for n in nodes}
        return [d for d in self.disks.values() if any(id(n) in wanted for n in walk(d.top))]

    async def open_implicit(
        self, parent: Node, slot: str, driver: str, options: Mapping[str, Any]
    ) -> Node:
        """Open a node the spec does not name (a backing file found in a header)."""
        name = f"{parent.name}.{slot}"
        while name in self.nodes or name in self.spec.nodes:
            name += "_"
        return await self.add_node(name, driver, options, {})

    async def add_node(
        self,
        name: str,
        driver: str,
        options: Mapping[str, Any],
        children: Mapping[str, Node | list[Node]],
    ) -> Node:
        """Make and open a node at run time (an overlay); options default as in a spec."""
        full = {**default_options(driver), **options}
        node = drivers()[driver](name, full, children, self)
        try:
            return await self._open(node)
        except BaseException:
            for edge in node.children.values():
                edge.detach()
            raise

    async def remove_node(self, node: Node) -> None:
        """Take a node out of the graph for good: flush, close, unlink, forget.

        Children left without a parent go with it (an overlay's own file, a
        replaced quorum child's subtree); children still used elsewhere (the
        base an overlay was on) stay.  Removing a node twice does nothing.
        """
        if self.nodes.get(node.name) is not node:
            return
        del self.nodes[node.name]
        try:
            await node.flush()
        except Exception as e:
            log.warning("node '%s': flush before removal failed: %s", node.name, e)
        try:
            await node.close()
        except Exception as e:
            log.warning("node '%s': close failed: %s", node.name, e)
        for edge in list(node.children.values()):
            edge.detach()
            if not edge.node.parents:
                await self.remove_node(edge.node)

    def shared(self, section: str, name: str, factory: Callable[[Mapping[str, Any]], Any]) -> Any:
        """The object for `[section.name]` of the spec, made once by `factory`.

        Raises KeyError if the spec has no such entry; the spec has already
        checked that entry's options.
        """
        key = (section, name)
        if key not in self.shared_objects:
            self.shared_objects[key] = factory(self.spec.sections[section][name])
        return self.shared_objects[key]

    # -- walks ------------------------------------------------------------------

    def disk_nodes(self, disk: Disk) -> list[Node]:
        return list(walk(disk.top))

    # -- shutdown -----------------------------------------------------------------

    async def flush_all(self) -> None:
        for disk in self.disks.values():
            try:
                await disk.root.flush()
            except Exception as e:
                log.error("disk '%s': flush at shutdown failed: %s", disk.name, e)

    async def close(self, flush: bool = True) -> None:
        """Flush every disk, then close nodes parents first (those of the disks' trees
        in tree order, so a node opened at run time closes before its children)."""
        await self.jobs.aclose()
        if flush:
            await self.flush_all()
        order: dict[int, Node] = {}
        for disk in self.disks.values():
            for node in walk(disk.top):
                order.setdefault(id(node), node)
        for node in reversed(list(self.nodes.values())):
            order.setdefault(id(node), node)
        for node in order.values():
            try:
                await node.close()
            except Exception as e:
                log.error("node '%s': close failed: %s", node.name, e)
        self.nodes.clear()
