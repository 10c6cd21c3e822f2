"""The README's main job: `fusedisk demo DIR` creates images, mounts, and explains."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.mount, pytest.mark.timeout(60)]


def test_demo_mounts_usable_disks_and_says_how_to_unmount(tmp_path):
    folder = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "fusedisk", "demo", str(folder)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    mnt = folder / "mnt"
    try:
        assert result.returncode == 0, result.stderr
        assert f"fusermount3 -u {mnt}" in result.stdout
        assert sorted(os.listdir(mnt)) == [
            "last-error", "metrics", "scratch", "scratch.img", "throttle-groups", "vm0", "vm0.img"
        ]  # fmt: skip
        assert os.readlink(mnt / "vm0" / "nodes" / "crypt" / "children" / "file") == "../../q"
        with open(mnt / "vm0.img", "r+b") as f:
            f.write(b"hello, encrypted quorum")
            f.flush()
            os.fsync(f.fileno())
        with open(mnt / "vm0.img", "rb") as f:
            assert f.read(23) == b"hello, encrypted quorum"
        with open(mnt / "scratch.img", "r+b") as f:
            f.write(b"hello")
        assert (folder / "images" / "scratch.img").read_bytes()[:5] == b"hello"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
