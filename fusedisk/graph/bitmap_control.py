"""Managing a node's dirty bitmaps: what the `bitmaps/` control files do.

One line written to a control file of `nodes/NODE/bitmaps/` (or `DISK/bitmaps/`,
the disk's bitmap node, see `bitmap_node`):

    add NAME [GRANULARITY] [persistent] [disabled]
    remove NAME    clear NAME    enable NAME    disable NAME    merge SRC DST

Each change is a graph transaction (graph/transaction.py): it runs with the
node's disks drained, so no write is in flight while bits are cleared or
copied (a write marks its bits before it runs, so a clear under drain never
loses one).  Adding or removing a persistent bitmap is written to the image
at once, as the transaction's durable step; if that fails, the change is
undone and the writer gets the error.  Bits and the enabled flag of a
persistent bitmap reach the image when it is closed (QEMU does the same); until
then the image marks it in use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fusedisk.errors import ControlError
from fusedisk.graph.bitmaps import (
    DEFAULT_GRANULARITY,
    BitmapSet,
    DirtyBitmap,
    check_granularity,
    check_name,
)
from fusedisk.graph.node import Filter, GraphOp, Node, Role
from fusedisk.graph.options import OptionValueError, parse_size
from fusedisk.graph.transaction import Step, Transaction

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk
    from fusedisk.graph.graph import Graph

#: control files of a `bitmaps/` directory, with what reading them says
COMMANDS = {
    "add": "write 'NAME [GRANULARITY] [persistent] [disabled]' to add a dirty bitmap\n",
    "remove": "write a bitmap's name to remove it\n",
    "clear": "write a bitmap's name to clear all its bits\n",
    "enable": "write a bitmap's name to have writes mark it again\n",
    "disable": "write a bitmap's name to stop writes marking it\n",
    "merge": "write 'SRC DST' to set in DST every bit set in SRC\n",
}


def bitmap_node(disk: Disk) -> Node:
    """The disk's format node: down from the top through nodes that pass graph
    operations to a single child (throttle, copy-on-read, luks), to the first that
    keeps bitmaps in its image or takes graph operations itself (qcow2, quorum)."""
    node = disk.top
    while node.graph_op is GraphOp.PASS and not node.persistent_bitmaps:
        below = [e for e in node.children.values() if e.role in (Role.FILTERED, Role.FILE)]
        if len(below) != 1:
            break
        node = below[0].node
    return node


def disk_bitmaps(disk: Disk) -> BitmapSet | None:
    """The bitmaps of the disk's format node if they speak of the disk's own offsets:
    only filters (same data, same offsets) lie between; None below luks, say."""
    node = disk.top
    target = bitmap_node(disk)
    while node is not target:
        if not isinstance(node, Filter):
            return None
        node = node.filtered.node
    return node.bitmaps if node.size == disk.size else None


def check_new_name(name: str, where: str) -> None:
    """A name a new bitmap may take: storable in qcow2, and no command file's."""
    check_name(name, where)
    if name in COMMANDS:
        raise ControlError(f"{where}: '{name}' is the name of a control file; "
                           "choose another bitmap name")  # fmt: skip


def _where(node: Node) -> str:
    return f"node '{node.name}'"


def _usable(node: Node, name: str, what: str) -> DirtyBitmap:
    bitmap = node.bitmaps.get(name)
    if bitmap.inconsistent:
        raise ControlError(
            f"{_where(node)}: bitmap '{name}' is inconsistent (it was not stored cleanly: "
            f"a crash?); it cannot be {what}, only removed"
        )
    if bitmap.busy:
        raise ControlError(f"{_where(node)}: bitmap '{name}' is used by a running backup")
    return bitmap


async def _apply(graph: Graph, node: Node, what: str, step: Step, durable: bool) -> None:
    tx = Transaction(graph, graph.disks_of([node]), f"{_where(node)}: {what}")
    await tx.apply([step], durable=node.store_bitmaps if durable else None)


def _one_name(text: str, command: str, node: Node) -> str:
    words = text.split()
    if len(words) != 1:
        raise ControlError(f"{_where(node)}: bitmaps/{command}: write one bitmap name")
    return words[0]


async def add(graph: Graph, node: Node, text: str) -> None:
    words = text.split()
    if not words:
        raise ControlError(f"{_where(node)}: bitmaps/add: write 'NAME [GRANULARITY] "
                           "[persistent] [disabled]'")  # fmt: skip
    name, granularity, persistent, enabled = words[0], DEFAULT_GRANULARITY, False, True
    check_new_name(name, _where(node))
    for word in words[1:]:
        if word == "persistent":
            persistent = True
        elif word == "disabled":
            enabled = False
        else:
            try:
                granularity = parse_size(word)
            except OptionValueError:
                raise ControlError(
                    f"{_where(node)}: bitmaps/add: '{word}' is neither a granularity nor "
                    "'persistent' or 'disabled'"
                ) from None
    check_granularity(granularity, f"{_where(node)}: bitmap '{name}'", node.size)
    if name in node.bitmaps:
        raise ControlError(f"{_where(node)}: a bitmap named '{name}' exists")
    if persistent and not node.persistent_bitmaps:
        raise ControlError(f"{_where(node)} ({node.driver}) cannot keep persistent bitmaps "
                           "(qcow2 can); leave out 'persistent' for one in memory")  # fmt: skip
    if persistent and node.read_only:
        raise ControlError(f"{_where(node)} is read-only: it cannot keep a new bitmap")
    bitmap = DirtyBitmap(name, node.size, granularity, enabled=enabled, persistent=persistent)
    step = Step(lambda: node.bitmaps.add(bitmap), lambda: node.bitmaps.discard(name))
    await _apply(graph, node, f"add bitmap '{name}'", step, persistent)


async def remove(graph: Graph, node: Node, text: str) -> None:
    name = _one_name(text, "remove", node)
    bitmap = node.bitmaps.get(name)
    if bitmap.busy:
        raise ControlError(f"{_where(node)}: bitmap '{name}' is used by a running backup")
    if bitmap.persistent and node.read_only:
        raise ControlError(f"{_where(node)} is read-only: its bitmap '{name}' cannot go")
    step = Step(lambda: node.bitmaps.discard(name), lambda: node.bitmaps.add(bitmap))
    await _apply(graph, node, f"remove bitmap '{name}'", step, bitmap.persistent)


async def clear(graph: Graph, node: Node, text: str) -> None:
    bitmap = _usable(node, _one_name(text, "clear", node), "cleared")
    saved = bitmap.bits.copy()

    def undo() -> None:
        bitmap.bits = saved

    await _apply(graph, node, f"clear bitmap '{bitmap.name}'", Step(bitmap.clear, undo), False)


async def set_enabled(graph: Graph, node: Node, text: str, enabled: bool) -> None:
    command = "enable" if enabled else "disable"
    bitmap = _usable(node, _one_name(text, command, node), f"{command}d")
    before = bitmap.enabled

    def to(value: bool) -> Callable[[], None]:
        def do() -> None:
            bitmap.enabled = value
            node.bitmaps.refresh()

        return do

    await _apply(graph, node, f"{command} bitmap", Step(to(enabled), to(before)), False)


async def merge(graph: Graph, node: Node, text: str) -> None:
    words = text.split()
    if len(words) != 2:
        raise ControlError(f"{_where(node)}: bitmaps/merge: write 'SRC DST'")
    src = _usable(node, words[0], "merged")
    dst = _usable(node, words[1], "merged into")
    saved = dst.bits.copy()

    def undo() -> None:
        dst.bits = saved

    step = Step(lambda: dst.merge(src), undo)
    await _apply(graph, node, f"merge bitmap '{src.name}' into '{dst.name}'", step, False)


def commands(graph: Graph, node: Node) -> dict[str, Callable[[str], Awaitable[None]]]:
    """The writable control files of a `bitmaps/` directory."""

    async def enable(text: str) -> None:
        await set_enabled(graph, node, text, True)

    async def disable(text: str) -> None:
        await set_enabled(graph, node, text, False)

    async def bind(fn: Callable[[Graph, Node, str], Awaitable[None]], text: str) -> None:
        await fn(graph, node, text)

    return {
        "add": lambda text: bind(add, text),
        "remove": lambda text: bind(remove, text),
        "clear": lambda text: bind(clear, text),
        "enable": enable,
        "disable": disable,
        "merge": lambda text: bind(merge, text),
    }


def bitmap_files(bitmap: DirtyBitmap) -> dict[str, Callable[[], str]]:
    """What `bitmaps/NAME/` shows: one value per file."""
    return {
        "count": lambda: f"{bitmap.count()}\n",
        "granularity": lambda: f"{bitmap.granularity}\n",
        "flags": lambda: " ".join(bitmap.flags()) + "\n",
        "extents": lambda: "".join(f"{o} {n}\n" for o, n in bitmap.dirty_ranges()),
    }
