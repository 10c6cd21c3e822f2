"""Running one request on several children of a quorum at once, as cheaply as it can be.

Children that answer without yielding to trio (a file in the page cache:
pread is done inline) are simply called one after another: they block the
event loop anyway, so a nursery would add its cost (tens of µs per request)
and no overlap.  A child seen yielding (a thread, a network wait, a throttle)
switches the node to a nursery; the record is forgotten every PROBE_EVERY
concurrent requests, to look again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from fusedisk.graph.edge import Edge

#: concurrent (nursery) requests after which children are probed again (see `each`)
PROBE_EVERY = 4096


class FanOut:
    """One quorum node's way of running a request on several children (module doc)."""

    def __init__(self) -> None:
        self._yielding: set[str] = set()  # children seen yielding to trio
        self._concurrent_requests = 0
        #: child reads in progress now, and the most ever at once (`stats`: proof of overlap)
        self.reads_in_flight = 0
        self.peak_reads_in_flight = 0

    async def each(self, edges: list[Edge], request: Callable[[Edge], Awaitable[None]]) -> None:
        """Run `request` (which catches its own errors) on every edge, concurrently."""
        if len(edges) > 1 and not self._yielding:
            task = trio.lowlevel.current_task()
            if hasattr(task, "_schedule_points"):  # trio's count of a task's yields
                for edge in edges:
                    before = task._schedule_points
                    await request(edge)
                    if task._schedule_points != before:
                        self._yielding.add(edge.name)
                return
        if len(edges) == 1:
            await request(edges[0])
            return
        self._concurrent_requests += 1
        if self._concurrent_requests % PROBE_EVERY == 0:
            self._yielding.clear()
        async with trio.open_nursery() as nursery:
            for edge in edges:
                nursery.start_soon(request, edge)

    async def read_all(self, edges: list[Edge], offset: int, length: int) -> dict[str, Any]:
        """Every edge's answer (bytes or the exception), read concurrently."""
        results: dict[str, Any] = {}

        async def one(edge: Edge) -> None:
            self.reads_in_flight += 1
            if self.reads_in_flight > self.peak_reads_in_flight:
                self.peak_reads_in_flight = self.reads_in_flight
            try:
                results[edge.name] = await edge.read(offset, length)
            except Exception as e:
                results[edge.name] = e
            finally:
                self.reads_in_flight -= 1

        await self.each(edges, one)
        return results
