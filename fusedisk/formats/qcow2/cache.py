"""A bounded cache of cluster-sized metadata tables (L2 tables, refcount blocks).

Tables are decoded once into numpy arrays of native integers and kept by
their host offset, least recently used first.  A dirty table is never
dropped silently: eviction picks the oldest *clean* table, and the owner
writes dirty tables back in the order crash safety needs (see node.py), so
the cache may grow past its capacity until that write-back.  Concurrent
misses on the same table share one read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

import numpy as np
import trio


class TableCache:
    def __init__(self, capacity: int, load: Callable[[int], Awaitable[np.ndarray]]) -> None:
        self.capacity = max(1, capacity)
        self._load = load
        self._tables: OrderedDict[int, np.ndarray] = OrderedDict()
        self.dirty: set[int] = set()
        self._loading: dict[int, trio.Event] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    def peek(self, offset: int) -> np.ndarray | None:
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
            self.hits += 1
        return table

    async def get(self, offset: int) -> np.ndarray:
        while True:
            table = self.peek(offset)
            if table is not None:
                return table
            pending = self._loading.get(offset)
            if pending is not None:
                await pending.wait()
                continue
            event = trio.Event()
            self._loading[offset] = event
            self.misses += 1
            try:
                table = await self._load(offset)
            finally:
                del self._loading[offset]
                event.set()
            self._insert(offset, table)
            return table

    def put(self, offset: int, table: np.ndarray, dirty: bool = True) -> None:
        """Add a table made in memory (a new or copied table)."""
        self._insert(offset, table)
        if dirty:
            self.dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def drop(self, offset: int) -> None:
        """Forget a table whose cluster was freed."""
        self._tables.pop(offset, None)
        self.dirty.discard(offset)

    def items_dirty(self) -> list[tuple[int, np.ndarray]]:
        return [(off, self._tables[off]) for off in sorted(self.dirty)]

    def mark_clean(self, offsets: list[int]) -> None:
        self.dirty.difference_update(offsets)
        self._shrink()

    def _insert(self, offset: int, table: np.ndarray) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        self._shrink()

    def _shrink(self) -> None:
        if len(self._tables) <= self.capacity:
            return
        for off in list(self._tables):
            if len(self._tables) <= self.capacity:
                break
            if off not in self.dirty:
                del self._tables[off]

    @property
    def dirty_full(self) -> bool:
        """True when dirty tables alone fill the cache: time for an ordered write-back."""
        return len(self.dirty) >= self.capacity
