"""`fusedisk serve --nbd ADDR SPEC`: serve a spec's disks over NBD, with no FUSE mount.

For hosts without /dev/fuse, and for storage servers whose disks are used by
other hosts.  It stays in the foreground (a service manager or a shell job
keeps it), and says when it is ready the way a service manager can see: one
line on stdout, and READY=1 to $NOTIFY_SOCKET when systemd started it (the
same sd_notify as `fusedisk mount`, fusedisk/service/notify.py).
SIGTERM, SIGINT or SIGHUP stop it; every disk is flushed and every image
closed before it exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from functools import partial

import trio

from fusedisk.commands.mount import _setup_logging
from fusedisk.export.nbd.address import parse_address
from fusedisk.export.nbd.server import serve_nbd
from fusedisk.export.nbd.tls import server_context
from fusedisk.fuse.serve import tune_malloc
from fusedisk.graph.graph import Graph
from fusedisk.hostio.open_files import raise_open_file_limit
from fusedisk.service.notify import Notifier
from fusedisk.spec import Spec, load_spec

log = logging.getLogger("fusedisk")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a spec's disks over NBD without mounting",
        description="Serve every disk of SPEC over NBD at ADDR (unix:PATH or HOST:PORT), "
        "each under its disk name, until SIGTERM or SIGINT.  Stays in the foreground.",
    )
    p.add_argument("--nbd", metavar="ADDR", required=True, help="unix:PATH or HOST:PORT")
    p.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="require TLS: ca-cert.pem, server-cert.pem, server-key.pem (QEMU's layout)",
    )
    p.add_argument("spec", help="the TOML spec file")
    p.add_argument("--log-file", help="append the log to this file (default: stderr)")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    p.set_defaults(func=run)


async def serve(spec: Spec, address: str, tls_creds: str | None, systemd: Notifier) -> None:
    """Open the graph, serve it until a signal, then flush and close every image."""
    tune_malloc()
    raise_open_file_limit()
    # Signals are caught from before the first image opens until the last one
    # is closed: a second SIGTERM during the final flush must not cut it short.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        graph = await Graph.open(spec)
        try:
            async with trio.open_nursery() as nursery:
                where = await nursery.start(partial(serve_nbd, graph, address, tls_creds=tls_creds))
                print(f"fusedisk: serving {', '.join(graph.disks)} over NBD at {where}",
                      flush=True)  # fmt: skip
                systemd.send("READY=1", f"MAINPID={os.getpid()}", f"STATUS=serving NBD at {where}")
                async for signum in signals:
                    log.info("signal %s: stopping", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
        finally:
            await graph.close()
            log.info("stopped serving %s; all disks flushed and closed", spec.path)


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    parse_address(args.nbd)
    _setup_logging(args, to_stderr=True)
    if args.tls_creds:
        server_context(args.tls_creds)  # refused before any image is opened
    systemd = Notifier.from_environment()  # sd_notify, when a Type=notify unit runs us
    trio.run(serve, spec, args.nbd, args.tls_creds, systemd)
    systemd.stopping()
    return 0
