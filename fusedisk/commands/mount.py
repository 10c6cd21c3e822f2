"""`fusedisk mount SPEC MOUNTPOINT`: serve a spec's disks, in the background by default.

Like other FUSE filesystems, the command returns once the mount is ready and
the daemon keeps serving.  The spec is checked before forking and the images
are opened by the daemon before it mounts; either failure reaches the
terminal with a non-zero exit, and nothing is mounted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import logging.handlers
import os
import sys
from functools import partial
from pathlib import Path

import trio

from fusedisk.errors import FuseDiskError, SpecError, describe
from fusedisk.export.nbd.address import parse_address
from fusedisk.fuse.serve import TRANSPORTS, serve
from fusedisk.service.mounts import refuse_dead
from fusedisk.service.notify import Notifier
from fusedisk.spec import Spec, load_spec

log = logging.getLogger("fusedisk")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mount",
        help="mount a spec's disks",
        description="Mount the disks of SPEC at MOUNTPOINT: each disk appears as "
        "MOUNTPOINT/<disk>.img, with its tree of nodes under MOUNTPOINT/<disk>/. "
        "Unmount with `fusermount3 -u MOUNTPOINT` (or SIGTERM to the daemon).",
    )
    p.add_argument("spec", help="the TOML spec file")
    p.add_argument("mountpoint", help="an existing, empty directory")
    p.add_argument("-f", "--foreground", action="store_true", help="stay attached, log to stderr")
    p.add_argument("--allow-other", action="store_true", help="let users other than the mounter in")
    p.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="kernel",
        help="kernel: fusedisk speaks the FUSE protocol itself (default; discard, holes); "
        "pyfuse3: through libfuse",
    )
    p.add_argument(
        "--read-only", action="store_true", help="every disk read-only, every image opened so"
    )
    p.add_argument(
        "--nbd", metavar="ADDR", help="also serve every disk over NBD at unix:PATH or HOST:PORT"
    )
    p.add_argument("--log-file", help="append the log to this file (default: syslog)")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    p.set_defaults(func=run)


def _setup_logging(args: argparse.Namespace, to_stderr: bool) -> None:
    handler: logging.Handler
    if args.log_file:
        handler = logging.FileHandler(args.log_file)
    elif to_stderr:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("fusedisk[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    if not isinstance(handler, logging.handlers.SysLogHandler):
        handler.setFormatter(logging.Formatter("%(asctime)s fusedisk %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.debug else logging.INFO)


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _read_only(spec: Spec) -> Spec:
    """`--read-only` (`-o ro` in fstab): every disk refuses writes, every node opens read-only."""
    return dataclasses.replace(
        spec,
        disks={n: dataclasses.replace(d, read_only=True) for n, d in spec.disks.items()},
        nodes={
            n: dataclasses.replace(node, options={**node.options, "read-only": True})
            for n, node in spec.nodes.items()
        },
    )


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.read_only:
        spec = _read_only(spec)
    mountpoint = Path(args.mountpoint)
    refuse_dead(mountpoint)  # a dead mount there: say so and how to clear it
    try:
        is_dir = mountpoint.is_dir()
    except OSError as e:
        raise SpecError(f"mount point '{mountpoint}': {describe(e)}") from None
    if not is_dir:
        raise SpecError(f"mount point '{mountpoint}' is not a directory")
    if args.nbd:
        parse_address(args.nbd)  # a bad address is refused before anything is mounted
    systemd = Notifier.from_environment()  # sd_notify, when a Type=notify unit runs us

    if args.foreground:
        _setup_logging(args, to_stderr=True)
        on_ready = partial(systemd.ready, mountpoint)
        trio.run(serve, spec, mountpoint, args.allow_other, on_ready, args.transport, args.nbd)
        systemd.stopping()
        return 0

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as status:
            message = status.read().decode(errors="replace")
        if message == "ok":
            return 0
        print(message.strip() or "fusedisk: the daemon exited before mounting", file=sys.stderr)
        os.waitpid(pid, 0)
        return 1

    # The daemon: its own session, reports readiness (or the error) through the pipe.
    os.close(read_end)
    os.setsid()
    _setup_logging(args, to_stderr=False)

    def ready() -> None:
        os.write(write_end, b"ok")
        os.close(write_end)
        _detach_stdio()
        systemd.ready(mountpoint)

    try:
        trio.run(serve, spec, mountpoint, args.allow_other, ready, args.transport, args.nbd)
    except FuseDiskError as e:
        log.error("%s", e)
        _report(write_end, f"fusedisk: {e}")
        os._exit(1)
    except BaseException as e:
        log.exception("the daemon failed")
        _report(write_end, f"fusedisk: {e}")
        os._exit(1)
    systemd.stopping()
    os._exit(0)


def _report(fd: int, message: str) -> None:
    try:
        os.write(fd, message.encode())
        os.close(fd)
    except OSError:
        pass  # already reported ready; the log has it
