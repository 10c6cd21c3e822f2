"""Driver `rbd`: a leaf whose bytes live in a Ceph RBD image, reached through librbd.

QEMU's option names (BlockdevOptionsRbd), so a QEMU user's blockdev carries
over; client.py drives librbd's aio calls from trio.  The node contract maps
onto librbd as:

    read / write / discard / write_zeroes / flush    rbd_aio_* calls
    block_status      diff_iterate of the whole image: librbd reports whole
                      4 MiB objects (the image's object size), so a written
                      byte makes its object DATA, and a discarded range may
                      stay DATA (reading as zeroes)
    truncate          rbd_resize

A writable open takes librbd's exclusive lock (client.py): another writer,
fusedisk or QEMU, gets EROFS on its writes while we hold it.  Every failure of a
request is EIO (ENOSPC stays ENOSPC) with librbd's reason in the log; a stopped
OSD makes requests wait unless `rados-options` sets rados_osd_op_timeout.

Snapshots of the image itself are the node's control files (snapshots.py).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import trio

from fusedisk.errors import IOFailure, OpenError
from fusedisk.formats.rbd import snapshots
from fusedisk.formats.rbd.client import RbdClient, RbdError, Target, take_lock
from fusedisk.formats.rbd.create import CREATE_OPTIONS, create_image, image_info
from fusedisk.formats.rbd.librbd import bindings
from fusedisk.formats.rbd.target import target_of
from fusedisk.graph.extents import Extent, Status, merge_extents
from fusedisk.graph.node import Control, GraphOp, Node
from fusedisk.graph.options import Option, option_table

log = logging.getLogger("fusedisk")

T = TypeVar("T")

#: how long opening waits for the cluster (librados' own mount timeout is set to it)
OPEN_TIMEOUT = 10.0
#: one aio request moves at most this much (librbd splits further by object)
MAX_REQUEST = 32 << 20


class RbdNode(Node):
    driver = "rbd"
    summary = "an image in a Ceph RBD pool, through librbd"
    protocol: ClassVar[str | None] = "rbd"
    option_specs = option_table(
        Option("pool", "str", None, "the pool holding the image (required)"),
        Option("namespace", "str", "", "the RADOS namespace inside the pool"),
        Option("image", "str", None, "the image's name (required)"),
        Option("snapshot", "str", None, "open this snapshot of the image, read-only"),
        Option("conf", "path", None, "a ceph.conf to read (default: librados' own search)"),
        Option("user", "str", None, "the cephx user, without 'client.' (default: admin)"),
        Option(
            "auth-client-required", "str", None,
            "cephx, none, or 'cephx;none': the authentication methods to accept",
        ),
        Option("key-file", "path", None, "a file holding the user's cephx secret"),
        Option(
            "server", "list", None,
            'the monitors: a list of tables such as [{host = "127.0.0.1", port = "3300"}]',
        ),
        Option(
            "rados-options", "table", None,
            "librados client options, such as {rados_osd_op_timeout = 5}",
        ),
    )  # fmt: skip
    create_options = CREATE_OPTIONS  # `fusedisk create -f rbd -o ...`
    graph_op = GraphOp.TARGET  # a snapshot overlay goes in above it (a host file beside)

    _client: RbdClient | None = None

    @property
    def where(self) -> str:
        return f"node '{self.name}'"

    # -- opening ---------------------------------------------------------------------

    async def open(self) -> None:
        await super().open()
        self.target: Target = target_of(self.options, self.where)
        if self.target.snapshot:
            self.read_only = True  # a snapshot is never written
        try:
            bindings()
        except ImportError as e:
            raise OpenError(f"{self.where}: the rbd driver needs librbd: {e}") from None
        try:
            self._client = await RbdClient.open(
                self.target, self.read_only, exclusive=True, timeout=OPEN_TIMEOUT
            )
        except RbdError as e:
            raise OpenError(f"{self.where}: {e}") from None
        self.opened_read_only = self.read_only
        try:
            self.size = await self._client.blocking(self._client.image.size)
            stat = await self._client.blocking(self._client.image.stat)
        except BaseException as e:
            await self.close()
            if isinstance(e, RbdError):
                raise OpenError(f"{self.where}: {e}") from None
            raise
        self.object_size = 1 << int(stat["order"])
        self.errors = 0
        self._gate: trio.Event | None = None  # set while a rollback holds requests back
        self._in_flight = 0
        self._idle: trio.Event | None = None
        self.snapshot_text = ""
        try:
            await snapshots.refresh(self)
        except RbdError as e:
            log.warning("%s: cannot list the image's snapshots: %s", self.where, e)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def prepare_read_only(self) -> None:
        """The base of a snapshot: write back librbd's cache and give the exclusive lock
        up, so a later commit's read-write open of the same image can take it."""
        if self.read_only or self.target.snapshot:
            return
        await self.flush()
        image = self.client.image
        if await self.client.blocking(image.is_exclusive_lock_owner):
            await self.client.blocking(image.lock_release)

    async def prepare_writable(self) -> None:
        """Writable again (a snapshot undone): take the exclusive lock back."""
        if self.opened_read_only:
            raise OpenError(f"{self.where}: opened read-only; it cannot become writable")
        try:
            await self.client.blocking(lambda: take_lock(self.client.image, self.target))
        except RbdError as e:
            raise OpenError(f"{self.where}: {e}") from None

    @property
    def client(self) -> RbdClient:
        if self._client is None:
            raise IOFailure(f"{self.where}: the node is closed", errno.EIO)
        return self._client

    # -- requests ----------------------------------------------------------------------

    async def _run(self, what: str, issue: Any) -> Any:
        while self._gate is not None:
            await self._gate.wait()
        self._in_flight += 1
        try:
            return await self.client.aio(issue)
        except RbdError as e:
            self.errors += 1
            reason = os.strerror(e.errno) if not str(e) else str(e)
            log.warning("%s: %s on rbd image '%s' failed: %s", self.where, what,
                        self.target.spec(), reason)  # fmt: skip
            code = errno.ENOSPC if e.errno == errno.ENOSPC else errno.EIO
            raise IOFailure(f"{self.where}: {what} failed: {reason}", code) from None
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._idle is not None:
                self._idle.set()

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        end = offset + length
        return [(o, min(MAX_REQUEST, end - o)) for o in range(offset, end, MAX_REQUEST)]

    async def read(self, offset: int, length: int) -> bytes:
        out = []
        for at, n in self._pieces(offset, length):
            image = self.client.image
            data = await self._run(
                f"read at {at}+{n}",
                lambda cb, i=image, at=at, n=n: i.aio_read(at, n, cb),
            )
            data = bytes(data or b"")
            out.append(data + bytes(n - len(data)) if len(data) < n else data)
        return b"".join(out)

    async def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        for at, n in self._pieces(offset, len(data)):
            whole = n == len(data) and isinstance(data, bytes)
            chunk = data if whole else bytes(view[at - offset : at - offset + n])
            image = self.client.image
            await self._run(
                f"write at {at}+{n}",
                lambda cb, i=image, at=at, c=chunk: i.aio_write(c, at, cb),
            )

    async def flush(self) -> None:
        if self.read_only:
            return
        image = self.client.image
        await self._run("flush", lambda cb: image.aio_flush(cb))

    async def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            return
        image = self.client.image
        await self._run(
            f"discard at {offset}+{length}", lambda cb: image.aio_discard(offset, length, cb)
        )

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        image = self.client.image
        await self._run(
            f"write-zeroes at {offset}+{length}",
            lambda cb: image.aio_write_zeroes(offset, length, cb),
        )

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """From diff_iterate (whole objects); what it does not report is a hole."""
        image = self.client.image
        found: list[tuple[int, int, bool]] = []

        def diff() -> None:
            image.diff_iterate(
                offset, length, None, lambda o, n, exists: found.append((o, n, exists))
            )

        try:
            await self.client.blocking(diff)
        except RbdError as e:
            raise IOFailure(f"{self.where}: block status at {offset}+{length} failed: {e}",
                            errno.EIO) from None  # fmt: skip
        hole = Status.ZERO | Status.ALLOCATED
        out: list[Extent] = []
        pos, end = offset, offset + length
        for start, n, exists in sorted(found):
            first, last = max(start, pos), min(start + n, end)
            if last <= first:
                continue
            if first > pos:
                out.append(Extent(pos, first - pos, hole))
            data = Status.DATA | Status.ALLOCATED
            out.append(Extent(first, last - first, data if exists else hole))
            pos = last
        if pos < end:
            out.append(Extent(pos, end - pos, hole))
        return merge_extents(out)

    async def truncate(self, size: int) -> None:
        try:
            await self.client.blocking(lambda: self.client.image.resize(size))
        except RbdError as e:
            raise IOFailure(f"{self.where}: resize to {size} failed: {e}", errno.EIO) from None
        self.size = size

    # -- drained work (a rollback) -----------------------------------------------------

    async def quiesced(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work()` with no request of this node in flight and new ones held back."""
        if self._gate is not None:
            raise IOFailure(f"{self.where}: another rollback is running", errno.EBUSY)
        self._gate = trio.Event()
        try:
            if self._in_flight:
                self._idle = trio.Event()
                await self._idle.wait()
            return await work()
        finally:
            gate, self._gate, self._idle = self._gate, None, None
            gate.set()

    # -- introspection -----------------------------------------------------------------

    def controls(self) -> dict[str, Control]:
        return snapshots.controls(self)

    def driver_stats(self) -> dict[str, Any]:
        return {
            "image": self.target.spec(),
            "object_size": self.object_size,
            "errors": self.errors,
            "in_flight": self._in_flight,
        }

    def backing_name(self) -> str:
        """QEMU's legacy name of the image (what a snapshot overlay's header names):
        rbd:POOL/[NAMESPACE/]IMAGE[:conf=...][:id=...][:mon_host=...][:option=value]."""
        t = self.target
        pairs = [("conf", t.conf), ("id", t.user), ("mon_host", t.mon_host)]
        pairs += list(t.settings.items())
        ns = f"{_escape(t.namespace)}/" if t.namespace else ""
        head = f"rbd:{_escape(t.pool)}/{ns}{_escape(t.image)}"
        return head + "".join(f":{k}={_escape(v)}" for k, v in pairs if v)

    # -- driver slots: `fusedisk create -f rbd` and `fusedisk info rbd:...` ------------

    @classmethod
    def create(
        cls,
        target: str,
        size: int | None,
        options: dict[str, Any],
        backing: str | None = None,
        backing_format: str | None = None,
    ) -> None:
        create_image(target, size, options, backing, backing_format)

    @classmethod
    def info(cls, target: str) -> dict[str, Any]:
        return image_info(target)


def _escape(text: str) -> str:
    """A value inside QEMU's `rbd:` name: `:` and `\\` escaped with a backslash."""
    return text.replace("\\", "\\\\").replace(":", "\\:")
