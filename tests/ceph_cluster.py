"""A real Ceph cluster for the rbd tests, started once per test run.

`scripts/ceph-single-node start DIR 3` (one mon, three bluestore OSDs on sparse
files, loopback, cephx): pool `rbd` spans the three OSDs, pools p0, p1, p2 live
on one OSD each, so stopping osd.N stops exactly pool pN.  Its start time is
reported in the test output.  The tests skip only when Ceph is not installed
(scripts/bootstrap installs it); a cluster that fails to start fails them.
Registered in conftest.py (`pytest_plugins`), so every module shares one.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ceph-single-node"
TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "rados")
OSDS = 3


def missing_ceph() -> str | None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"Ceph is not installed ({', '.join(missing)}; scripts/bootstrap installs it)"
    try:
        from fusedisk.formats.rbd.librbd import bindings

        bindings()
    except ImportError as e:
        return str(e)
    return None


@dataclass
class Cluster:
    folder: Path
    env: dict[str, str]
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def conf(self) -> str:
        return self.env["CEPH_CONF"]

    @property
    def secret_file(self) -> str:
        return self.env["CEPH_FUSEDISK_SECRET"]

    def osd_pid(self, i: int) -> int:
        return int((self.folder / "run" / f"osd.{i}.pid").read_text())

    def rbd(self, *args: object, timeout: float = 60) -> str:
        result = subprocess.run(
            ["rbd", "-c", self.conf, *map(str, args)],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        assert result.returncode == 0, f"rbd {args} failed: {result.stderr}"
        return result.stdout

    def new_image(self, pool: str = "rbd", size: str = "64M", prefix: str = "img") -> str:
        """A fresh image of `size` in `pool`; its name (unique in this run)."""
        name = f"{prefix}{os.getpid()}x{next(self._names)}"
        self.rbd("create", f"{pool}/{name}", "--size", size)
        return name

    def qemu_name(self, pool: str, image: str, extra: str = "") -> str:
        return f"rbd:{pool}/{image}:conf={self.conf}{extra}"

    def export(self, pool: str, image: str, out: Path) -> bytes:
        self.rbd("export", f"{pool}/{image}", str(out))
        return out.read_bytes()

    @contextmanager
    def stopped_osd(self, i: int) -> Iterator[None]:
        """osd.i frozen (SIGSTOP) for the block; always continued (SIGCONT) after, and
        the pool on it answers again before the block's caller goes on."""
        pid = self.osd_pid(i)
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)
            self.wait_pool(f"p{i}")

    def wait_pool(self, pool: str, timeout: float = 60) -> None:
        """Until a write to `pool` succeeds (an OSD that was stopped may be booting)."""
        deadline = time.monotonic() + timeout
        while True:
            result = subprocess.run(
                ["timeout", "10", "rados", "-c", self.conf, "-p", pool, "put", "ready", self.conf],
                capture_output=True,
            )  # fmt: skip
            if result.returncode == 0:
                return
            assert time.monotonic() < deadline, f"pool {pool} did not come back"
            time.sleep(0.5)


class _Start:
    """The cluster's start, begun in the background as soon as the run is known to
    need it (after collection), so it overlaps the tests that come before."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.began = time.monotonic()
        # a test run killed outright still gets its cluster stopped (the owner watcher)
        env = {**os.environ, "CEPH_SINGLE_NODE_OWNER": str(os.getpid())}
        self.proc = subprocess.Popen(
            [str(SCRIPT), "start", str(folder), str(OSDS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip

    def wait(self) -> tuple[subprocess.CompletedProcess[str], float]:
        out, err = self.proc.communicate(timeout=180)
        ready = time.monotonic() - self.began
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err), ready


_started: list[_Start] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    needed = any("ceph" in getattr(item, "fixturenames", ()) for item in session.items)
    if needed and not session.config.option.collectonly and missing_ceph() is None:
        folder = session.config._tmp_path_factory.mktemp("ceph")  # type: ignore[attr-defined]
        _started.append(_Start(folder))


def pytest_unconfigure(config: pytest.Config) -> None:
    for start in _started:  # a run that ended before the fixture was torn down
        if start.proc.poll() is None:
            start.proc.kill()
            start.proc.wait()
        subprocess.run([str(SCRIPT), "stop", str(start.folder)], timeout=60)


@pytest.fixture(scope="session")
def ceph(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    reason = missing_ceph()
    if reason:
        pytest.skip(reason)
    if not _started:
        folder = request.config._tmp_path_factory.mktemp("ceph")  # type: ignore[attr-defined]
        _started.append(_Start(folder))
    start = _started[0]
    waited = time.monotonic()
    result, ready = start.wait()
    waited = time.monotonic() - waited
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # to the terminal, not the test's output
            reporter.write_line(
                f"\nceph: a cluster of 1 mon + {OSDS} OSDs started in {ready:.1f} s "
                f"(in the background; the rbd tests waited {waited:.1f} s for it)"
            )
    try:
        assert result.returncode == 0, f"the Ceph cluster did not start:\n{result.stderr}"
        env = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        yield Cluster(start.folder, env)
    finally:
        subprocess.run([str(SCRIPT), "stop", str(start.folder)], timeout=60)
        _started.remove(start)
