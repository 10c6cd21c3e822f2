"""`fusedisk job PATH [--wait]`: follow a background job, with progress, rate and ETA.

PATH is a disk's folder of a mount (`/mnt/disks/vm0`: its commit or stream, from
`vm0/job`) or a node's job-like control file (`/mnt/disks/vm0/nodes/q/scrub`,
`.../replace`).  Without --wait it prints the job's state once; with --wait it
follows the job until it ends: a progress bar with rate and ETA on a terminal
(rich), one plain line per interval otherwise.  The exit status is 1 if the job
failed or was cancelled, 0 otherwise.  Reads only the file; it never writes it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fusedisk.errors import FuseDiskError
from fusedisk.service.mounts import fusedisk_mount_of
from fusedisk.service.reader import JobProgress, job_line, read_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "job",
        help="show or follow a disk's commit/stream, or a node's scrub/replace",
        description="Show the job of PATH: a disk's folder in a mount (its commit or "
        "stream) or a node's job control file (a quorum's scrub or replace). With --wait, "
        "follow it to its end (a progress bar on a terminal, plain lines otherwise). "
        "Exit status 1 if the job failed or was cancelled.",
    )
    p.add_argument("path", type=Path, help="MOUNTPOINT/DISK, or MOUNTPOINT/DISK/nodes/NODE/scrub")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.add_argument(
        "-i", "--interval", type=float, default=1.0, help="seconds between updates (default 1)"
    )
    p.set_defaults(func=run)


#: the node control files shaped like a job (a quorum's)
NODE_JOB_FILES = ("scrub", "replace")


def job_file(path: Path) -> Path:
    """The job file PATH names; anything but a disk's folder, its job file or a
    node's job-like file of a live fusedisk mount is refused (service/mounts.py)."""
    mountpoint = fusedisk_mount_of(path)
    parts = Path(os.path.realpath(path)).relative_to(mountpoint).parts
    if len(parts) == 1 and (path / "job").is_file():
        return path / "job"
    if len(parts) == 2 and parts[1] == "job" and path.is_file():
        return path
    if len(parts) == 4 and parts[1] == "nodes" and parts[3] in NODE_JOB_FILES and path.is_file():
        return path
    raise FuseDiskError(
        f"'{path}' is not a disk of the fusedisk mount at '{mountpoint}' (give "
        "MOUNTPOINT/DISK) nor a node's scrub or replace file"
    )


def read(path: Path) -> JobProgress:
    return JobProgress.of(read_json(path), path.name if path.name != "job" else "")


def _follow_plain(path: Path, interval: float) -> JobProgress:
    job = read(path)
    print(job_line(job), flush=True)
    while job.running:
        time.sleep(interval)
        job = read(path)
        print(job_line(job), flush=True)
    return job


def _follow_bar(path: Path, interval: float) -> JobProgress:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    job = read(path)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(f"{job.kind} {job.target}".strip(), total=job.total or None)
        while True:
            bar.update(task, completed=job.done, total=job.total or None)
            if not job.running:
                break
            time.sleep(interval)
            job = read(path)
    print(job_line(job))
    return job


def run(args: argparse.Namespace) -> int:
    path = job_file(args.path)
    interval = max(args.interval, 0.05)
    if not args.wait:
        job = read(path)
        print(job_line(job))
    elif sys.stdout.isatty():
        job = _follow_bar(path, interval)
    else:
        job = _follow_plain(path, interval)
    return 1 if job.failed else 0
