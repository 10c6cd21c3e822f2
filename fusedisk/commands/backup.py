"""`fusedisk backup MNT/DISK DEST.qcow2 [--bitmap NAME] [--incremental] [--base PREV]`.

Starts the disk's backup job by writing its `backup` control file (graph/backup.py
does the work inside the daemon), then follows it as `fusedisk job --wait` does.
A refused request prints the daemon's sentence (from the mount's `last-error`).
Exit status 0 when the backup is done, 1 if it was refused, failed or cancelled.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from fusedisk.commands.job import _follow_bar, _follow_plain, job_file, read
from fusedisk.errors import FuseDiskError
from fusedisk.service.reader import job_line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backup",
        help="back a mounted disk up into a new qcow2, at one instant, full or incremental",
        description="Copy MNT/DISK, as it is now, into the new qcow2 DEST while the disk stays "
        "in use (copy-before-write). With --bitmap NAME the bitmap is reset at that instant; "
        "with --incremental only what the bitmap marks is copied, into a qcow2 whose backing "
        "file is the previous backup made with that bitmap (or --base). See docs/backup.md.",
    )
    p.add_argument("disk", type=Path, help="the disk's folder in a mount: MOUNTPOINT/DISK")
    p.add_argument("dest", type=Path, help="the new qcow2 image to write (must not exist)")
    p.add_argument("--bitmap", help="the dirty bitmap that tracks writes between backups")
    p.add_argument("--incremental", action="store_true", help="copy only what the bitmap marks")
    p.add_argument("--base", type=Path, help="the previous backup (default: the recorded one)")
    p.add_argument("--no-wait", action="store_true", help="start it and return")
    p.add_argument("-i", "--interval", type=float, default=1.0, help="seconds between updates")
    p.set_defaults(func=run)


def request(args: argparse.Namespace) -> str:
    words = [str(args.dest.absolute())]
    if args.bitmap:
        words.append(f"bitmap={args.bitmap}")
    if args.incremental:
        words.append("incremental")
    if args.base:
        words.append(f"base={args.base.absolute()}")
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    control = args.disk / "backup"
    if not control.is_file():
        raise FuseDiskError(f"'{args.disk}' is not a disk's folder in a fusedisk mount")
    try:  # one write(2): a buffered file would try a failed write again at close
        fd = os.open(control, os.O_WRONLY)
        try:
            os.write(fd, (request(args) + "\n").encode())
        finally:
            os.close(fd)
    except OSError as e:
        reason = ""
        last = args.disk.parent / "last-error"
        if last.is_file():
            reason = last.read_text().strip().split(" ", 2)[-1]
        print(f"fusedisk backup: {reason or e.strerror}", file=sys.stderr)
        return 1
    path = job_file(args.disk)
    if args.no_wait:
        print(job_line(read(path)))
        return 0
    follow = _follow_bar if sys.stdout.isatty() else _follow_plain
    job = follow(path, max(args.interval, 0.05))
    return 1 if job.failed else 0
