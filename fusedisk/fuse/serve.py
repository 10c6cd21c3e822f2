"""Run a mount: open the graph, mount, serve until unmounted or signalled, close.

The order matters for durability: after the FUSE session ends (fusermount3 -u,
umount, SIGTERM, SIGINT or SIGHUP), every disk is flushed and every node closed
before the process exits, so what a writer saw written is on the host files.

Three transports serve the same `MountFilesystem`: `uring` speaks the FUSE
protocol over io_uring (kernel 6.14+, when its `enable_uring` parameter is on),
`kernel` on /dev/fuse, both ourselves; `pyfuse3` goes through libfuse.  `auto`
(the default) takes the ring when the kernel offers it, else /dev/fuse, and
logs why.
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
from fusedisk.fuse.kernel.ring import OVER_IO_URING, RingSession, unavailable
from fusedisk.fuse.kernel.session import KernelSession, ProtocolError
from fusedisk.graph.graph import Graph
from fusedisk.hostio.open_files import raise_open_file_limit
from fusedisk.spec import Spec

log = logging.getLogger("fusedisk")

TRANSPORTS = ("auto", "uring", "kernel", "pyfuse3")

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


def _session(fs: MountFilesystem, fd: int, transport: str) -> KernelSession:
    """INIT answered, and the ring armed if `transport` wants it and the kernel agrees."""
    why = unavailable() if transport in ("auto", "uring") else "asked for /dev/fuse"
    session: KernelSession
    if why is None:
        ring = RingSession(fs, fd)
        try:
            ring.prepare()
        except OSError as e:
            why = f"setting up the io_uring failed: {e.strerror}"
        else:
            if not ring.negotiate(OVER_IO_URING):
                ring.close_ring()
                why = "the kernel's INIT did not offer FUSE over io_uring"
            else:
                why = ring.register()
            if why is None:
                log.info("FUSE over io_uring: %d queues of %d entries", ring.queues, ring.depth)
                return ring
            session = ring  # INIT is answered: serve /dev/fuse on this session
    else:
        session = KernelSession(fs, fd)
        session.negotiate()
    if transport == "uring":
        raise ProtocolError(f"--transport uring: {why}")
    if transport == "auto":
        log.info("serving /dev/fuse, not FUSE over io_uring: %s", why)
    return session


async def serve_kernel(
    fs: MountFilesystem,
    mountpoint: Path,
    fsname: str,
    allow_other: bool,
    ready: Callable[[], None],
    on_stop: Callable[[Callable[[], None]], Any],
    transport: str = "auto",
) -> None:
    """Mount through mount(2) or fusermount3 and serve the connection ourselves."""
    kmount = mounting.mount(mountpoint, fsname, "fusedisk", allow_other)
    mountpoint = kmount.mountpoint  # canonical: what mountinfo and the watchdog compare
    device = mounting.mounted_device(mountpoint)
    session: KernelSession | None = None
    try:
        session = _session(fs, kmount.fd, transport)
        ready()

        def stop() -> None:
            assert session is not None
            session.stop()
            kmount.unmount()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(on_stop, stop)
            await session.serve()
            nursery.cancel_scope.cancel()
    finally:
        if device is not None and mounting.mounted_device(mountpoint) == device:
            kmount.unmount()
        if isinstance(session, RingSession):
            session.close_ring()
        kmount.close()


async def serve(
    spec: Spec,
    mountpoint: Path,
    allow_other: bool = False,
    ready: Callable[[], None] = lambda: None,
    transport: str = "auto",
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
            await serve_kernel(fs, mountpoint, fsname, allow_other, mounted, on_stop, transport)
    finally:
        await graph.close()
        log.info("unmounted %s; all disks flushed and closed", mountpoint)
