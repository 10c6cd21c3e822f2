"""Crash-consistency replay of qcow2 and dedup (tests/crash_replay.py): a recorded
workload is cut after every host sync and at random points between; each crash state
must pass its format's checker and hold every write a flush acknowledged."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from fusedisk.errors import FuseDiskError
from fusedisk.graph.graph import Graph
from fusedisk.spec import parse_spec
from tests.conftest import cli
from tests.crash_replay import (
    SECTOR,
    UNREADABLE,
    GuestOp,
    Recording,
    allowed_values,
    crash_states,
    cut_points,
    install,
    mismatches,
)
from tests.fuzz.targets import DEDUP_SPEC, QCOW2_SPEC
from tests.qcow2_helpers import create, needs_qemu

SIZE = 4 << 20
OPS = int(os.environ.get("FUSEDISK_REPLAY_OPS", "120"))
BETWEEN = int(os.environ.get("FUSEDISK_REPLAY_BETWEEN", "2"))


async def run_workload(spec_path: Path, recording: Recording, seed: int, ops: int) -> None:
    rnd = random.Random(seed)
    graph = await Graph.open(parse_spec(spec_path.read_text(), spec_path))
    disk = graph.disks["vm0"]
    value = 0
    try:
        for _ in range(ops):
            length = rnd.choice([SECTOR, 4096, 3 * 4096 + SECTOR, 65536, 200 * 1024])
            offset = rnd.randrange(0, (SIZE - length) // SECTOR) * SECTOR
            r = rnd.random()
            if r < 0.75:
                value = value % 255 + 1
                recording.guest(GuestOp("write", offset, length, value))
                await disk.write(offset, bytes([value]) * length)
            elif r < 0.88:
                recording.guest(GuestOp("discard", offset, length))
                await disk.discard(offset, length)
            else:
                recording.guest(GuestOp("zero", offset, length))
                await disk.write_zeroes(offset, length, unmap=rnd.random() < 0.5)
            if rnd.random() < 0.15:
                await disk.flush()
                recording.guest(GuestOp("flushed"))
    finally:
        await graph.close()
    recording.guest(GuestOp("flushed"))  # close flushed everything


async def read_disk(spec_path: Path, read_write: bool = False) -> bytes:
    graph = await Graph.open(parse_spec(spec_path.read_text(), spec_path),
                             read_only=not read_write)  # fmt: skip
    try:
        disk = graph.disks["vm0"]
        return await disk.read(0, disk.size)
    finally:
        await graph.close(flush=read_write)


def qemu_img_check(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)


def record_and_replay(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_files: Callable[[Path], list[str]],
    spec_text: str,
    judge: Callable[[Path, str, int, list[set[int]]], bytes],
    seed: int,
    ops: int = OPS,
) -> str:
    """Run the workload on the files `make_files` makes, recording it; then judge every
    crash state (`judge` checks the format and returns the disk's bytes) and check the
    acknowledged writes.  Returns the counts, for the test's output."""
    work, crash = tmp_path / "work", tmp_path / "crash"
    work.mkdir()
    crash.mkdir()
    names = make_files(work)
    for folder in (work, crash):
        (folder / "spec.toml").write_text(spec_text)
    base = {str(work / n): (work / n).read_bytes() for n in names}
    recording = Recording()
    install(recording, monkeypatch)
    trio.run(run_workload, work / "spec.toml", recording, seed, ops)
    monkeypatch.undo()
    points = cut_points(recording, BETWEEN, seed=seed + 1)
    checked = reordered = 0
    for state in crash_states(recording, base, points, crash, seed=seed + 2):
        where = f"crash after {state.cut} host ops{' (reordered)' if state.reordered else ''}"
        allowed = allowed_values(state.guest, state.acked, SIZE // SECTOR)
        data = judge(crash, where, checked, allowed)
        bad = mismatches(data, allowed)
        assert not bad, f"{where} ({state.acked} guest ops acked): {bad[:5]}"
        checked += 1
        reordered += state.reordered
    assert checked >= 100
    return (f"{checked} crash states checked, {reordered} of them reordered "
            f"({recording.host_ops} host operations, {len(points)} cuts)")  # fmt: skip


@needs_qemu
@pytest.mark.timeout(600)
@pytest.mark.parametrize("options", ["", "cluster_size=4096", "extended_l2=on"])
def test_every_crash_state_of_a_qcow2_workload_is_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: str
) -> None:
    def make(work: Path) -> list[str]:
        create(work / "img.qcow2", SIZE, *([options] if options else []))
        return ["img.qcow2"]

    def judge(crash: Path, where: str, i: int, allowed: list[set[int]]) -> bytes:
        image = crash / "img.qcow2"
        result = qemu_img_check(image)
        assert result.returncode in (0, 3), f"{where}: {result.stdout}"
        data = trio.run(read_disk, crash / "spec.toml")
        if i % 10 == 0:  # the next read-write open repairs what the crash left
            assert trio.run(read_disk, crash / "spec.toml", True) == data
            assert qemu_img_check(image).returncode == 0, f"{where}: not repaired"
        return data

    counts = record_and_replay(tmp_path, monkeypatch, make, QCOW2_SPEC, judge, 14)
    print(f"qcow2 {options or 'default'}: {counts}")


async def dedup_check(spec_path: Path) -> tuple[int, list[str], bytes]:
    """What `fusedisk check` reports (exit status, lines), and the disk's bytes."""
    graph = await Graph.open(parse_spec(spec_path.read_text(), spec_path), read_only=True)
    try:
        disk = graph.disks["vm0"]
        report = await graph.nodes["d0"].check()  # type: ignore[attr-defined]
        return report.exit_code, report.lines(), await disk.read(0, disk.size)
    finally:
        await graph.close(flush=False)


@pytest.mark.timeout(600)
def test_every_crash_state_of_a_dedup_workload_is_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def make(work: Path) -> list[str]:
        meta, data = work / "meta", work / "data"
        result = cli("dedup", "create", "--metadata", meta, "--data", data, "--size", SIZE)
        assert result.returncode == 0, result.stderr
        return ["meta", "data"]

    def judge(crash: Path, where: str, i: int, allowed: list[set[int]]) -> bytes:
        status, lines, data = trio.run(dedup_check, crash / "spec.toml")
        assert status in (0, 3), f"{where}: fusedisk check: {lines}"
        return data

    print(f"dedup: {record_and_replay(tmp_path, monkeypatch, make, DEDUP_SPEC, judge, 21)}")


LUKS_QUORUM_SPEC = """
[nodes.q]
driver = "quorum"
vote-threshold = 2
children = [{ driver = "qcow2", filename = "c0.qcow2" },
            { driver = "qcow2", filename = "c1.qcow2" },
            { driver = "qcow2", filename = "c2.qcow2" }]
[nodes.crypt]
driver = "luks"
key-file = "key"
file = "q"
[disks.vm0]
node = "crypt"
"""
LUKS_PAYLOAD = 2 << 20  # where `luks format` puts the payload of a 512-bit key


async def zero_disk(spec_path: Path) -> None:
    graph = await Graph.open(parse_spec(spec_path.read_text(), spec_path))
    try:
        disk = graph.disks["vm0"]
        await disk.write(0, bytes(disk.size))
    finally:
        await graph.close()


async def read_tolerant(spec_path: Path, unsure: set[int]) -> bytes:
    """The disk's bytes; a sector whose crash state may legitimately differ on all three
    children (several unacknowledged writes) may fail the vote: read as b"?"."""
    graph = await Graph.open(parse_spec(spec_path.read_text(), spec_path), read_only=True)
    try:
        disk = graph.disks["vm0"]
        out = bytearray()
        for off in range(0, disk.size, 65536):
            try:
                out += await disk.read(off, 65536)
            except FuseDiskError:
                for s in range(off // SECTOR, (off + 65536) // SECTOR):
                    try:
                        out += await disk.read(s * SECTOR, SECTOR)
                    except FuseDiskError:
                        assert s in unsure, f"sector {s}: no majority, yet it was acknowledged"
                        out += UNREADABLE
        return bytes(out)
    finally:
        await graph.close(flush=False)


@needs_qemu
@pytest.mark.timeout(600)
def test_every_crash_state_of_luks_over_a_qcow2_quorum_is_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def make(work: Path) -> list[str]:
        for i in range(3):
            create(work / f"c{i}.qcow2", SIZE + LUKS_PAYLOAD)
        (work / "key").write_bytes(b"crash test key")
        (work / "spec.toml").write_text(LUKS_QUORUM_SPEC)
        result = cli("luks", "format", "--spec", work / "spec.toml", "--node", "crypt",
                     "--key-file", work / "key", "--pbkdf2-iterations", "1000")  # fmt: skip
        assert result.returncode == 0, result.stderr
        trio.run(zero_disk, work / "spec.toml")  # so the disk starts as zeroes, as the others
        (tmp_path / "crash" / "key").write_bytes(b"crash test key")
        return [f"c{i}.qcow2" for i in range(3)]

    def judge(crash: Path, where: str, i: int, allowed: list[set[int]]) -> bytes:
        for n in range(3):
            result = qemu_img_check(crash / f"c{n}.qcow2")
            assert result.returncode in (0, 3), f"{where}: child {n}: {result.stdout}"
        unsure = {s for s, ok in enumerate(allowed) if len(ok) > 1}
        return trio.run(read_tolerant, crash / "spec.toml", unsure)

    # each open derives the master-key digest (~0.1 s): a shorter workload
    counts = record_and_replay(
        tmp_path, monkeypatch, make, LUKS_QUORUM_SPEC, judge, 31, ops=OPS * 2 // 3
    )
    print(f"luks over a qcow2 quorum: {counts}")
