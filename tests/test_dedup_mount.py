"""The dedup format through a real mount: sharing, ext4 with copies, SIGKILL, online check."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fusedisk.cli import main as cli
from tests.conftest import needs, run
from tests.test_dedup_io import BS, pattern_block

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

MiB = 1 << 20

SPEC = """
[nodes.dd]
driver = "dedup"
format = true
size = "{size}"
metadata = {{ driver = "file", filename = "meta.img" }}
data = {{ driver = "file", filename = "data.img" }}

[disks.vm0]
node = "dd"
"""


def dedup_spec(write_spec, tmp_path: Path, size: str) -> Path:
    (tmp_path / "meta.img").touch()
    (tmp_path / "data.img").touch()
    return write_spec(SPEC.format(size=size))


def stats(m) -> dict:
    return json.loads(m.path("vm0", "nodes", "dd", "stats").read_text())


def test_the_same_64_mib_at_four_offsets_is_stored_once(tmp_path, write_spec, mount):
    spec = dedup_spec(write_spec, tmp_path, "320M")
    blob = random.Random(1).randbytes(64 * MiB)
    offsets = [0, 64 * MiB, 160 * MiB + 4096, 256 * MiB]
    m = mount(spec)
    fd = os.open(m.path("vm0.img"), os.O_RDWR)
    try:
        for off in offsets:
            for i in range(0, len(blob), MiB):
                os.pwrite(fd, blob[i : i + MiB], off + i)
        os.fsync(fd)
        for off in offsets:
            assert os.pread(fd, len(blob), off) == blob
    finally:
        os.close(fd)
    s = stats(m)
    assert s["logical_bytes_used"] == 4 * len(blob)
    assert s["physical_bytes_used"] == len(blob)
    assert s["dedup_ratio"] == 4.0
    assert os.path.getsize(tmp_path / "data.img") <= len(blob) + MiB  # not 256 MiB
    m.stop()
    m = mount(spec, name="mnt2")
    with open(m.path("vm0.img"), "rb") as f:
        for off in offsets:
            f.seek(off)
            assert f.read(len(blob)) == blob
    assert stats(m)["dedup_ratio"] == 4.0
    check = m.path("vm0", "nodes", "dd", "check")
    check.write_text("1\n")
    assert json.loads(check.read_text())["status"] == "clean"


@needs("losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount")
def test_ext4_with_many_copies_of_the_same_files(tmp_path, write_spec, mount):
    spec = dedup_spec(write_spec, tmp_path, "256M")
    m = mount(spec)
    src = tmp_path / "src.bin"
    src.write_bytes(random.Random(2).randbytes(8 * MiB))
    loop = run("losetup", "--find", "--show", str(m.path("vm0.img"))).strip()
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    try:
        run("mkfs.ext4", "-q", "-E", "nodiscard", loop)
        run("mount", loop, str(fsdir))
        try:
            for i in range(10):
                run("cp", str(src), str(fsdir / f"copy{i}.bin"))
            run("sync")
            before = stats(m)
        finally:
            run("umount", str(fsdir))
        run("fsck.ext4", "-fn", loop)
        run("mount", loop, str(fsdir))
        try:
            for i in range(10):
                assert (fsdir / f"copy{i}.bin").read_bytes() == src.read_bytes()
        finally:
            run("umount", str(fsdir))
    finally:
        run("losetup", "-d", loop)
    assert before["logical_bytes_used"] >= 80 * MiB
    # ten copies of 8 MiB, stored about once (plus the file system's own metadata)
    assert before["physical_bytes_used"] < before["logical_bytes_used"] / 4
    assert before["physical_bytes_used"] < 24 * MiB


WRITER = f"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
sys.path.insert(0, sys.argv[2])
from tests.test_dedup_io import pattern_block
i = 0
try:
    while True:
        key = i if i % 2 else i % 5
        os.pwrite(fd, pattern_block(key), ((i * 7) % 1024) * {BS})
        if i % 8 == 7:
            os.fsync(fd)
            print(i, flush=True)
        i += 1
except OSError:
    pass
"""


def test_sigkill_during_a_write_storm_keeps_every_fsynced_write(tmp_path, write_spec, mount):
    spec = dedup_spec(write_spec, tmp_path, "4M")
    m = mount(spec)
    root = str(Path(__file__).parent.parent)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(m.path("vm0.img")), root],
        stdout=subprocess.PIPE,
        text=True,
    )
    flushed: list[int] = []
    try:
        assert writer.stdout is not None
        for line in writer.stdout:  # let it run for 100 fsyncs, then pull the plug
            flushed.append(int(line))
            if len(flushed) == 100:
                break
        m.crash()
        out, _ = writer.communicate(timeout=30)
    finally:
        writer.kill()
    flushed += [int(line) for line in out.split()]
    assert len(flushed) >= 100, "the writer made no progress"
    meta, data = str(tmp_path / "meta.img"), str(tmp_path / "data.img")
    assert cli(["dedup", "check", "--metadata", meta, "--data", data]) == 0
    possible: dict[int, set[int]] = {b: {0} for b in range(1024)}
    for i in range(flushed[-1] + 2000):
        block = (i * 7) % 1024
        key = i if i % 2 else i % 5
        if i <= flushed[-1]:
            possible[block] = {key}
        else:
            possible[block].add(key)
    m = mount(spec, name="mnt2")
    with open(m.path("vm0.img"), "rb") as f:
        for b in range(1024):
            got = f.read(BS)
            assert any(got == pattern_block(k) for k in possible[b]), f"block {b}"
    check = m.path("vm0", "nodes", "dd", "check")
    check.write_text("1\n")
    assert json.loads(check.read_text())["status"] == "clean"
