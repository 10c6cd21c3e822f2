"""Driver `qcow2`: QEMU's copy-on-write image format, read and written.

Glue only: the format's engine is Qcow2Image (image.py), which knows nothing of
nodes.  This file opens the files an image's header names (its data file and
its backing chain, within the folders the spec allows), gives the image the
node's edges as host files, forwards the node contract's requests to it, and
offers the graph the capabilities of a snapshot overlay (create_overlay,
prepare_read_only/prepare_writable, drop_backing).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import trio

from fusedisk.errors import CorruptImage, NotSupported, OpenError
from fusedisk.formats.qcow2.create import CREATE_OPTIONS, create_qcow2, create_with_options
from fusedisk.formats.qcow2.describe import describe
from fusedisk.formats.qcow2.image import Qcow2Image
from fusedisk.formats.qcow2.layout import MAGIC
from fusedisk.graph import registry
from fusedisk.graph.driver_slots import PROBE_CERTAIN
from fusedisk.graph.edge import Edge
from fusedisk.graph.extents import Extent
from fusedisk.graph.node import ChildSlot, GraphOp, Node, Role
from fusedisk.graph.options import Option, option_table
from fusedisk.hostio.files import header_file_path

log = logging.getLogger("fusedisk")

#: options of the image's file that files named in its header inherit (QEMU's names)
_INHERITED_CACHE_OPTIONS = ("cache.direct", "cache.no-flush")

_DEFAULT_REFCOUNT_CACHE = 1 << 20
_MAX_CHAIN = 256


class Qcow2Node(Node):
    driver = "qcow2"
    summary = "QEMU's copy-on-write image format (versions 2 and 3)"
    option_specs = option_table(
        Option(
            "l2-cache-size",
            "size",
            None,
            "bytes of L2 tables kept in memory (default: enough to map the whole disk, "
            "at most 32 MiB)",
            minimum=0,
        ),
        Option(
            "refcount-cache-size",
            "size",
            _DEFAULT_REFCOUNT_CACHE,
            "bytes of refcount blocks kept in memory",
            minimum=0,
        ),
        Option(
            "backing-files",
            "str",
            "spec-folders",
            "where backing and data files named in image headers may be: spec-folders (the "
            "spec's folder and the image's) or any",
            choices=("spec-folders", "any"),
        ),
    )
    child_slots = (
        ChildSlot("file", Role.FILE),
        ChildSlot("backing", Role.BACKING, required=False),
        ChildSlot("data-file", Role.DATA, required=False),
    )
    graph_op = GraphOp.TARGET
    accepts_filename = True
    makes_overlays = True
    drops_backing = True
    persistent_bitmaps = True

    image: Qcow2Image
    #: set once open() has read the header and tables (stats before that are empty)
    _opened = False

    @property
    def file(self) -> Edge:
        return self.children["file"]

    @property
    def backing(self) -> Edge | None:
        return self.children.get("backing")

    @property
    def image_path(self) -> str:
        name = self.file.node.options.get("filename")
        return str(name) if name else f"node {self.file.node.name}"

    @property
    def _meta_lock(self) -> trio.Lock:
        """The image's metadata lock (held by allocations; tests take it)."""
        return self.image._meta_lock

    # -- opening ------------------------------------------------------------------

    async def open(self) -> None:
        if "file" not in self.children:
            # opened implicitly (a backing file named in a header): open our own leaf
            filename = self.options.get("filename")
            if not filename:
                raise OpenError(f"node '{self.name}': child 'file' is required")
            leaf = await self.context.open_implicit(
                self, "file", "file",
                {"filename": filename, "read-only": self.read_only,
                 **self.options.get("_cache", {})},
            )  # fmt: skip
            self.add_child("file", Role.FILE, leaf)
        await super().open()
        self.image = Qcow2Image(
            self.name, self.image_path, self.file, lambda: self.backing,
            self.options.get("l2-cache-size"), int(self.options["refcount-cache-size"]),
            self.bitmaps,
        )  # fmt: skip
        await self.image.open(self.read_only)
        self.where = self.image.where
        await self._open_data_file()
        await self._open_backing()
        self.size = self.image.size
        self.request_alignment = 1
        self._opened = True
        if not self.read_only:
            await self.image.start_writing()

    @property
    def _header_folder(self) -> str:
        """The folder that relative names in this image's header resolve against."""
        filename = self.file.node.options.get("filename")
        return str(Path(str(filename)).parent if filename else self.context.base_dir)

    @property
    def _header_roots(self) -> list[str]:
        """The spec's folders: the spec's own and the declared image's (inherited down
        a backing chain opened from headers)."""
        roots = self.options.get("_roots") or {
            os.path.realpath(self.context.base_dir), os.path.realpath(self._header_folder)
        }  # fmt: skip
        return sorted(roots)

    def _header_path(self, name: str, what: str) -> str:
        """Where a file this image's header names is, if the spec lets it be there."""
        anywhere = self.options.get("backing-files") == "any"
        where = f"node '{self.name}': {self.where}: {what}"
        return header_file_path(name, self._header_folder, self._header_roots, anywhere, where)

    def _implicit_options(self) -> dict[str, Any]:
        """What a node opened from this image's header inherits: where its own may point."""
        return {"_roots": self._header_roots, "backing-files": self.options.get("backing-files"),
                "_cache": self._cache_options()}  # fmt: skip

    def _cache_options(self) -> dict[str, Any]:
        """The cache options of this image's own file, which the files its header names
        inherit, as QEMU's backing and data-file children inherit cache.direct and
        cache.no-flush."""
        own = self.file.node.options
        return {k: own[k] for k in _INHERITED_CACHE_OPTIONS if k in own}

    async def _open_data_file(self) -> None:
        h = self.image.h
        if "data-file" in self.children:
            if not h.has_data_file:
                raise OpenError(
                    f"node '{self.name}': option 'data-file': {self.where} has no external "
                    "data file"
                )
            self.image.data = self.children["data-file"]
            return
        if not h.has_data_file:
            return
        if not h.data_file:
            raise OpenError(
                f"node '{self.name}': {self.where} keeps its data in an external file that "
                "the header does not name; give it as option 'data-file'"
            )
        path = self._header_path(h.data_file, "its data file")
        leaf = await self.context.open_implicit(
            self, "data-file", "file",
            {"filename": path, "read-only": self.read_only, **self._cache_options()},
        )  # fmt: skip
        self.image.data = self.add_child("data-file", Role.DATA, leaf)

    async def _open_backing(self) -> None:
        h = self.image.h
        if "backing" in self.children:
            return
        if "backing" in self.options and self.options["backing"] is None:
            return  # `backing = ""` in the spec: QEMU's backing=null
        if not h.backing_file:
            return
        where = f"node '{self.name}': {self.where}: its backing file"
        path = self._header_path(h.backing_file, "its backing file")
        chain = tuple(self.options.get("_chain", ())) + (os.path.realpath(self.image_path),)
        real = os.path.realpath(path)
        if real in chain:
            loop = " -> ".join([*chain[chain.index(real) :], real])
            raise CorruptImage(f"{self.where}: the backing chain loops: {loop}")
        if len(chain) >= _MAX_CHAIN:
            raise CorruptImage(f"{self.where}: the backing chain is deeper than {_MAX_CHAIN}")
        fmt = h.backing_format
        if fmt is None:
            fmt = registry.image_driver(path, None, where).driver
        if fmt == "qcow2":
            node = await self.context.open_implicit(
                self, "backing", "qcow2",
                {"filename": path, "read-only": True, "_chain": chain, **self._implicit_options()},
            )  # fmt: skip
        elif fmt in ("raw", "file"):
            node = await self.context.open_implicit(
                self, "backing", "file",
                {"filename": path, "read-only": True, **self._cache_options()},
            )  # fmt: skip
        else:
            raise NotSupported(
                f"node '{self.name}': {self.where}: backing format '{fmt}' is not supported "
                "(qcow2 and raw are)"
            )
        self.add_child("backing", Role.BACKING, node)

    # -- closing and the graph's capabilities ---------------------------------------

    async def close(self) -> None:
        if not self._opened or not self.image.writing:
            return
        if self.file.node.read_only:
            log.warning(
                "node '%s': %s became read-only while open; it stays marked dirty and is "
                "repaired at its next read-write open",
                self.name,
                self.where,
            )
            return
        await self.prepare_read_only()

    async def prepare_read_only(self) -> None:
        """Write everything back and mark the image clean: it will not be written again.

        For the graph to call before it makes this node read-only at run time
        (the base of an external snapshot), while its file can still be written.
        """
        await self.image.stop_writing()

    async def prepare_writable(self) -> None:
        """The counterpart of `prepare_read_only`: the graph has made this node and its
        file writable again at run time (the base of a commit).  Repairs a dirty image
        and marks a v3 image dirty, as a read-write open does."""
        await self.image.resume_writing()

    # -- image slots (graph/driver_slots.py) ----------------------------------------------

    create_options = CREATE_OPTIONS
    creates_overlays_of_backing = True

    @classmethod
    def probe(cls, head: bytes) -> int:
        return PROBE_CERTAIN if head[:4] == MAGIC else 0

    @classmethod
    def create(
        cls,
        target: str,
        size: int | None,
        options: dict[str, Any],
        backing: str | None = None,
        backing_format: str | None = None,
    ) -> None:
        create_with_options(target, size, options, backing, backing_format)

    @classmethod
    def info(cls, target: str) -> dict[str, Any]:
        return describe(target)

    @classmethod
    def create_overlay(cls, path: Path, size: int, backing: str, backing_format: str) -> None:
        """An empty qcow2 over `backing` (relative to its folder), for a snapshot; with an
        empty `backing`, a standalone one (a full backup's target)."""
        if not backing:
            create_qcow2(path, size)
            return
        create_qcow2(path, size, backing=backing, backing_fmt=backing_format)

    async def store_bitmaps(self) -> None:
        """Persistent bitmaps go to the image at once, marked in use (bitmaps.py)."""
        await self.image.store_bitmaps()

    async def drop_backing(self) -> None:
        """Make the image standalone (the end of a stream); the graph detaches the edge."""
        await self.image.drop_backing()

    # -- requests -----------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        return await self.image.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.image.write(offset, data)

    async def flush(self) -> None:
        if self.read_only:
            return
        await self.image.flush()

    async def discard(self, offset: int, length: int) -> None:
        await self.image.discard(offset, length)

    async def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        await self.image.write_zeroes(offset, length, unmap)

    async def truncate(self, size: int) -> None:
        await self.image.truncate(size)
        self.size = self.image.size

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.image.block_status(offset, length)

    # -- introspection -----------------------------------------------------------------------

    async def check(self) -> Any:
        """`fusedisk check`: refcounts against references, as qemu-img check (check.py)."""
        return await self.image.check()

    def driver_stats(self) -> dict[str, Any]:
        if not self._opened:
            return {}
        return self.image.stats()
