"""Crash-consistency replay, in the style of dm-log-writes and CrashMonkey.

A recorder logs, in order, every write, discard, zeroing, truncate and sync that
reaches a host file (FileNode: the one place fusedisk's bytes leave the process),
and every guest request with the moment its flush was acknowledged.  A crash
(power loss) after host operation k leaves exactly the first k operations on the
files; the checker rebuilds the files at chosen k — each host sync, and random
points between — and judges each such crash state: the image must satisfy its
format's checker (`qemu-img check`: no corruption, leaks allowed; or fusedisk's
own check), and every guest write acknowledged by a flush before the cut must
read back (later, unacknowledged writes may or may not be there).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fusedisk.formats.file.node import FileNode

SECTOR = 512
#: a sector a reader could not read (a quorum without majority), see mismatches()
UNREADABLE = b"?" * SECTOR


@dataclass
class HostOp:
    path: str
    kind: str  # write, zero, truncate, sync
    offset: int = 0
    data: bytes = b""
    length: int = 0


@dataclass
class GuestOp:
    kind: str  # write (value), zero, discard, flushed
    offset: int = 0
    length: int = 0
    value: int = 0


@dataclass
class Recording:
    """Host and guest operations, interleaved in the order they happened."""

    events: list[HostOp | GuestOp] = field(default_factory=list)

    @property
    def host_ops(self) -> int:
        return sum(isinstance(e, HostOp) for e in self.events)

    def guest(self, op: GuestOp) -> None:
        self.events.append(op)


def install(recording: Recording, monkeypatch: pytest.MonkeyPatch) -> None:
    """Log every change FileNode makes to a host file, after it is made."""
    orig = {n: getattr(FileNode, n) for n in ("write", "flush", "discard", "write_zeroes",
                                              "truncate")}  # fmt: skip

    async def write(node: FileNode, offset: int, data: bytes) -> None:
        await orig["write"](node, offset, data)
        recording.events.append(HostOp(node.path, "write", offset, bytes(data)))

    async def flush(node: FileNode) -> None:
        await orig["flush"](node)
        recording.events.append(HostOp(node.path, "sync"))

    async def discard(node: FileNode, offset: int, length: int) -> None:
        await orig["discard"](node, offset, length)
        recording.events.append(HostOp(node.path, "zero", offset, length=length))

    async def write_zeroes(node: FileNode, offset: int, length: int, unmap: bool) -> None:
        await orig["write_zeroes"](node, offset, length, unmap)
        recording.events.append(HostOp(node.path, "zero", offset, length=length))

    async def truncate(node: FileNode, size: int) -> None:
        await orig["truncate"](node, size)
        recording.events.append(HostOp(node.path, "truncate", length=size))

    for name, fn in (("write", write), ("flush", flush), ("discard", discard),
                     ("write_zeroes", write_zeroes), ("truncate", truncate)):  # fmt: skip
        monkeypatch.setattr(FileNode, name, fn)


def cut_points(recording: Recording, between: int, seed: int) -> list[int]:
    """Crash after k host operations: at every sync, and `between` random points in
    each stretch between two syncs (and at the start and the end)."""
    rnd = random.Random(seed)
    syncs = [i + 1 for i, e in enumerate(e for e in recording.events if isinstance(e, HostOp))
             if e.kind == "sync"]  # fmt: skip
    points = {0, recording.host_ops, *syncs}
    edges = [0, *syncs, recording.host_ops]
    for a, b in itertools.pairwise(edges):
        if b - a > 1:
            points.update(rnd.sample(range(a + 1, b), min(between, b - a - 1)))
    return sorted(points)


def _apply(buf: bytearray, e: HostOp) -> None:
    if e.kind == "write":
        end = e.offset + len(e.data)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[e.offset : end] = e.data
    elif e.kind == "zero":
        end = min(e.offset + e.length, len(buf))
        buf[e.offset : end] = bytes(max(0, end - e.offset))
    elif e.kind == "truncate":
        del buf[e.length :]
        buf.extend(bytes(e.length - len(buf)))


@dataclass
class CrashState:
    cut: int  # host operations before the crash
    reordered: bool  # some unsynced operations were dropped, not only a suffix
    guest: list[GuestOp]  # guest operations issued before the cut
    acked: int  # how many of them a flush acknowledged


def crash_states(
    recording: Recording, base: dict[str, bytes], points: list[int], folder: Path, seed: int
) -> Iterator[CrashState]:
    """For each cut k, write under `folder` (named as the originals) the host files as a
    crash after k operations leaves them: first the prefix (operations reach the disk
    in order, as dm-log-writes replays them), then, where some operations are not yet
    synced, a reordered state (as CrashMonkey): what the last sync of each file made
    durable plus a random subset of what came after it."""
    rnd = random.Random(seed)
    current = {p: bytearray(b) for p, b in base.items()}
    durable = {p: bytearray(b) for p, b in base.items()}
    pending: dict[str, list[HostOp]] = {p: [] for p in base}
    guest: list[GuestOp] = []
    acked = 0
    wanted = iter(points)
    next_point = next(wanted, None)
    done = 0

    def write(files: dict[str, bytearray]) -> None:
        for p, content in files.items():
            (folder / Path(p).name).write_bytes(content)

    def states() -> Iterator[CrashState]:
        write(current)
        yield CrashState(done, False, list(guest), acked)
        if any(pending.values()):
            mixed = {}
            for p, ops in pending.items():
                buf = bytearray(durable[p])
                for e in ops:
                    if rnd.random() < 0.5:
                        _apply(buf, e)
                mixed[p] = buf
            write(mixed)
            yield CrashState(done, True, list(guest), acked)

    for e in recording.events:
        while next_point is not None and next_point == done:
            yield from states()
            next_point = next(wanted, None)
        if isinstance(e, GuestOp):
            if e.kind == "flushed":
                acked = len(guest)
            else:
                guest.append(e)
            continue
        _apply(current[e.path], e)
        if e.kind == "sync":
            durable[e.path] = bytearray(current[e.path])
            pending[e.path] = []
        else:
            pending[e.path].append(e)
        done += 1
    while next_point is not None:
        yield from states()
        next_point = next(wanted, None)


def allowed_values(guest: list[GuestOp], acked: int, sectors: int) -> list[set[int]]:
    """Per sector, the fill bytes a reader may see after the crash: what the acknowledged
    ops left (a discard may leave the old bytes or zeroes), or any later op's."""
    allowed = [{0} for _ in range(sectors)]
    for i, op in enumerate(guest):
        first, stop = op.offset // SECTOR, (op.offset + op.length) // SECTOR
        for s in range(first, stop):
            new = op.value if op.kind == "write" else 0
            if i < acked and op.kind != "discard":
                allowed[s] = {new}
            else:
                allowed[s].add(new)
    return allowed


def mismatches(data: bytes, allowed: list[set[int]]) -> list[str]:
    out = []
    for s, ok in enumerate(allowed):
        sector = data[s * SECTOR : (s + 1) * SECTOR]
        if sector == UNREADABLE and len(ok) > 1:
            continue  # a vote with no majority, possible only where writes were unacked
        if sector != bytes([sector[0]]) * SECTOR or sector[0] not in ok:
            out.append(f"sector {s}: {sector[:8].hex()}... not one of {sorted(ok)}")
    return out
