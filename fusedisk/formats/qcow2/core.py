"""The state a qcow2 image shares among its parts, and the host files it lives on.

`ImageCore` holds what every concern of the engine reads: the host files, the
header and geometry set by opening (opening.py), the claims and metadata lock
of the write path, the set of host clusters that hold metadata (the overlap
check QEMU calls `qcow2_check_metadata_overlap`) and the counters.  The
concerns build on it in one line, each using only those below it:
core -> opening -> flushing -> reading -> writing -> zeroing -> growth ->
image (Qcow2Image, the public face).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import trio

from fusedisk.graph.bitmaps import BitmapSet
from fusedisk.graph.extents import Extent

if TYPE_CHECKING:
    from fusedisk.formats.qcow2.bitmaps import BitmapStore
    from fusedisk.formats.qcow2.layout import Header
    from fusedisk.formats.qcow2.mapping import ClusterMap
    from fusedisk.formats.qcow2.refcount import MetaIO, Refcounts
    from fusedisk.formats.qcow2.snapshots import Snapshot


class HostFile(Protocol):
    """A file the image lives on (a node's edge): image, data or backing file."""

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None: ...

    async def block_status(self, offset: int, length: int) -> list[Extent]: ...


class ImageCore:
    """The shared state of a qcow2 image (see the module doc); Qcow2Image is the whole."""

    #: set by open(), with the geometry (cs, cluster_bits) and tables (map, refs)
    h: Header
    cs: int
    cluster_bits: int
    io: MetaIO
    map: ClusterMap
    refs: Refcounts
    #: the persistent bitmaps' reader and writer (bitmaps.py), set by Qcow2Image
    bitmap_store: BitmapStore

    def __init__(
        self,
        name: str,
        path: str,
        file: HostFile,
        backing: Callable[[], HostFile | None],
        l2_cache_size: int | None,
        refcount_cache_size: int,
        bitmaps: BitmapSet | None = None,
    ) -> None:
        """See Qcow2Image, which adds its bitmap store."""
        self.name = name
        self.path = path
        self.file = file
        #: where guest data lives: `file` unless the header names an external data file
        self.data = file
        self._backing = backing
        self._l2_cache_size = l2_cache_size
        self._refcount_cache_size = refcount_cache_size
        self.where = f"node '{name}': qcow2 image '{path}'"
        self._meta_lock = trio.Lock()
        self._claims: dict[int, trio.Event] = {}
        self._io_in_flight = 0
        self._decompressed: tuple[int, bytes] | None = None
        self.counters = {"cow_clusters": 0, "allocating_writes": 0, "metadata_writebacks": 0,
                         "compressed_reads": 0, "repairs": 0}  # fmt: skip
        self.size = 0
        #: set while the image is open read-write and marked so (dirty, for v3)
        self.writing = False
        self.snapshots: list[Snapshot] = []
        self.snapshot_table_length = 0
        self._meta: set[int] = set()
        #: clusters whose refcount reached 0, to hand back to the host file after a flush
        self._freed: list[int] = []
        self._meta_array: np.ndarray | None = None
        self.bitmaps = bitmaps if bitmaps is not None else BitmapSet(name)

    # -- the host clusters that hold metadata -------------------------------------

    def _metadata_array(self) -> np.ndarray:
        if self._meta_array is None:
            self._meta_array = np.fromiter(self._meta, dtype=np.uint64, count=len(self._meta))
        return self._meta_array

    def _meta_add(self, cluster: int) -> None:
        self._meta.add(cluster)
        self._meta_array = None

    def _cluster_freed(self, cluster: int) -> None:
        self._freed.append(cluster)
        if cluster in self._meta:
            self._meta.discard(cluster)
            self._meta_array = None
            self.map.cache.drop(cluster << self.cluster_bits)
            self.refs.cache.drop(cluster << self.cluster_bits)

    @staticmethod
    async def _read_padded(file: HostFile | None, offset: int, length: int) -> bytes:
        """Bytes of `file`, and zeroes past its end (all zeroes without a file)."""
        avail = 0 if file is None else file.size - offset
        if file is None or avail <= 0:
            return bytes(length)
        if avail >= length:
            return await file.read(offset, length)
        return await file.read(offset, avail) + bytes(length - avail)
