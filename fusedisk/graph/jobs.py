"""The job engine: every graph operation is a Job run by the graph's one registry.

A job (snapshot, commit, stream, revert, a quorum's scrub and replace, the
truncate of a growable disk) goes through the same life, with QEMU's phase names
(include/qemu/job.h: run, then prepare, then commit or abort):

    claims()    the nodes it touches, taken before anything else happens: an
                operation whose nodes overlap a running job's is refused with
                EBUSY and a sentence naming both (docs/operations.md)
    setup()     checks and set-up, in the request that started it (QEMU does this
                when it creates the job): its errors go to the writer of the
                control file (a bad spare, a name taken)
    run()       the long part (copying), in the background for a background
                job, in a system task that `cancel` stops
    prepare()   the graph switch, which may still fail: one Transaction
                (transaction.py) that applies or rolls back whole
    commit()    after a successful prepare: what cannot fail (nothing by default)
    abort()     after a failure or cancel in any phase: the transaction's rollback

The state (JobState) moves only along JOB_TRANSITIONS, as QEMU's JobSTT
table allows.  Progress (done_bytes / total_bytes), state and error are what
`<disk>/job` shows; `wait` returns when a job ends.  One registry per graph.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import trio

from fusedisk.errors import ControlError, FuseDiskError, describe
from fusedisk.graph.transaction import ChangeLog, Transaction

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk
    from fusedisk.graph.node import Node

log = logging.getLogger("fusedisk")


class JobError(ControlError):
    pass


class JobState(StrEnum):
    """What `<disk>/job` shows as `state`; the values are the documented words."""

    CREATED = "created"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: the moves a job's state may make (QEMU's JobSTT, reduced to fusedisk's states)
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.CREATED: frozenset({JobState.RUNNING}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def _as_sentence(job: Job, error: OSError) -> JobError:
    """A host error of a job as the one sentence the writer's `last-error` shows,
    with the host's errno (ENAMETOOLONG, ENOSPC...) for the writer."""
    failure = JobError(f"disk '{job.disk.name}': {job.kind} failed: {describe(error)}")
    if error.errno:
        failure.errno = error.errno
    return failure


class Busy(ControlError):
    """An operation overlaps a running job's nodes."""

    errno = errno.EBUSY


class JobHost(ChangeLog, Protocol):
    """What jobs need of the graph."""

    def disks_of(self, nodes: list[Node]) -> list[Disk]: ...


class Job:
    """A graph operation; subclasses fill in the phases (see the module doc)."""

    kind: str = ""
    #: run() in the background (commit, stream, scrub, replace) or in the request
    background: ClassVar[bool] = False

    def __init__(self, host: JobHost, disk: Disk, target: str = "") -> None:
        self.host = host
        self.disk = disk
        self.target = target
        #: the node whose control file started it (a quorum for scrub and replace)
        self.owner = ""
        self.state = JobState.CREATED
        self.done_bytes = 0
        self.total_bytes = 0
        self.error = ""
        self.exception: BaseException | None = None
        self.started = time.time()
        self.finished: float | None = None
        self.detail: dict[str, Any] = {}
        self.txn = Transaction(host, [disk], f"disk '{disk.name}': {self.kind}")
        self.scope = trio.CancelScope()
        self.over = trio.Event()
        self.claimed: list[Node] = []

    def claims(self) -> list[Node]:
        """The nodes this job touches (computed from the live graph, no I/O)."""
        raise NotImplementedError

    def move(self, state: JobState) -> None:
        """Change state along JOB_TRANSITIONS only: a wrong move is a bug, said loudly."""
        if state not in JOB_TRANSITIONS[self.state]:
            raise RuntimeError(f"{self.kind}: job state {self.state} cannot become {state}")
        self.state = state

    async def setup(self) -> None:
        """Check and set up; register undos on `self.txn`."""

    async def run(self) -> None:
        """The long part; yields often (cancellation, guest requests)."""

    async def prepare(self) -> None:
        """Switch the graph (one `self.txn.apply` with the record); may fail."""

    async def commit(self) -> None:
        """After a successful prepare; must not fail."""

    async def abort(self) -> None:
        await self.txn.rollback()

    def as_dict(self) -> dict[str, Any]:
        end = self.finished if self.finished is not None else time.time()
        return {
            "kind": self.kind,
            "target": self.target,
            "state": self.state,
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "progress": round(self.done_bytes / self.total_bytes, 4) if self.total_bytes else 1.0,
            "elapsed": round(end - self.started, 3),
            "error": self.error,
            **({"node": self.owner} if self.owner else {}),
            **self.detail,
        }


class Jobs:
    """The registry of one graph: running jobs, their claims, and the last job of each disk."""

    def __init__(self, host: JobHost) -> None:
        self.host = host
        self.running: list[Job] = []
        self.last: dict[str, Job] = {}
        #: the last job of each (owner node, kind): what a quorum's scrub/replace file shows
        self.last_owned: dict[tuple[str, str], Job] = {}

    # -- claims ------------------------------------------------------------------

    def _refuse_overlap(self, kind: str, disk: Disk, nodes: list[Node]) -> None:
        wanted = {id(n): n for n in nodes}
        for job in self.running:
            common = [n for n in job.claimed if id(n) in wanted]
            if common:
                raise Busy(
                    f"disk '{disk.name}': {kind} refused: a {job.kind}"
                    f"{f' of {job.target}' if job.target else ''} is running on node "
                    f"'{common[0].name}'; wait for it (echo wait > {job.disk.name}/job) "
                    "or cancel it"
                )

    @contextmanager
    def claim(self, kind: str, disk: Disk, nodes: list[Node]) -> Iterator[None]:
        """Hold `nodes` for a short operation done inline (truncate)."""
        job = Job(self.host, disk)
        job.kind = kind
        self._refuse_overlap(kind, disk, nodes)
        job.claimed = nodes
        self.running.append(job)
        try:
            yield
        finally:
            self.running.remove(job)

    # -- running -----------------------------------------------------------------

    async def start(self, job: Job) -> Job:
        """Claim, prepare, then run (in the background or now); see the module doc.

        A foreground job's failure is raised here; a background job's is in its state.
        """
        nodes = job.claims()
        self._refuse_overlap(job.kind, job.disk, nodes)
        job.claimed = nodes
        job.move(JobState.RUNNING)
        self.running.append(job)
        self.last[job.disk.name] = job
        if job.owner:
            self.last_owned[(job.owner, job.kind)] = job
        try:
            await job.setup()
        except BaseException as e:
            await self._finish(job, e)
            if isinstance(e, OSError):
                raise _as_sentence(job, e) from e
            raise
        if not job.background:
            await self._run(job)
            if isinstance(job.exception, OSError):
                raise _as_sentence(job, job.exception) from job.exception
            if job.exception is not None:
                raise job.exception
            return job
        trio.lowlevel.spawn_system_task(self._run, job, name=f"{job.kind} {job.disk.name}")
        return job

    async def _run(self, job: Job) -> None:
        error: BaseException | None = None
        try:
            with job.scope:
                await job.run()
                await job.prepare()
            if not job.scope.cancelled_caught:
                await job.commit()
        except BaseException as e:
            error = e
            if not isinstance(e, Exception):
                raise
        finally:
            await self._finish(job, error, cancelled=job.scope.cancelled_caught)

    async def _finish(self, job: Job, error: BaseException | None, cancelled: bool = False) -> None:
        if cancelled or isinstance(error, trio.Cancelled):
            job.move(JobState.CANCELLED)
            job.error = "cancelled"
        elif error is not None:
            job.move(JobState.FAILED)
            job.exception = error
            if isinstance(error, FuseDiskError | OSError):
                job.error = describe(error)  # a refusal or a host error: no traceback
            else:
                job.error = f"{type(error).__name__}: {error}"
                log.error("disk '%s': %s failed", job.disk.name, job.kind, exc_info=error)
        else:
            job.move(JobState.DONE)
        if job.state != JobState.DONE and not job.txn.committed:
            await job.abort()
        job.finished = time.time()
        if job in self.running:
            self.running.remove(job)
        job.over.set()
        if job.state == JobState.FAILED:
            log.error("disk '%s': %s failed: %s", job.disk.name, job.kind, job.error)
        elif job.background:
            log.info("disk '%s': %s of %s %s", job.disk.name, job.kind, job.target, job.state)

    # -- the `job` control file ----------------------------------------------------

    def status(self, disk: Disk) -> str:
        job = self.last.get(disk.name)
        doc = job.as_dict() if job is not None else {"kind": None, "state": "none"}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    def running_on(self, disk: Disk) -> Job | None:
        for job in self.running:
            if job.disk is disk and job.background:
                return job
        return None

    async def control(self, disk: Disk, text: str) -> None:
        """`cancel`: stop the running job; `wait`: return when it ends (error if it failed)."""
        word = text.strip()
        job = self.running_on(disk)
        if word == "cancel":
            if job is None:
                raise JobError(f"disk '{disk.name}': no job is running")
            await self.cancel(job)
        elif word == "wait":
            job = job or self.last.get(disk.name)
            if job is None:
                raise JobError(f"disk '{disk.name}': there is no job to wait for")
            await self.wait(job)
        else:
            raise JobError(f"disk '{disk.name}': job: write 'cancel' or 'wait', not {word!r}")

    @staticmethod
    async def cancel(job: Job) -> None:
        job.scope.cancel()
        await job.over.wait()

    @staticmethod
    async def wait(job: Job) -> None:
        await job.over.wait()
        if job.state != JobState.DONE:
            raise JobError(f"disk '{job.disk.name}': the {job.kind} {job.state}: {job.error}")

    async def aclose(self) -> None:
        """Cancel every running job and wait for each to put its graph back."""
        for job in list(self.running):
            if job.background:
                await self.cancel(job)
