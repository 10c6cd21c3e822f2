"""The one copy loop: chunked, range-locked, pausing while the disk drains.

Commit, stream, a quorum's replace and scrub, and copy-on-read all move data
the same way (QEMU's block-copy.c is the model): a list of ranges is cut into
chunks; for each chunk the loop

    enters the disk's gate   like a guest request: a drain (a graph change)
                             waits for the chunk, and the next chunk waits
                             for the drain to end
    locks the range          exclusively, on the lock guest writes to the
                             same bytes take shared (a CopyGate hooked on the
                             edges they pass), so a copy never overwrites
                             newer guest data (a quorum's scrub step takes
                             the node's own write lock itself)
    does the work            `step(offset, length)`: the caller's (copy,
                             check-then-copy, vote-and-repair)
    counts progress          then yields: guest requests and cancellation
                             get in between chunks
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Protocol

import trio

from fusedisk.graph.disk import is_zero
from fusedisk.graph.edge import Edge, RangeLock
from fusedisk.graph.extents import Status

if TYPE_CHECKING:
    from fusedisk.graph.disk import Disk

CHUNK = 1 << 20  # bytes per step (guest requests run in between)
SCAN = 64 << 20  # bytes of block status asked at once

Range = tuple[int, int]  # (start, end)


class CopyGate:
    """A write hook (graph/edge.py) for a copy job: guest writes passing the hooked
    edges take shared locks on their ranges, a copy chunk holds `lock` exclusively
    (copy_chunks(lock=gate.lock)), so no guest write interleaves a chunk."""

    def __init__(self) -> None:
        self.lock = RangeLock()

    async def enter(self, offset: int, length: int) -> Any:
        return await self.lock.acquire(offset, offset + length, exclusive=False)

    def leave(self, token: Any) -> None:
        self.lock.release(token)


class Progress(Protocol):
    done_bytes: int


def merge_ranges(ranges: list[Range]) -> list[Range]:
    """Sorted, with overlapping and touching ranges joined."""
    out: list[Range] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        elif end > start:
            out.append((start, end))
    return out


async def copy_chunks(
    ranges: list[Range],
    step: Callable[[int, int], Awaitable[None]],
    *,
    lock: RangeLock | None = None,
    disks: list[Disk] | None = None,
    progress: Progress | None = None,
    chunk: int = CHUNK,
) -> None:
    """Run `step` over `ranges`, `chunk` bytes at a time (see the module doc)."""
    for start, end in ranges:
        pos = start
        while pos < end:
            n = min(chunk, end - pos)
            async with AsyncExitStack() as stack:
                for disk in disks or []:
                    await stack.enter_async_context(disk.job_request())
                token = await lock.acquire(pos, pos + n) if lock is not None else None
                try:
                    # A cancel (job cancel, shutdown) waits for the chunk in progress: cut
                    # off inside a format's allocation, it would leave clusters leaked.
                    with trio.CancelScope(shield=True):
                        await step(pos, n)
                finally:
                    if lock is not None and token is not None:
                        lock.release(token)
            pos += n
            if progress is not None:
                progress.done_bytes += n
            await trio.lowlevel.checkpoint()


async def write_data(dst: Edge, offset: int, data: bytes | memoryview) -> None:
    """Write `data`, as write-zeroes where it is all zeroes (keeps images sparse)."""
    if is_zero(data):
        await dst.write_zeroes(offset, len(data), False)
    else:
        await dst.write(offset, bytes(data))


def copier(src: Edge, dst: Edge) -> Callable[[int, int], Awaitable[None]]:
    """A copy step: read from `src`, write to `dst`."""

    async def step(offset: int, length: int) -> None:
        await write_data(dst, offset, await src.read(offset, length))

    return step


async def allocated(edge: Edge) -> list[Range]:
    """The ranges a node holds itself (ALLOCATED), not from its backing."""
    out: list[Range] = []
    size = edge.node.size
    for offset in range(0, size, SCAN):
        for ext in await edge.block_status(offset, min(SCAN, size - offset)):
            if ext.status & Status.ALLOCATED:
                out.append((ext.offset, ext.end))
        await trio.lowlevel.checkpoint()
    return merge_ranges(out)
