"""Run a mount: open the graph, mount, serve until unmounted or signalled, close.

The order matters for durability: after the FUSE session ends (fusermount3 -u,
umount, SIGTERM, SIGINT or SIGHUP), every disk is flushed and every node closed
before the process exits, so what a writer saw written is on the host files.

Two transports serve the same `MountFilesystem`: `kernel` (the default) speaks
the FUSE protocol on /dev/fuse itself; `pyfuse3` goes through libfuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from fusedisk.export.nbd.server import nbd_front
from fusedisk.fuse.filesystem import MountFilesystem
from fusedisk.fuse.kernel import mounting
from fusedisk.fuse.kernel.session import KernelSession
from fusedisk.graph.graph import Graph
from fusedisk.hostio.open_files import raise_open_file_limit
from fusedisk.spec import Spec

log = logging.getLogger("fusedisk")

TRANSPORTS = ("kernel", "pyfuse3")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_malloc() -> None:
    """Keep large request buffers in the heap instead of mmap'ing each one.

    glibc serves allocations of 128 KiB and more with a fresh mmap and gives
    them back on free, so every 1 MiB request faulted in 256 new pages; on
    these VMs that cost more than the AES of a luks request (180 vs 980 MB/s
    measured) and cut 3-way quorum reads to a sixth.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        log.info("mallopt is not available; large buffers stay mmap'd")


async def stop_on_signals(stop: Callable[[], None]) -> None:
    """Call `stop` at the first SIGTERM, SIGINT or SIGHUP (systemctl stop, Ctrl-C)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %s: unmounting", signal.Signals(signum).name)
            stop()
            return


async def serve_kernel(
    fs: MountFilesystem,
    mountpoint: Path,
    fsname: str,
    allow_other: bool,
    ready: Callable[[], None],
    on_stop: Callable[[Callable[[], None]], Any],
) -> None:
    """Mount through mount(2) or fusermount3 and serve /dev/fuse ourselves."""
    kmount = mounting.mount(mountpoint, fsname, "fusedisk", allow_other)
    mountpoint = kmount.mountpoint  # canonical: what mountinfo and the watchdog compare
    device = mounting.mounted_device(mountpoint)
    try:
        session = KernelSession(fs, kmount.fd)
        session.negotiate()
        ready()

        def stop() -> None:
            session.stop()
            kmount.unmount()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(on_stop, stop)
            await session.serve()
            nursery.cancel_scope.cancel()
    finally:
        if device is not None and mounting.mounted_device(mountpoint) == device:
            kmount.unmount()
        kmount.close()


async def serve(
    spec: Spec,
    mountpoint: Path,
    allow_other: bool = False,
    ready: Callable[[], None] = lambda: None,
    transport: str = "kernel",
    nbd: str | None = None,
) -> None:
    """Open `spec`'s graph and serve it at `mountpoint` until unmounted."""
    tune_malloc()
    raise_open_file_limit()
    # Resolved once, before mounting: mountinfo (the watchdog, the end-of-session
    # unmount, fusectl tuning) shows the path without symlinks or `..`.
    mountpoint = mounting.canonical(mountpoint)
    graph = await Graph.open(spec)
    try:
        on_stop: Callable[[Callable[[], None]], Any] = stop_on_signals
        if nbd:  # the NBD export, a second front on the same disks, runs beside the session
            on_stop = await nbd_front(graph, nbd, stop_on_signals)
        fs = MountFilesystem(graph)
        fsname = f"fusedisk:{spec.path.name}"

        def mounted() -> None:
            log.info("mounted %s at %s (transport %s)", spec.path, mountpoint, transport)
            ready()

        if transport == "pyfuse3":
            from fusedisk.fuse.pyfuse3_transport import serve_pyfuse3

            await serve_pyfuse3(fs, mountpoint, fsname, allow_other, mounted, on_stop)
        else:
            await serve_kernel(fs, mountpoint, fsname, allow_other, mounted, on_stop)
    finally:
        await graph.close()
        log.info("unmounted %s; all disks flushed and closed", mountpoint)
