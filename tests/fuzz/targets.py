"""Fuzz targets: the parsers that read untrusted bytes (image headers and tables, the
LUKS header, dedup metadata, the spec), each a function of one input.

A target returns normally when its input is accepted or refused with a FuseDiskError
(a sentence for the user); any other exception, a hang or runaway memory is a bug.
The same functions replay the committed corpus in tests/test_fuzz.py and run under
atheris in tests/fuzz/run.py.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import trio

from fusedisk.errors import FuseDiskError
from fusedisk.filters.luks import luks1_header as lh
from fusedisk.filters.luks import luks1_keyslot
from fusedisk.filters.luks import luks2_checks as lc
from fusedisk.filters.luks import luks2_json as lj
from fusedisk.filters.luks import luks2_volume as l2
from fusedisk.formats.dedup.layout import PAGE, TxnHeader, pick_superblock
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec, spec_from_bytes

_FOLDER = Path(tempfile.mkdtemp(prefix="fusedisk-fuzz-", dir="/dev/shm" if os.path.isdir(
    "/dev/shm") else None))  # fmt: skip
atexit.register(shutil.rmtree, _FOLDER, ignore_errors=True)
MAX_READ = 1 << 20  # guest bytes read from an image that opened


def _write(name: str, data: bytes) -> Path:
    path = _FOLDER / name
    path.write_bytes(data)
    return path


async def _open_and_use(spec_text: str) -> None:
    spec = parse_spec(spec_text, _FOLDER / "spec.toml")
    graph = await Graph.open(spec, read_only=True)
    try:
        for disk in graph.disks.values():
            n = min(disk.size, MAX_READ)
            if n:
                await disk.read(0, n)
                await disk.read(disk.size - 1, 1)
        for node in graph.nodes.values():
            check = getattr(node, "check", None)
            if check is not None:
                (await check()).lines()
    finally:
        await graph.close(flush=False)


def _refusals_only(fn: Callable[[], object]) -> None:
    with contextlib.suppress(FuseDiskError):
        fn()


QCOW2_SPEC = """
[nodes.d0]
driver = "qcow2"
filename = "img.qcow2"
[disks.vm0]
node = "d0"
"""


def qcow2_image(data: bytes) -> None:
    """A whole qcow2 image: header, extensions, tables, L2s, snapshots; opened read-only,
    read, and checked as `fusedisk check` does (backing name `base.raw` exists)."""
    if not (_FOLDER / "base.raw").exists():
        _write("base.raw", bytes(1 << 16))
    _write("img.qcow2", data)
    _refusals_only(lambda: trio.run(_open_and_use, QCOW2_SPEC))


#: the metadata size `fusedisk dedup create --size 1M` makes (the corpus holds its first pages)
DEDUP_METADATA_SIZE = 16822272


async def _open_and_write(spec_text: str) -> None:
    spec = parse_spec(spec_text, _FOLDER / "spec.toml")
    graph = await Graph.open(spec)
    try:
        disk = graph.disks["vm0"]
        for offset, length in ((0, 4096), (disk.size // 2, 70000), (disk.size - 512, 512)):
            offset = max(0, min(offset, disk.size - length))
            if 0 < length <= disk.size:
                await disk.write(offset, b"\xa5" * length)
        await disk.discard(0, min(disk.size, 1 << 20))
        await disk.flush()
    finally:
        await graph.close()


def qcow2_image_written(data: bytes) -> None:
    """The same image opened read-write (a dirty one is repaired first), written at the
    start, middle and end, discarded and flushed: what a hostile image meets in a mount."""
    if not (_FOLDER / "base.raw").exists():
        _write("base.raw", bytes(1 << 16))
    _write("img.qcow2", data)
    _refusals_only(lambda: trio.run(_open_and_write, QCOW2_SPEC))


DEDUP_SPEC = """
[nodes.d0]
driver = "dedup"
metadata = { driver = "file", filename = "meta" }
data = { driver = "file", filename = "data" }
[disks.vm0]
node = "d0"
"""


def dedup_metadata(data: bytes) -> None:
    """Dedup metadata: superblock slots, journal transactions, then a read-only open."""
    slots = [data[i * PAGE : (i + 1) * PAGE].ljust(PAGE, b"\0") for i in range(2)]
    pick_superblock(slots)
    TxnHeader.unpack(data[:PAGE].ljust(PAGE, b"\0"))
    meta = _write("meta", data)
    os.truncate(meta, max(len(data), DEDUP_METADATA_SIZE))  # the seeds' layout, sparse
    if not (_FOLDER / "data").exists():
        with open(_FOLDER / "data", "wb") as f:
            f.truncate(1 << 20)
    _refusals_only(lambda: trio.run(_open_and_use, DEDUP_SPEC))


def luks_header(data: bytes) -> None:
    """A LUKS1 header and, where PBKDF2 is cheap, a key slot tried with a wrong key."""

    def parse() -> None:
        hdr = lh.parse_header(data, len(data) + (1 << 20), "fuzz")
        lh.dump(hdr)
        for i, slot in enumerate(hdr.slots):
            cheap = max(slot.iterations, hdr.mk_digest_iterations) <= 2000
            if slot.enabled and cheap and slot.stripes <= 4000:
                material = bytes(hdr.key_bytes * slot.stripes)
                luks1_keyslot.open_key_slot(hdr, i, b"wrong", material)

    _refusals_only(parse)


def luks2_json(data: bytes) -> None:
    """The LUKS2 JSON metadata of a 16 KiB header: parsed, refusals, layout checks."""

    def parse() -> None:
        try:
            meta = lj.parse_metadata(data, 16 << 10)
            lc.refusals(meta)
            lc.plugin_tokens(meta)
            lc.check_layout(meta, 16 << 10, 32 << 20)
        except lj.MetadataError:
            pass

    _refusals_only(parse)


def _cheap(ks: lj.Keyslot) -> bool:
    k = ks.kdf
    return k.iterations <= 2000 if k.type == "pbkdf2" else k.time * k.memory <= 4096


async def _luks2_load_and_unlock(data: bytes) -> None:
    async def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length].ljust(length, b"\0")

    size = max(len(data), 17 << 20)
    volume = await l2.load(read, size, size, "fuzz")
    volume.info()
    if all(_cheap(k) for k in volume.meta.keyslots.values() if k.type == "luks2"):
        with contextlib.suppress(FuseDiskError):
            await l2.unlock(read, volume, b"wrong", "fuzz")


def luks2_header(data: bytes) -> None:
    """Both LUKS2 binary headers and their JSON (an image's first 32 KiB, the rest
    zeroes): copy selection, checksums, metadata, and unlocking with a wrong key where
    the key derivation is cheap."""
    _refusals_only(lambda: trio.run(_luks2_load_and_unlock, data))


def spec_file(data: bytes) -> None:
    """The spec parser, from the file's bytes (any encoding, any nesting)."""
    _refusals_only(lambda: spec_from_bytes(data, _FOLDER / "fuzz.toml"))


FUSE_SPEC = """
[nodes.d0]
driver = "raw"
filename = "fuse.img"
[disks.vm0]
node = "d0"
"""


class _Unexpected(logging.Handler):
    """Collects what the FUSE layer logs as an unexpected error (an escaped exception)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "unexpected error" in record.getMessage():
            self.seen.append(self.format(record))


async def _serve_requests(data: bytes) -> list[str]:
    from fusedisk.fuse.filesystem import MountFilesystem
    from fusedisk.fuse.kernel import protocol as p
    from fusedisk.fuse.kernel.session import KernelSession

    graph = await Graph.open(parse_spec(FUSE_SPEC, _FOLDER / "spec.toml"))
    sink = os.open(os.devnull, os.O_WRONLY)
    handler = _Unexpected()
    logging.getLogger("fusedisk").addHandler(handler)
    try:
        session = KernelSession(MountFilesystem(graph), sink)
        view = memoryview(session.buffer)
        pos = 0
        while pos + p.IN_HEADER.size <= len(data):  # requests, each led by its length
            length = max(p.IN_HEADER.size, int.from_bytes(data[pos : pos + 4], "little"))
            request = bytearray(data[pos : pos + min(length, 1 << 16)])
            request[0:4] = len(request).to_bytes(4, "little")
            session.buffer[: len(request)] = request
            waiting = session._dispatch(view, len(request))
            if waiting is not None:
                await session.see_through(waiting)
            pos += len(request)
            await trio.lowlevel.checkpoint()
    finally:
        logging.getLogger("fusedisk").removeHandler(handler)
        os.close(sink)
        await graph.close(flush=False)
    return handler.seen


def fuse_requests(data: bytes) -> None:
    """FUSE requests as the kernel sends them (a sequence, each led by its length) to
    the kernel transport's dispatcher, over a raw disk: nothing may escape a handler."""
    if not (_FOLDER / "fuse.img").exists():
        with open(_FOLDER / "fuse.img", "wb") as f:
            f.truncate(1 << 20)
    seen = trio.run(_serve_requests, data)
    if seen:
        raise AssertionError(f"an exception escaped a FUSE handler: {seen[0]}")


class _CommitCounter:
    """Stands in for the io_uring of a RingSession: counts the COMMIT_AND_FETCHes."""

    def __init__(self) -> None:
        self.pending = 0
        self.enters = 0
        self.commits: list[int] = []

    def push_encoded(self, sqe: bytes, patch_at: int = 0, value: int = 0) -> None:
        self.commits.append(value)
        self.pending += 1

    def submit(self, wait: int = 0) -> int:
        done, self.pending = self.pending, 0
        return done


#: the per-opcode struct the kernel puts in op_in (the rest goes to the payload buffer)
_OP_IN_SIZES = {3: 16, 4: 88, 14: 8, 15: 40, 16: 40, 18: 24, 20: 16, 25: 24, 28: 40,
                29: 24, 43: 32, 44: 40, 46: 24}  # fmt: skip


async def _serve_ring_requests(data: bytes) -> list[str]:
    from fusedisk.fuse.filesystem import MountFilesystem
    from fusedisk.fuse.kernel import protocol as p
    from fusedisk.fuse.kernel import ring as r

    graph = await Graph.open(parse_spec(FUSE_SPEC, _FOLDER / "spec.toml"))
    sink = os.open(os.devnull, os.O_WRONLY)
    handler = _Unexpected()
    logging.getLogger("fusedisk").addHandler(handler)
    try:
        session = r.RingSession(MountFilesystem(graph), sink, depth=1)
        session.entries = 1
        session.hview = memoryview(bytearray(r.HEADER_STRIDE))
        session.pview = memoryview(bytearray(r.PAYLOAD))
        session._commit_sqe = [b""]
        ring = _CommitCounter()
        session.ring = ring  # type: ignore[assignment]
        pos = served = 0
        while pos + p.IN_HEADER.size <= len(data):  # requests, each led by its length
            length = max(p.IN_HEADER.size, int.from_bytes(data[pos : pos + 4], "little"))
            request = data[pos : pos + min(length, 1 << 16)]
            pos += len(request)
            head, body = request[: p.IN_HEADER.size], request[p.IN_HEADER.size :]
            opcode, unique = int.from_bytes(head[4:8], "little"), head[8:16]
            split = _OP_IN_SIZES.get(opcode, min(len(body), 128))
            op_in, payload = body[:split], body[split:]
            # the header's last two bytes, when set, claim a payload size (maybe a lie)
            claimed = int.from_bytes(head[38:40], "little")
            size = claimed << 5 if claimed else len(payload)
            commit_id = unique if not head[37] & 1 else bytes(8)
            session.hview[:] = bytes(r.HEADER_STRIDE)
            session.hview[: len(head)] = head
            session.hview[r.OP_IN_AT : r.OP_IN_AT + len(op_in)] = op_in
            session.hview[r.ENT_AT + 8 : r.ENT_AT + 20] = commit_id + size.to_bytes(4, "little")
            session.pview[: len(payload)] = payload
            served += 1
            waiting = session._completed(r.ENTRY_TAG, 0)
            if waiting is not None:
                await session.see_through(waiting)
            await trio.lowlevel.checkpoint()
            if len(ring.commits) != served:
                return [f"request {served} (opcode {opcode}) got {len(ring.commits)} commits"]
    finally:
        logging.getLogger("fusedisk").removeHandler(handler)
        os.close(sink)
        await graph.close(flush=False)
    return handler.seen


def fuse_ring_requests(data: bytes) -> None:
    """The same requests as `fuse`, laid out as FUSE over io_uring delivers them (header,
    per-opcode struct, payload buffer, the entry's commit id and payload size, sometimes
    false): nothing may escape a handler, and every request re-arms its entry once."""
    if not (_FOLDER / "fuse.img").exists():
        with open(_FOLDER / "fuse.img", "wb") as f:
            f.truncate(1 << 20)
    seen = trio.run(_serve_ring_requests, data)
    if seen:
        raise AssertionError(f"the ring transport failed a request: {seen[0]}")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "qcow2": qcow2_image,
    "qcow2-rw": qcow2_image_written,
    "dedup": dedup_metadata,
    "luks": luks_header,
    "luks2-json": luks2_json,
    "luks2-header": luks2_header,
    "spec": spec_file,
    "fuse": fuse_requests,
    "fuse-ring": fuse_ring_requests,
}
