"""sd_notify: READY=1 once mounted, STOPPING=1 once unmounted, to a socket the test owns.

systemd itself is not needed to test the protocol: the test plays its part with a
unix datagram socket named by $NOTIFY_SOCKET, as systemd does for Type=notify.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusedisk.service.notify import Notifier
from tests.conftest import make_image, raw_spec
from tests.mounting import Mount, force_unmount, is_mounted

MiB = 1 << 20


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    yield sock
    sock.close()


def _messages(sock: socket.socket) -> dict[str, str]:
    lines = sock.recv(4096).decode().splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_notifier_without_socket_sends_nothing() -> None:
    assert Notifier(None).send("READY=1") is False


def test_abstract_socket_address() -> None:
    name = f"fusedisk-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier("@" + name).send("READY=1", "STATUS=x")
        assert sock.recv(100) == b"READY=1\nSTATUS=x"


def test_from_environment_takes_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/x")
    assert Notifier.from_environment().path == "/run/x"
    assert "NOTIFY_SOCKET" not in os.environ  # children do not report in our name


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_foreground_mount_notifies_ready_then_stopping(
    tmp_path: Path, notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_image(tmp_path / "d0.img", 4 * MiB)
    spec = tmp_path / "spec.toml"
    spec.write_text(raw_spec())
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    mount = Mount(spec, tmp_path / "mnt")
    try:
        mount.start()
        ready = _messages(notify_socket)
        assert ready["READY"] == "1"
        assert is_mounted(mount.mountpoint)  # READY came after the mount was up
        assert mount.proc is not None and ready["MAINPID"] == str(mount.proc.pid)
    finally:
        mount.stop()
    assert _messages(notify_socket)["STOPPING"] == "1"


@pytest.mark.mount
@pytest.mark.timeout(60)
def test_daemon_mount_notifies_ready(tmp_path: Path, notify_socket: socket.socket) -> None:
    make_image(tmp_path / "d0.img", 4 * MiB)
    spec = tmp_path / "spec.toml"
    spec.write_text(raw_spec())
    mnt, log = tmp_path / "mnt", tmp_path / "daemon.log"
    mnt.mkdir()
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.getsockname()}
    try:
        subprocess.run(
            [sys.executable, "-m", "fusedisk", "mount", "--log-file", log, spec, mnt],
            env=env, check=True, timeout=30,
        )  # fmt: skip
        ready = _messages(notify_socket)
        assert ready["READY"] == "1" and ready["STATUS"] == f"serving at {mnt}"
        assert int(ready["MAINPID"]) != os.getpid()
        subprocess.run(["fusermount3", "-u", mnt], check=True)
        assert _messages(notify_socket)["STOPPING"] == "1"
    finally:
        force_unmount(mnt)
    deadline = time.monotonic() + 10
    while "all disks flushed" not in log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.mount
@pytest.mark.timeout(60)
@pytest.mark.skipif(
    not Path("/run/systemd/system").is_dir(),
    reason="systemd is not the init system here (no /run/systemd/system); the unit's "
    "sd_notify protocol is tested above with a socket of the test's own",
)
def test_systemd_notify_unit_starts_and_stops(tmp_path: Path) -> None:  # pragma: no cover
    """As fusedisk@.service runs it: Type=notify, KillMode=mixed, stop = SIGTERM."""
    make_image(tmp_path / "d0.img", 4 * MiB)
    spec = tmp_path / "spec.toml"
    spec.write_text(raw_spec())
    mnt, log = tmp_path / "mnt", tmp_path / "daemon.log"
    mnt.mkdir()
    unit = f"fusedisk-test-{os.getpid()}"
    fusedisk = Path(sys.executable).parent / "fusedisk"
    try:
        subprocess.run(
            ["systemd-run", "--unit", unit, "-p", "Type=notify", "-p", "KillMode=mixed",
             fusedisk, "mount", "--foreground", "--log-file", log, spec, mnt],
            check=True, timeout=30,
        )  # fmt: skip
        assert is_mounted(mnt)  # systemd-run returned once READY=1 arrived
        subprocess.run(["systemctl", "stop", unit], check=True, timeout=60)
        assert not is_mounted(mnt)
        assert "all disks flushed and closed" in log.read_text()
    finally:
        subprocess.run(["systemctl", "stop", unit], capture_output=True)
        force_unmount(mnt)
