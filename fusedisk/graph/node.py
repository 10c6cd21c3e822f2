"""The node contract: what every driver (leaf, format, filter) is.

A node has a size and async request methods, all offsets in bytes.  Its
children are Edges, declared by `child_slots`; it reaches them only through
those edges.  `__init__` does no I/O; `open` does.  The graph opens children
before parents and closes parents before children.

Two separate declarations say how a node takes part in the graph:

- `Filter` (a subclass) presents its child's data unchanged and forwards every
  operation it does not override.  A node that changes data (raw's window,
  luks, quorum, qcow2) derives from `Node`, whose defaults refuse, so a new
  operation can never slip through an encryption layer unchanged.
- `graph_op` says where a graph operation such as a snapshot goes: PASS to the
  primary child (filters, luks), FANOUT to every child (quorum), TARGET: the
  overlay is inserted above this node (formats), REFUSE.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Protocol

from fusedisk.errors import ControlError, NotSupported
from fusedisk.graph.bitmaps import BitmapSet
from fusedisk.graph.driver_slots import DriverSlots
from fusedisk.graph.edge import Edge
from fusedisk.graph.extents import Extent, Status
from fusedisk.graph.options import Option, OptionValueError
from fusedisk.graph.stats import IoStats

log = logging.getLogger("fusedisk")


class GraphOp(Enum):
    """Where a graph operation (snapshot) reaching this node goes."""

    PASS = "pass"
    FANOUT = "fanout"
    TARGET = "target"
    REFUSE = "refuse"


class Role:
    """Edge roles, as QEMU names them; walks use roles, never driver names."""

    FILE = "file"  # a format's storage (metadata and data)
    FILTERED = "filtered"  # a filter's child, whose data it presents
    BACKING = "backing"  # copy-on-write base, read-only
    CHILDREN = "children"  # a fan-out node's siblings
    DATA = "data"
    METADATA = "metadata"
    ROOT = "root"  # the Disk's edge to its top node


@dataclass(frozen=True)
class ChildSlot:
    """A declared child: its spec key, its role, and whether it is required or a list."""

    name: str
    role: str
    required: bool = True
    many: bool = False


@dataclass(frozen=True)
class Control:
    """A driver-specific control file: reading shows state, writing acts.

    `write` receives the written text without its trailing newline; raising
    ControlError (or any fusedisk error) returns an errno to the writer.
    """

    read: Callable[[], str]
    write: Callable[[str], Awaitable[None]] | None = None
    help: str = ""


class SharedObject(Protocol):
    """A graph-level object several nodes share (a throttle group).

    The mount shows it as `/<section>/<name>/` with `options/` and `stats`.
    """

    def option_values(self) -> dict[str, str]: ...

    def runtime_options(self) -> set[str]: ...

    async def set_option(self, name: str, text: str) -> None: ...

    def stats_dict(self) -> dict[str, Any]: ...


class NodeContext(Protocol):
    """What the graph offers a node: its spec's folder, implicit children, shared objects."""

    @property
    def base_dir(self) -> Path: ...

    async def open_implicit(
        self, parent: Node, slot: str, driver: str, options: Mapping[str, Any]
    ) -> Node: ...

    def shared(
        self, section: str, name: str, factory: Callable[[Mapping[str, Any]], Any]
    ) -> Any: ...


class ChildSet(Protocol):
    """A fan-out node's children as a graph job changes them (QEMU's
    bdrv_add_child / bdrv_del_child); replace is built from these (graph/children.py).

    `add_child` attaches `node` as child `name`, a voter or not (a non-voting
    child is written with the others and never read: a spare being filled); it
    refuses (ControlError) a name taken or a child it cannot take now.  A node
    deleted and added back in the same place comes back in the state it had.
    """

    def add_child(self, node: Node, name: str, voting: bool) -> Edge: ...

    def del_child(self, edge: Edge) -> None: ...


class Scrubber(Protocol):
    """A node that can check and repair a range of itself (a quorum votes and
    rewrites the losers); the graph's scrub job runs it over the disk.  The
    step takes whatever lock keeps guest writes out of the range itself."""

    def scrub_report(self) -> dict[str, Any]: ...

    async def scrub_chunk(self, offset: int, length: int, report: dict[str, Any]) -> None: ...


COMMON_OPTIONS: Mapping[str, Option] = {
    "read-only": Option(
        "read-only", "bool", False, "open this node (and what it writes to) read-only"
    ),
}


class Node(DriverSlots):
    """Base of every driver.  Defaults refuse every request (see module doc); the
    image-level slots (probe, create, info) are in graph/driver_slots.py."""

    summary: ClassVar[str] = ""
    option_specs: ClassVar[Mapping[str, Option]] = {}
    child_slots: ClassVar[tuple[ChildSlot, ...]] = ()
    graph_op: ClassVar[GraphOp] = GraphOp.REFUSE
    grows_on_write: ClassVar[bool] = False
    #: a format whose `file` child may be given as `filename = "..."` in the spec
    accepts_filename: ClassVar[bool] = False
    #: a format a snapshot can insert as an overlay (see `create_overlay`)
    makes_overlays: ClassVar[bool] = False
    #: a format that can make itself standalone at the end of a stream (`drop_backing`)
    drops_backing: ClassVar[bool] = False
    #: a format that keeps bitmaps in its image (`store_bitmaps`)
    persistent_bitmaps: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        options: Mapping[str, Any],
        children: Mapping[str, Node | list[Node]],
        context: NodeContext,
    ) -> None:
        self.name = name
        self.options: dict[str, Any] = dict(options)
        self.context = context
        self.children: dict[str, Edge] = {}
        self.parents: list[Edge] = []
        self.stats = IoStats()
        self.size = 0
        self.request_alignment = 1
        self.read_only: bool = bool(self.options.get("read-only", False))
        #: dirty bitmaps the edges above mark on every write (graph/bitmaps.py)
        self.bitmaps = BitmapSet(name)
        for slot in self.child_slots:
            child = children.get(slot.name)
            if child is None:
                continue
            if isinstance(child, list):
                for i, node in enumerate(child):
                    self.children[f"{slot.name}.{i}"] = Edge(
                        self, f"{slot.name}.{i}", slot.role, node
                    )
            else:
                self.children[slot.name] = Edge(self, slot.name, slot.role, child)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    @classmethod
    def all_options(cls) -> Mapping[str, Option]:
        return {**COMMON_OPTIONS, **cls.option_specs}

    # -- children ---------------------------------------------------------

    def child(self, name: str) -> Edge:
        return self.children[name]

    def edges_with_role(self, role: str) -> list[Edge]:
        return [e for e in self.children.values() if e.role == role]

    def add_child(self, name: str, role: str, node: Node) -> Edge:
        """Attach a child found while opening (a qcow2's backing file)."""
        edge = Edge(self, name, role, node)
        self.children[name] = edge
        return edge

    def _inherit_read_only(self) -> None:
        if any(e.node.read_only for e in self.children.values() if e.role != Role.BACKING):
            self.read_only = True

    # -- life cycle ---------------------------------------------------------

    async def open(self) -> None:
        """Do the I/O that makes the node usable; children are already open."""
        self._inherit_read_only()

    async def close(self) -> None:
        """Release what `open` took; the graph has flushed before calling it."""

    async def prepare_read_only(self) -> None:
        """The graph is about to make this node read-only (the base of a snapshot):
        write back what is cached and mark the image clean while it still can."""

    async def prepare_writable(self) -> None:
        """The graph has made this node writable again at run time (a commit's base):
        do what a read-write open would (a qcow2 marks itself dirty)."""

    @classmethod
    def create_overlay(cls, path: Path, size: int, backing: str, backing_format: str) -> None:
        """Create an empty image at `path` over `backing` (a path relative to its
        folder), for a snapshot or a revert, or standalone if `backing` is empty (a
        full backup's target); formats with `makes_overlays` implement it."""
        raise NotSupported(f"driver '{cls.driver}' cannot create an overlay")

    async def drop_backing(self) -> None:
        """Make the image standalone (its header names no backing file any more)."""
        raise NotSupported(f"node '{self.name}' ({self.driver}) cannot drop its backing file")

    async def store_bitmaps(self) -> None:
        """Write the persistent bitmaps' names and flags to the image now (marked in
        use while it is open), after one was added or removed; formats with
        `persistent_bitmaps` implement it."""
        raise NotSupported(f"node '{self.name}' ({self.driver}) cannot keep persistent bitmaps")

    def child_set(self) -> ChildSet | None:
        """The fan-out capability (quorum): children that can be added and deleted."""
        return None

    def scrubber(self) -> Scrubber | None:
        """The scrub capability (quorum): ranges that can be checked and repaired."""
        return None

    def begin_drain(self) -> None:
        """The disk is draining: let queued requests through now (throttle does).

        A drain waits for every request in flight, so a node that holds
        requests back must release them or the graph change would stall.
        """

    def end_drain(self) -> None:
        """The drain is over; normal service (and limits) resume."""

    # -- requests (offsets and lengths in bytes, aligned to request_alignment) --

    async def read(self, offset: int, length: int) -> bytes:
        raise NotSupported(f"node '{self.name}' ({self.driver}) cannot read")

    async def write(self, offset: int, data: bytes) -> None:
        raise NotSupported(f"node '{self.name}' ({self.driver}) cannot write")

    async def flush(self) -> None:
        raise NotSupported(f"node '{self.name}' ({self.driver}) cannot flush")

    async def discard(self, offset: int, length: int) -> None:
        raise NotSupported(f"node '{self.name}' ({self.driver}) cannot discard")

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        raise NotSupported(f"node '{self.name}' ({self.driver}) cannot write zeroes")

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length, Status.DATA | Status.ALLOCATED)]

    async def truncate(self, size: int) -> None:
        raise NotSupported(f"node '{self.name}' ({self.driver}) cannot change its size")

    # -- introspection for the control tree ---------------------------------

    def option_values(self) -> dict[str, str]:
        """Every option's current value as text (secrets redacted)."""
        specs = self.all_options()
        return {name: spec.render(self.options.get(name)) for name, spec in specs.items()}

    def runtime_options(self) -> set[str]:
        return {name for name, spec in self.all_options().items() if spec.runtime}

    async def set_option(self, name: str, text: str) -> None:
        """Change a run-time option; drivers override `apply_option` to react."""
        spec = self.all_options().get(name)
        if spec is None or not spec.runtime:
            raise ControlError(f"node '{self.name}': option '{name}' cannot change at run time")
        try:
            value = spec.parse(text.strip())
        except OptionValueError as e:
            raise ControlError(f"node '{self.name}': option '{name}': {e}") from None
        await self.apply_option(name, value)
        self.options[name] = value

    async def apply_option(self, name: str, value: Any) -> None:
        """Hook: a run-time option changes; raise ControlError to refuse."""

    def controls(self) -> dict[str, Control]:
        """Driver-specific control files in the node's directory."""
        return {}

    def driver_stats(self) -> dict[str, Any]:
        """Driver-specific counters added to the node's `stats` file."""
        return {}


class Filter(Node):
    """A node that presents its `file` child's data unchanged.

    Everything not overridden is forwarded to the child, which is safe only
    because the data is unchanged (throttle, copy-on-read, fault injection).
    """

    child_slots = (ChildSlot("file", Role.FILTERED),)
    graph_op = GraphOp.PASS

    @property
    def filtered(self) -> Edge:
        return self.children["file"]

    async def open(self) -> None:
        await super().open()
        self.size = self.filtered.node.size
        self.request_alignment = self.filtered.node.request_alignment

    async def read(self, offset: int, length: int) -> bytes:
        return await self.filtered.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.filtered.write(offset, data)

    async def flush(self) -> None:
        await self.filtered.flush()

    async def discard(self, offset: int, length: int) -> None:
        await self.filtered.discard(offset, length)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        await self.filtered.write_zeroes(offset, length, unmap)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.filtered.block_status(offset, length)

    async def truncate(self, size: int) -> None:
        await self.filtered.truncate(size)
        self.size = self.filtered.node.size


def walk(node: Node) -> Iterator[Node]:
    """`node` and every node below it, parents before children (edges only)."""
    yield node
    for edge in node.children.values():
        yield from walk(edge.node)


#: the request methods every data-changing node must implement itself
DATA_OPERATIONS = ("read", "write", "flush", "discard", "write_zeroes", "block_status")
