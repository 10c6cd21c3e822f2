"""Shared fixtures: spec files in a temporary folder, real mounts, tool checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.mounting import Mount

#: the session's Ceph cluster (`ceph` fixture) for the rbd tests
pytest_plugins = ["tests.ceph_cluster"]

REPO = Path(__file__).resolve().parent.parent


def _repo_entries() -> set[str]:
    """The repository root's entries, dot-files and caches aside."""
    return {p.name for p in REPO.iterdir() if p.name[0] != "." and p.name != "__pycache__"}


@pytest.fixture(scope="session", autouse=True)
def no_files_outside_temp_folders() -> Iterator[None]:
    """Tests write only into their temporary folders: a file that appears at the
    repository's root during the run (a fio verify-state file did) fails it."""
    before = _repo_entries()
    yield
    stray = sorted(_repo_entries() - before)
    if stray:
        pytest.fail(f"tests left files at the repository root: {', '.join(stray)}")


def _can_mount() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0:
        return "mount tests run as root"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


def pytest_configure(config: pytest.Config) -> None:
    """Turn FUSE over io_uring on (a module parameter, off by default), so that the
    mount tests run on the ring as `--transport auto` then does; FUSEDISK_TEST_TRANSPORT
    =kernel runs them on /dev/fuse."""
    if os.geteuid() == 0:
        from fusedisk.fuse.kernel.ring import turn_on

        turn_on()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _can_mount()
    if reason is None:
        return
    for item in items:
        if "mount" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def needs(*tools: str) -> pytest.MarkDecorator:
    """Skip unless every command in `tools` is installed."""
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[[str], Path]:
    """Write a spec's text to tmp_path/spec.toml (relative paths resolve in tmp_path)."""

    def write(text: str, name: str = "spec.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Start real mounts of specs; every one is unmounted at teardown, pass or fail."""
    started: list[Mount] = []

    def start(spec: Path, name: str = "mnt", extra_args: tuple[str, ...] = ()) -> Mount:
        m = Mount(spec, tmp_path / name, extra_args)
        started.append(m)
        return m.start()

    yield start
    errors = []
    for m in reversed(started):
        try:
            m.stop()
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("\n".join(errors))


def run(*cmd: object) -> str:
    """Run a program that must succeed (qemu-img, losetup, mkfs...); its stdout."""
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def cli(*args: object, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`fusedisk ARGS` as a user runs it; a hang fails the test (TimeoutExpired)."""
    return subprocess.run(
        [sys.executable, "-m", "fusedisk", *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def write_at(path: Path | str, offset: int, data: bytes) -> None:
    """Write and fsync, as a guest that wants its data to stay would."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: Path | str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def make_image(path: Path, size: int, pattern: bytes | None = None) -> Path:
    """A raw image of `size` bytes; sparse, or filled by repeating `pattern`."""
    with open(path, "wb") as f:
        if pattern:
            f.write((pattern * (size // len(pattern) + 1))[:size])
        else:
            f.truncate(size)
    return path


RAW_SPEC = """
[nodes.d0]
driver = "raw"
filename = "{image}"

[disks.vm0]
node = "d0"
{disk_options}
"""


def raw_spec(image: str = "d0.img", disk_options: str = "") -> str:
    return RAW_SPEC.format(image=image, disk_options=disk_options)


def seed_filters(children: list[str], quorum_extra: str = "") -> str:
    """The seed tree's filters as spec text: throttle -> luks (key file `key`, formatted
    at first open) -> quorum over `children`, disk vm0 on top; the caller adds the
    children's nodes."""
    quorum = f"children = {children!r}".replace("'", '"')
    return f"""
[nodes.thr]
driver = "throttle"
file = "crypt"
iops-total = 100000

[nodes.crypt]
driver = "luks"
file = "q"
key-file = "key"
format = true
pbkdf2-iterations = 1000

[nodes.q]
driver = "quorum"
{quorum}
vote-threshold = 2
{quorum_extra}
[disks.vm0]
node = "thr"
"""
