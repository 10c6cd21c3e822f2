"""Crash safety: a writer that flushes is killed with SIGKILL at some point; every flushed
write is there, `qemu-img check` finds leaks at most, and fusedisk's next open repairs them.

The writer runs the qcow2 driver through a Graph in a subprocess (no FUSE needed):
SIGKILL of the process is the crash being tested, whatever front it serves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.qcow2_helpers import KiB, MiB, assert_clean, check, create, needs_qemu, qemu_io, raw_of

pytestmark = needs_qemu

SLOTS = 48
SLOT = 40 * KiB  # not cluster-aligned: partial clusters, copy from the backing file
SECTOR = 512

WRITER = """
import sys, trio
from pathlib import Path
from fusedisk.spec import parse_spec
from fusedisk.graph.graph import Graph

image, rnd = sys.argv[1], int(sys.argv[2])
SLOTS, SLOT = {slots}, {slot}

async def main():
    text = f'[nodes.d0]\\ndriver = "qcow2"\\nfilename = "{{image}}"\\n[disks.vm0]\\nnode = "d0"\\n'
    graph = await Graph.open(parse_spec(text, Path(image).parent / "spec.toml"))
    disk = graph.disks["vm0"]
    print("open", flush=True)
    i = 0
    while True:
        slot = (i * 7 + rnd) % SLOTS
        value = (rnd * 37 + i) % 251 + 1
        if i % 4 == 3:
            await disk.discard(slot * SLOT, SLOT)  # frees clusters: refcounts drop
        else:
            await disk.write(slot * SLOT, bytes([value]) * SLOT)
        if i % 3 == 2:
            await disk.flush()
            print(i, flush=True)
        i += 1

trio.run(main)
""".format(slots=SLOTS, slot=SLOT)  # noqa: UP032


def value_of(rnd: int, i: int) -> int:
    return (rnd * 37 + i) % 251 + 1


def slot_of(rnd: int, i: int) -> int:
    return (i * 7 + rnd) % SLOTS


def run_and_kill(image: Path, rnd: int, flushes: int) -> int:
    """Start the writer, kill it after `flushes` flushes; the last flushed write index."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(image), str(rnd)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    last = -1
    try:
        first = proc.stdout.readline().decode().strip()
        assert first == "open", first + proc.stderr.read().decode() if proc.stderr else ""
        for _ in range(flushes):
            line = proc.stdout.readline().decode().strip()
            assert line, proc.stderr.read().decode() if proc.stderr else "writer ended"
            last = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    return last


def events(rnd: int, count: int) -> dict[int, list[tuple[int, int]]]:
    """Sector -> [(write index, value)] of what the writer's first `count` requests did."""
    out: dict[int, list[tuple[int, int]]] = {}
    cs = 64 * KiB
    for i in range(count):
        start = slot_of(rnd, i) * SLOT
        if i % 4 == 3:  # discard: whole clusters read as zeroes (there is a backing file)
            a, z, value = -(-start // cs) * cs, (start + SLOT) // cs * cs, 0
        else:
            a, z, value = start, start + SLOT, value_of(rnd, i)
        for s in range(a, z, SECTOR):
            out.setdefault(s, []).append((i, value))
    return out


def verify(before: bytes, after: bytes, rnd: int, last_flushed: int) -> None:
    """Each sector holds the last flushed write to it, a later one, or (none) what it held."""
    # the writer may have gone on past last_flushed: allow what it could have done
    touched = events(rnd, last_flushed + 200)
    for s in range(0, SLOTS * SLOT, SECTOR):
        mine = touched.get(s, [])
        durable = [i for i, _ in mine if i <= last_flushed]
        ok = {v for i, v in mine if not durable or i >= durable[-1]}
        if not durable:
            ok |= set(before[s : s + SECTOR])
        sector = after[s : s + SECTOR]
        assert len(set(sector)) == 1 and sector[0] in ok, (
            f"sector {s}: {set(sector)} not in {ok} (flushed up to {last_flushed})"
        )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("v2", [False, True])
def test_sigkill_keeps_flushed_writes_and_leaks_at_most(tmp_path: Path, v2: bool) -> None:
    base = create(tmp_path / "base.qcow2", SLOTS * SLOT)
    qemu_io(base, f"write -P 0xee 0 {SLOTS * SLOT}")
    image = create(tmp_path / "img.qcow2", None, *(["compat=0.10"] if v2 else []),
                   backing="base.qcow2")  # fmt: skip
    for rnd, flushes in enumerate([2, 9] if v2 else [1, 6, 20]):
        before = raw_of(image)
        last = run_and_kill(image, rnd, flushes)
        rc, report = check(image)
        assert rc in (0, 3), f"qemu-img check after a crash: exit {rc}: {report}"
        assert not report.get("corruptions"), report
        verify(before, raw_of(image), rnd, last)
    if not v2:
        # the image was left dirty: fusedisk's next read-write open repairs the leaks
        import trio

        from tests.qcow2_helpers import opened

        async def reopen() -> None:
            async with opened(image) as (_, disk, node):
                assert node.driver_stats()["repairs"] == 1
                assert disk.size == SLOTS * SLOT

        trio.run(reopen)
        assert_clean(image)
    assert image.stat().st_size < 64 * MiB


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "options", [(), ("cluster_size=512", "refcount_bits=64"), ("snapshot",)], ids=str
)
async def test_every_crash_point_leaves_leaks_at_most(tmp_path: Path, options: tuple) -> None:
    """Copy the image before each write the driver makes to its file (what a SIGKILL at that
    moment would leave) and let `qemu-img check` judge every copy."""
    import shutil

    import trio

    from tests.qcow2_helpers import opened, pattern, qemu_img

    snapshot = "snapshot" in options
    opts = tuple(o for o in options if o != "snapshot")
    image = create(tmp_path / "img.qcow2", 2 * MiB, *opts)
    if snapshot:
        qemu_io(image, "write -P 0x11 0 2m")
        qemu_img("snapshot", "-c", "s1", image)
    copies: list[Path] = []
    async with opened(image) as (_, disk, node):
        leaf = node.children["file"].node
        real_write = leaf.write

        async def write_and_copy(offset: int, data: bytes) -> None:
            copy = tmp_path / f"crash{len(copies):04d}.qcow2"
            shutil.copyfile(image, copy)
            copies.append(copy)
            await real_write(offset, data)

        leaf.write = write_and_copy  # type: ignore[method-assign]
        for i in range(12):
            off = (i * 331 * KiB) % (2 * MiB - 100 * KiB)
            await disk.write(off, pattern(i, 100 * KiB))
            if i % 3 == 2:
                await disk.discard((i * 97 * KiB) % MiB, 200 * KiB)
                await disk.flush()
        async with trio.open_nursery() as nursery:  # requests in flight together
            for i in range(8):
                nursery.start_soon(disk.write, i * 200 * KiB + 7, pattern(100 + i, 3000))
        await disk.flush()
    assert len(copies) > 10
    for copy in copies[:: max(1, len(copies) // 60)]:
        rc, report = check(copy)
        assert rc in (0, 3) and not report.get("corruptions"), f"{copy.name}: {rc} {report}"
    assert_clean(image)
