"""The image's own RBD snapshots, as the control file `snapshots` of an rbd node.

Reading it lists them, one a line: `NAME<TAB>SIZE<TAB>ID`, oldest first.
Writing a line acts:

    create NAME      take a snapshot, with the disks above drained (a consistent point)
    remove NAME      delete one
    rollback NAME    make the image's contents those of the snapshot again, with the
                     disks above drained
    refresh          re-read the list (snapshots taken by other clients)

The list is read from librbd when the node opens and after each change made
here: reading a control file must never block on the cluster.  These are
the cluster's snapshots of one image, unlike the disk's `snapshot` file,
which inserts qcow2 overlays (docs/snapshots.md).  Disk files are opened with
direct I/O (no page cache), so reads after a rollback see the snapshot's data; a
file system mounted on the disk has its own cache and must be unmounted first.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fusedisk.errors import ControlError
from fusedisk.formats.rbd.client import RbdError
from fusedisk.graph.node import Control

if TYPE_CHECKING:
    from fusedisk.formats.rbd.node import RbdNode

log = logging.getLogger("fusedisk")

_NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,128}$")
VERBS = ("create", "remove", "rollback", "refresh")


def _render(snaps: list[dict[str, Any]]) -> str:
    return "".join(f"{s['name']}\t{s['size']}\t{s['id']}\n" for s in snaps)


async def refresh(node: RbdNode) -> None:
    """Re-read the list that reading `snapshots` shows."""
    image = node.client.image
    snaps = await node.client.blocking(lambda: list(image.list_snaps()))
    node.snapshot_text = _render(sorted(snaps, key=lambda s: s["id"]))


async def _drained(node: RbdNode, work: Callable[[], Awaitable[None]]) -> None:
    """Run `work` with every disk above the node drained (requests held, those in
    flight done, everything flushed), and none of the node's own requests in flight
    (a job's, say)."""
    disks_of = getattr(node.context, "disks_of", None)  # the graph
    async with contextlib.AsyncExitStack() as stack:
        for disk in disks_of([node]) if disks_of else []:
            await stack.enter_async_context(disk.drained())
        await node.quiesced(work)


async def _apply(node: RbdNode, verb: str, name: str) -> None:
    image = node.client.image
    if verb == "create":
        await _drained(node, lambda: node.client.blocking(lambda: image.create_snap(name)))
    elif verb == "remove":
        await node.client.blocking(lambda: image.remove_snap(name))
    elif verb == "rollback":
        await _drained(node, lambda: node.client.blocking(lambda: image.rollback_to_snap(name)))
        log.info("node '%s': rolled back to rbd snapshot '%s'", node.name, name)


def controls(node: RbdNode) -> dict[str, Control]:
    async def write(text: str) -> None:
        verb, _, name = text.strip().partition(" ")
        name = name.strip()
        if verb not in VERBS:
            raise ControlError(f"node '{node.name}': snapshots: expected one of "
                               f"{', '.join(VERBS)}, got {verb!r}")  # fmt: skip
        if node.read_only and verb != "refresh":
            raise ControlError(f"node '{node.name}': snapshots: the node is read-only")
        if verb != "refresh" and not _NAME.match(name):
            raise ControlError(f"node '{node.name}': snapshots: {verb}: a snapshot name "
                               "holds letters, digits and _ . + - only")  # fmt: skip
        try:
            await _apply(node, verb, name)
            await refresh(node)
        except RbdError as e:
            err = e.errno if e.errno in (errno.ENOENT, errno.EEXIST, errno.EBUSY) else errno.EIO
            error = ControlError(f"node '{node.name}': snapshots: {verb} {name}: {e}")
            error.errno = err
            raise error from None

    return {
        "snapshots": Control(
            lambda: node.snapshot_text, write,
            "the image's RBD snapshots (NAME SIZE ID); write create|remove|rollback NAME",
        )
    }  # fmt: skip
