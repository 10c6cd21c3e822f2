"""The backup job: a disk as it was at one instant, copied into a new qcow2 while
the guest keeps writing; full, or incremental from a dirty bitmap.

    DISK/backup  <-  "DEST [bitmap=NAME] [incremental] [base=PREV]"
                     (what `fusedisk backup MNT/DISK DEST ...` writes; docs/backup.md)

The instant is kept by copy-before-write (QEMU's copy-before-write filter and
block-copy are the model), chosen over a temporary overlay because it leaves
the guest's graph alone and costs only the first write to each granule:

    setup     under drain, in one transaction: the granules to copy (`todo`:
              all of them, or the bitmap's bits for an incremental) are taken,
              the bitmap is cleared (writes from now on are the next backup's),
              and a hook goes on the disk's root edge
    a write   the hook first copies the old data of the granules it touches
              that are still to copy, then lets the write through
    run       the copy loop (graph/copy.py) copies what is left, chunk by chunk
    prepare   the hook goes, the target is flushed and closed, and the backup
              is recorded (DISK's last backup per bitmap: the next incremental's
              backing file), beside the spec
    abort     (failure or `cancel`) the hook goes, the bitmap gets its old bits
              back (plus what was written since: still a superset of what the
              next incremental needs), the target file is deleted

The copy of a granule holds an exclusive range lock, so a guest write and the
copy loop never copy the same granule twice nor race on its bits.
"""

from __future__ import annotations

import logging
import os
import shlex
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusedisk.graph import backup_record
from fusedisk.graph.bitmap_control import bitmap_node, check_new_name, disk_bitmaps
from fusedisk.graph.bitmaps import DEFAULT_GRANULARITY, DirtyBitmap
from fusedisk.graph.chain import hook, job_edge, temp_name
from fusedisk.graph.copy import copy_chunks, write_data
from fusedisk.graph.edge import Edge, RangeLock
from fusedisk.graph.extents import Status
from fusedisk.graph.jobs import Job, JobError
from fusedisk.graph.node import Node, walk
from fusedisk.graph.registry import overlay_driver
from fusedisk.graph.transaction import Step

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk
    from fusedisk.graph.graph import Graph

log = logging.getLogger("fusedisk")

USAGE = "DEST [bitmap=NAME] [incremental] [base=PREV]"
HELP = (
    "write 'DEST [bitmap=NAME] [incremental] [base=PREV]' to back the disk up into a new\n"
    "qcow2 DEST (an absolute path) as it is at this instant; runs in the background: see job\n"
)


class CopyBeforeWrite:
    """The write hook and the copy step of a backup (see the module doc)."""

    def __init__(self, source: Edge, target: Edge, todo: DirtyBitmap, skip_zeroes: bool) -> None:
        self.source = source
        self.target = target
        self.todo = todo
        #: a full backup's target is empty: ranges that read as zeroes need no write
        self.skip_zeroes = skip_zeroes
        self.lock = RangeLock()
        self.before_write_bytes = 0  # copied by the hook, ahead of a guest write
        #: where the job shows it (its `detail`)
        self.progress: Any = None

    async def enter(self, offset: int, length: int) -> Any:
        if self.todo.is_dirty(offset, length):
            self.before_write_bytes += await self.copy(offset, length)
            self.progress.detail["copied_before_write_bytes"] = self.before_write_bytes
        return None

    def leave(self, token: Any) -> None:
        pass

    async def copy(self, offset: int, length: int) -> int:
        """Copy the granules of the range still to copy; returns the bytes copied."""
        g = self.todo.granularity
        start = offset // g * g
        end = min(-(-(offset + length) // g) * g, self.todo.size)
        token = await self.lock.acquire(start, end)
        copied = 0
        try:
            for run_start, run_length in self.todo.dirty_ranges(start, end - start):
                await self._copy_run(run_start, run_length)
                self.todo.reset(run_start, run_length)
                copied += run_length
        finally:
            self.lock.release(token)
        return copied

    async def _copy_run(self, offset: int, length: int) -> None:
        if self.skip_zeroes:
            extents = await self.source.block_status(offset, length)
            if all(e.status & Status.ZERO for e in extents):
                return
        await write_data(self.target, offset, await self.source.read(offset, length))


class BackupJob(Job):
    kind = "backup"
    background = True

    def __init__(self, graph: Graph, disk: Disk, text: str) -> None:
        super().__init__(graph, disk)
        self.graph = graph
        try:
            words = shlex.split(text)
        except ValueError as e:
            raise JobError(f"disk '{disk.name}': backup: {e} in {text!r}") from None
        if not words:
            raise JobError(f"disk '{disk.name}': backup: write '{USAGE}'")
        self.dest = Path(words[0])
        self.bitmap_name: str | None = None
        self.incremental = False
        self.base: Path | None = None
        for word in words[1:]:
            key, _, value = word.partition("=")
            if key == "bitmap" and value:
                self.bitmap_name = value
            elif word == "incremental":
                self.incremental = True
            elif key == "base" and value:
                self.base = Path(value)
            else:
                raise JobError(f"disk '{disk.name}': backup: unknown word {word!r} (bitmap=NAME, "
                               "incremental, base=PREV)")  # fmt: skip
        self.target = str(self.dest)
        self.cbw: CopyBeforeWrite | None = None
        self.node: Node | None = None

    def claims(self) -> list[Node]:
        return list(walk(self.disk.top))

    def _fail(self, message: str) -> JobError:
        return JobError(f"disk '{self.disk.name}': backup to '{self.dest}': {message}")

    def _bitmap(self) -> DirtyBitmap | None:
        """The bitmap named by the request, checked; None if it does not exist yet."""
        if self.bitmap_name is None:
            if self.incremental:
                raise self._fail("an incremental backup needs bitmap=NAME")
            return None
        bitmaps = disk_bitmaps(self.disk)
        if bitmaps is None:
            raise self._fail(f"the bitmaps of node '{bitmap_node(self.disk).name}' do not "
                             "speak of the disk's offsets (a luks node lies between)")  # fmt: skip
        if self.bitmap_name not in bitmaps:
            if self.incremental:
                raise self._fail(f"there is no bitmap '{self.bitmap_name}'; make a full "
                                 "backup with it first")  # fmt: skip
            check_new_name(self.bitmap_name, f"disk '{self.disk.name}': backup")
            return None
        bitmap = bitmaps.get(self.bitmap_name)
        if bitmap.inconsistent:
            hint = "make a full backup with a new bitmap" if self.incremental else "remove it"
            raise self._fail(f"bitmap '{bitmap.name}' is inconsistent (it was not stored "
                             f"cleanly: a crash?) and cannot be trusted; {hint}")  # fmt: skip
        if bitmap.busy:
            raise self._fail(f"bitmap '{bitmap.name}' is used by another backup")
        return bitmap

    def _base(self) -> str:
        """The incremental target's backing file name (relative to DEST's folder if it can)."""
        base = self.base
        if base is None:
            recorded = backup_record.last(self.graph.spec.path, self.disk.name,
                                          self.bitmap_name or "")  # fmt: skip
            if recorded is None:
                raise self._fail(f"no backup with bitmap '{self.bitmap_name}' is recorded; "
                                 "make a full one first or give base=PREV")  # fmt: skip
            base = Path(recorded)
        if not base.is_absolute():
            base = self.dest.parent / base
        if not base.is_file():
            raise self._fail(f"the previous backup '{base}' does not exist")
        if base.parent == self.dest.parent:
            return base.name
        return str(base)

    async def setup(self) -> None:
        if not self.dest.is_absolute():
            raise self._fail("DEST must be an absolute path")
        if os.path.lexists(self.dest):
            raise self._fail("it exists; a backup never overwrites a file")
        bitmap = self._bitmap()
        base = self._base() if self.incremental else ""
        driver = overlay_driver()
        driver.create_overlay(self.dest, self.disk.size, base, driver.driver if base else "")
        self.txn.undo_later(partial(self.dest.unlink, missing_ok=True))
        options = {"filename": str(self.dest), "backing-files": "any"}
        self.node = await self.graph.add_node(
            temp_name(self.graph, f"{self.disk.name}-backup"), driver.driver, options, {}
        )
        self.txn.undo_later(partial(self.graph.remove_node, self.node))
        target, target_step = job_edge(self.node, "backup")
        granularity = bitmap.granularity if bitmap is not None else DEFAULT_GRANULARITY
        todo = DirtyBitmap("todo", self.disk.size, granularity, enabled=False)
        self.cbw = CopyBeforeWrite(self.disk.root, target, todo, skip_zeroes=not base)
        steps = [target_step, Step(self._start, self._restore), hook(self.disk.root, self.cbw)]
        await self.txn.apply(steps)  # the instant: drained, so no write is half-way
        self.detail = {"bitmap": self.bitmap_name, "incremental": self.incremental,
                       "base": base or None, "copied_before_write_bytes": 0}  # fmt: skip
        self.cbw.progress = self

    async def _start(self) -> None:
        """At the instant: what to copy, and the bitmap cleared (or made) for the next one."""
        assert self.cbw is not None
        todo = self.cbw.todo
        self._saved = None
        self._made = False
        if not self.incremental:
            todo.set(0, todo.size)
        if self.bitmap_name is None:
            return
        bitmaps = disk_bitmaps(self.disk)
        assert bitmaps is not None
        if self.bitmap_name not in bitmaps:
            node = bitmap_node(self.disk)
            persistent = node.persistent_bitmaps and not node.read_only
            bitmaps.add(DirtyBitmap(self.bitmap_name, node.size, persistent=persistent))
            self._made = True
            if persistent:
                await node.store_bitmaps()
        bitmap = bitmaps.get(self.bitmap_name)
        if self.incremental:
            todo.merge(bitmap)
        self._saved = bitmap.bits.copy()
        bitmap.clear()
        bitmap.busy = True

    async def _restore(self) -> None:
        """Undo `_start`: the bitmap as it was, plus what was written since."""
        bitmaps = disk_bitmaps(self.disk)
        if self.bitmap_name is None or bitmaps is None or self.bitmap_name not in bitmaps:
            return
        bitmap = bitmaps.get(self.bitmap_name)
        bitmap.busy = False
        if self._made:
            bitmaps.discard(self.bitmap_name)
            node = bitmap_node(self.disk)
            if bitmap.persistent:
                await node.store_bitmaps()
        elif self._saved is not None:
            bitmap.bits |= self._saved

    async def run(self) -> None:
        assert self.cbw is not None
        todo = self.cbw.todo
        self.total_bytes = todo.count()
        ranges = [(o, o + n) for o, n in todo.dirty_ranges()]
        await copy_chunks(ranges, self._copy, disks=[self.disk], progress=self)

    async def _copy(self, offset: int, length: int) -> None:
        assert self.cbw is not None
        await self.cbw.copy(offset, length)

    async def prepare(self) -> None:
        assert self.cbw is not None and self.node is not None
        cbw, node = self.cbw, self.node
        steps = [Step(partial(self.disk.root.hooks.remove, cbw),
                      partial(self.disk.root.hooks.append, cbw)),
                 Step(self._release_bitmap, None)]  # fmt: skip
        await self.txn.apply(steps, durable=self._record, then=[partial(self._close, node)])
        log.info("disk '%s': backed up to %s (%s bytes copied, %s before guest writes)",
                 self.disk.name, self.dest, self.total_bytes, cbw.before_write_bytes)  # fmt: skip

    def _release_bitmap(self) -> None:
        bitmaps = disk_bitmaps(self.disk)
        if self.bitmap_name is not None and bitmaps is not None and self.bitmap_name in bitmaps:
            bitmaps.get(self.bitmap_name).busy = False

    async def _record(self) -> None:
        assert self.cbw is not None
        await self.cbw.target.flush()
        if self.bitmap_name is not None:
            backup_record.save(self.graph.spec.path, self.disk.name, self.bitmap_name,
                               str(self.dest))  # fmt: skip

    async def _close(self, node: Node) -> None:
        assert self.cbw is not None
        self.cbw.target.detach()
        await self.graph.remove_node(node)


async def start_backup(graph: Graph, disk: Disk, text: str) -> Job:
    return await graph.jobs.start(BackupJob(graph, disk, text))
