"""One open RBD image, driven from trio through librbd's aio calls.

librbd runs requests on its own threads and calls each request's completion
callback there, one callback at a time: a slow callback delays every other
completion.  So a callback does the least it can: it appends (request, return
value, data) to a list under a lock and, only if the list was empty, asks trio
to run `_deliver` once (`TrioToken.run_sync_soon`, a write to trio's wake-up
socket).  `_deliver` runs on the event loop and wakes every task whose request
finished by then, so under load one wake-up serves many completions.  There is
no thread per request and no blocking call on the event loop.

Connecting, opening and closing block in librados; they run on a worker thread
(`trio.to_thread`), bounded by librados' client_mount_timeout /
rados_mon_op_timeout and by our own deadline.  Block status (diff_iterate),
resize and snapshot calls block too: they go to a small WorkerPool
(hostio/workers.py), which queues a call without a thread hand-off each.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import trio

from fusedisk.formats.rbd.librbd import bindings
from fusedisk.hostio.workers import WorkerPool

log = logging.getLogger("fusedisk")

T = TypeVar("T")

#: librados' own bounds for a session, unless rados-options says otherwise
DEFAULT_TIMEOUTS = {"client_mount_timeout": "10", "rados_mon_op_timeout": "10"}


class RbdError(Exception):
    """A librados/librbd call failed; `errno` is its error, the text says which call."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class Target:
    """Where an image is and how to reach it (QEMU's BlockdevOptionsRbd, resolved)."""

    pool: str
    image: str
    namespace: str = ""
    snapshot: str | None = None
    conf: str | None = None
    user: str | None = None
    key: str | None = None  # the cephx secret, read from key-file
    mon_host: str | None = None  # from `server`
    auth_client_required: str | None = None
    settings: dict[str, str] = field(default_factory=dict)

    def spec(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        snap = f"@{self.snapshot}" if self.snapshot else ""
        return f"{self.pool}/{ns}{self.image}{snap}"


def _errno_of(e: BaseException) -> int:
    value = getattr(e, "errno", None)
    return abs(int(value)) if isinstance(value, int) and value else errno.EIO


def connect_cluster(target: Target, timeout: float) -> Any:
    """A connected librados handle (blocking: run it on a worker thread)."""
    rados, _ = bindings()
    try:
        cluster = rados.Rados(rados_id=target.user or None, conffile=target.conf or None)
    except rados.Error as e:
        raise RbdError(_errno_of(e), f"cannot read the Ceph configuration: {e}") from None
    try:
        settings = {**DEFAULT_TIMEOUTS, **target.settings}
        if target.mon_host:
            settings["mon_host"] = target.mon_host
        if target.key is not None:
            settings["key"] = target.key
        if target.auth_client_required:
            settings["auth_client_required"] = target.auth_client_required
        for name, value in settings.items():
            try:
                cluster.conf_set(name, value)
            except rados.Error as e:
                raise RbdError(_errno_of(e), f"client option {name}={value!r}: {e}") from None
        try:
            cluster.connect(timeout=max(1, int(timeout)))
        except rados.Error as e:
            mon = cluster.conf_get("mon_host") or "(none configured)"
            raise RbdError(
                _errno_of(e), f"cannot connect to the Ceph cluster (monitors {mon}): {e}"
            ) from None
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def open_image(target: Target, read_only: bool, exclusive: bool, timeout: float) -> Any:
    """(cluster, ioctx, image) for `target` (blocking: run it on a worker thread).

    A writable open takes librbd's exclusive lock, as QEMU's users expect: while
    we hold it, another client's writes fail with EROFS instead of taking turns.
    """
    rados, rbd = bindings()
    cluster = connect_cluster(target, timeout)
    ioctx = image = None
    try:
        try:
            ioctx = cluster.open_ioctx(target.pool)
        except rados.Error as e:
            raise RbdError(_errno_of(e), f"cannot open pool '{target.pool}': {e}") from None
        if target.namespace:
            ioctx.set_namespace(target.namespace)
        try:
            image = rbd.Image(ioctx, target.image, snapshot=target.snapshot, read_only=read_only)
        except rbd.ImageNotFound:
            raise RbdError(errno.ENOENT, f"no image '{target.spec()}'") from None
        except rbd.Error as e:
            raise RbdError(_errno_of(e), f"cannot open image '{target.spec()}': {e}") from None
        if exclusive and not read_only:
            take_lock(image, target)
    except BaseException:
        if image is not None:
            image.close()
        if ioctx is not None:
            ioctx.close()
        cluster.shutdown()
        raise
    return cluster, ioctx, image


def take_lock(image: Any, target: Target) -> None:
    """librbd's exclusive lock, kept until released (blocking); RbdError EBUSY if
    another client holds it."""
    _, rbd = bindings()
    if image.is_exclusive_lock_owner():
        return
    try:
        image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
    except rbd.ReadOnlyImage:
        raise RbdError(
            errno.EBUSY,
            f"image '{target.spec()}' is in use: another client holds its exclusive lock",
        ) from None
    except rbd.InvalidArgument:
        log.warning("rbd image '%s' lacks the exclusive-lock feature: nothing stops a "
                    "second writer", target.spec())  # fmt: skip
    except rbd.Error as e:
        raise RbdError(_errno_of(e), f"cannot lock image '{target.spec()}': {e}") from None


class _Pending:
    __slots__ = ("data", "done", "ret")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ret = 0
        self.data: Any = None


class _Completions:
    """Hands completions from librbd's threads to trio, many per wake-up."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._lock = threading.Lock()
        self._arrived: list[tuple[_Pending, int, Any]] = []

    def arrived(self, pending: _Pending, ret: int, data: Any) -> None:
        """On a librbd thread: queue it, and wake trio if nobody did yet."""
        with self._lock:
            self._arrived.append((pending, ret, data))
            if len(self._arrived) > 1:
                return
        with contextlib.suppress(trio.RunFinishedError):  # the loop is gone: nobody waits
            self._token.run_sync_soon(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            batch, self._arrived = self._arrived, []
        for pending, ret, data in batch:
            pending.ret = ret
            pending.data = data
            pending.done.set()


class RbdClient:
    """An open image: `aio` runs one aio call, `blocking` one call on a worker thread."""

    def __init__(self, target: Target, cluster: Any, ioctx: Any, image: Any) -> None:
        self.target = target
        self.cluster = cluster
        self.ioctx = ioctx
        self.image = image
        self._completions = _Completions(trio.lowlevel.current_trio_token())
        # block status, resize, snapshots: queued to a worker, no thread hand-off each
        self._pool = WorkerPool(f"rbd:{target.spec()}", max_workers=2)
        self.closed = False

    @classmethod
    async def open(
        cls, target: Target, read_only: bool, exclusive: bool, timeout: float
    ) -> RbdClient:
        """Connect and open off the event loop; RbdError (ETIMEDOUT after `timeout`)."""
        call = partial(open_image, target, read_only, exclusive, timeout)
        with trio.move_on_after(timeout * 2 + 5):
            # a call stuck past librados' own bounds is left behind, not waited for
            cluster, ioctx, image = await trio.to_thread.run_sync(call, abandon_on_cancel=True)
            return cls(target, cluster, ioctx, image)
        raise RbdError(errno.ETIMEDOUT, f"no answer from the Ceph cluster within {timeout:g} s")

    async def aio(self, issue: Callable[[Callable[..., None]], Any]) -> Any:
        """Run one aio call: `issue(oncomplete)` starts it.  Returns the data of a
        read (else None); raises RbdError with librbd's errno.  A cancelled caller
        leaves the request in flight; its completion is dropped when it comes."""
        if self.closed:
            raise RbdError(errno.EIO, "the image is closed")
        pending = _Pending()
        arrived = self._completions.arrived

        def oncomplete(completion: Any, data: Any = None) -> None:  # librbd's thread
            arrived(pending, completion.get_return_value(), data)

        _, rbd = bindings()
        try:
            issue(oncomplete)
        except rbd.Error as e:
            raise RbdError(_errno_of(e), str(e)) from None
        await pending.done.wait()
        if pending.ret < 0:
            raise RbdError(-pending.ret, "")
        return pending.data

    async def blocking(self, call: Callable[[], T]) -> T:
        """A blocking librbd call on a worker thread; librbd errors become RbdError."""
        _, rbd = bindings()

        def run() -> T:
            try:
                return call()
            except rbd.Error as e:
                raise RbdError(_errno_of(e), str(e)) from None

        return await self._pool.run(run)

    async def close(self, timeout: float = 10.0) -> None:
        """Close the image (librbd flushes its cache) and the session, off the loop."""
        if self.closed:
            return
        self.closed = True
        self._pool.close()
        image, ioctx, cluster = self.image, self.ioctx, self.cluster

        def close_all() -> None:
            for step in (image.close, ioctx.close, cluster.shutdown):
                try:
                    step()
                except Exception as e:
                    log.warning("rbd image '%s': closing: %s", self.target.spec(), e)

        with trio.move_on_after(timeout):
            await trio.to_thread.run_sync(close_all, abandon_on_cancel=True)
            return
        log.warning("rbd image '%s': closing took over %g s; left behind",
                    self.target.spec(), timeout)  # fmt: skip
