"""Run a mount: open the graph, mount, serve until unmounted or signalled, close.

The order matters for durability: after the FUSE session ends (fusermount3 -u,
SIGTERM or SIGINT), every disk is flushed and every node closed before the
process exits, so what a writer saw written is on the host files.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from fusedisk.fuse.connection import raise_background_limit
from fusedisk.fuse.ops import DiskOperations
from fusedisk.graph.graph import Graph
from fusedisk.spec import Spec

log = logging.getLogger("fusedisk")


def mount_options(spec: Spec, allow_other: bool) -> set[str]:
    options = {
        f"fsname=fusedisk:{spec.path.name}",
        "subtype=fusedisk",
        "default_permissions",
        "auto_unmount",  # a helper unmounts if the daemon dies: no stale mount
    }
    if allow_other:
        options.add("allow_other")
    return options


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def serve(
    spec: Spec,
    mountpoint: Path,
    allow_other: bool = False,
    ready: Callable[[], None] = lambda: None,
) -> None:
    """Open `spec`'s graph and serve it at `mountpoint` until unmounted."""
    graph = await Graph.open(spec)
    try:
        ops = DiskOperations(graph)
        pyfuse3.init(ops, str(mountpoint), mount_options(spec, allow_other))
        try:
            raise_background_limit(mountpoint)
            log.info("mounted %s at %s", spec.path, mountpoint)
            ready()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signals)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
    finally:
        await graph.close()
        log.info("unmounted %s; all disks flushed and closed", mountpoint)
