"""Files fusedisk creates at names it chooses never follow a symlink planted there: the
state file's temporary, a revert's temporary overlay, the demo's files.  The planted
link's target is untouched and the operation still works (before, the target was
truncated and overwritten, as root)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import read_at, write_at
from tests.mounting import Mount, MountError
from tests.qcow2_helpers import create, needs_qemu
from tests.test_snapshot import SPEC

pytestmark = [needs_qemu, pytest.mark.mount, pytest.mark.timeout(90)]

PRECIOUS = b"precious data that no snapshot may touch\n" * 100


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere" / "victim"
    path.parent.mkdir()
    path.write_bytes(PRECIOUS)
    return path


@pytest.fixture
def spec(tmp_path: Path, write_spec: Callable[..., Path]) -> Path:
    (tmp_path / "images").mkdir()
    create(tmp_path / "images" / "d0.qcow2", "16M")
    return write_spec(SPEC)


def control(m: Mount, name: str, text: str) -> None:
    m.path("vm0", name).write_text(f"{text}\n")


def test_a_symlink_at_the_state_files_temporary_is_not_followed(
    tmp_path: Path, spec: Path, victim: Path, mount: Callable[..., Mount]
) -> None:
    planted = tmp_path / "spec.toml.state.json.tmp"
    planted.symlink_to(victim)
    m = mount(spec)
    control(m, "snapshot", "s1")
    assert victim.read_bytes() == PRECIOUS
    assert not planted.is_symlink()
    assert "s1\t" in m.path("vm0", "snapshot").read_text()
    assert (tmp_path / "spec.toml.state.json").read_text().count('"snapshot"') == 1


def test_a_symlink_at_a_reverts_temporary_overlay_is_not_followed(
    tmp_path: Path, spec: Path, victim: Path, mount: Callable[..., Mount]
) -> None:
    m = mount(spec)
    disk = m.path("vm0.img")
    write_at(disk, 0, b"old" * 1000)
    control(m, "snapshot", "s1")
    write_at(disk, 0, b"new" * 1000)
    planted = tmp_path / "images" / ".d0.s1.qcow2.revert"
    planted.symlink_to(victim)
    control(m, "revert", "s1")
    assert victim.read_bytes() == PRECIOUS
    assert read_at(disk, 0, 3000) == b"old" * 1000
    assert not planted.exists() and not planted.is_symlink()


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_state_file_that_is_no_regular_file_is_refused_unread(
    tmp_path: Path, spec: Path, victim: Path, mount: Callable[..., Mount], kind: str
) -> None:
    state = tmp_path / "spec.toml.state.json"
    if kind == "symlink":
        state.symlink_to(victim)
    else:
        os.mkfifo(state)
    with pytest.raises(MountError) as err:
        mount(spec)
    assert "cannot read the recorded graph changes" in str(err.value)
    assert victim.read_bytes() == PRECIOUS


def demo(folder: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "fusedisk", "demo", str(folder)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        subprocess.run(["fusermount3", "-u", str(folder / "mnt")], capture_output=True)


def test_the_demo_writes_no_file_through_a_planted_symlink(tmp_path: Path, victim: Path) -> None:
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "demo.toml").symlink_to(victim)
    result = demo(folder)
    assert result.returncode == 0, result.stderr
    assert victim.read_bytes() == PRECIOUS
    assert not (folder / "demo.toml").is_symlink()
    (folder / "demo.key").unlink()
    (folder / "demo.key").symlink_to(tmp_path / "elsewhere" / "new-key")
    result = demo(folder)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "demo.key" in result.stderr
    assert not (tmp_path / "elsewhere" / "new-key").exists()
