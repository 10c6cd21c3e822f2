"""A real FUSE mount for tests: `fusedisk mount -f` in a subprocess, always unmounted.

As pyfuse3 and s3ql test themselves: the filesystem runs in its own process
(client I/O from the serving trio thread would deadlock), readiness is
`os.path.ismount`, and teardown is `fusermount3 -u`, then `-uz` and a kill if
that did not end it.  The daemon's log is kept; an "unexpected error" in it
(an exception that escaped a driver) fails the test at unmount.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MOUNT_TIMEOUT = 20.0

#: the transport every test mount uses unless the test names one: FUSEDISK_TEST_TRANSPORT
#: (uring, kernel -- /dev/fuse --, auto or pyfuse3); conftest.py turns the ring on
TRANSPORT = os.environ.get("FUSEDISK_TEST_TRANSPORT", "auto")


class MountError(AssertionError):
    pass


def is_mounted(path: Path) -> bool:
    """From the mount table: os.path.ismount says False for a dead FUSE mount (ENOTCONN)."""
    target = str(Path(path).absolute())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def force_unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


class Mount:
    def __init__(self, spec: Path, mountpoint: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.spec = Path(spec)
        self.mountpoint = Path(mountpoint)
        self.log_path = self.mountpoint.parent / f"{self.mountpoint.name}.log"
        if "--transport" not in extra_args:
            extra_args = ("--transport", TRANSPORT, *extra_args)
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def start(self) -> Mount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "fusedisk", "mount", "-f", "--log-file", str(self.log_path),
            *self.extra_args, str(self.spec), str(self.mountpoint),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise MountError(f"fusedisk exited with {self.proc.returncode}:\n{out}{self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise MountError(f"not mounted after {MOUNT_TIMEOUT} s:\n{self.log}")
            time.sleep(0.02)
        return self

    def stop(self, check_log: bool = True) -> None:
        """Unmount and wait for the daemon (it flushes and closes every image first)."""
        if self.proc is None:
            force_unmount(self.mountpoint)
            return
        proc, self.proc = self.proc, None
        refused = self._unmount()
        try:
            proc.wait(timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
            proc.kill()
            proc.wait()
            raise MountError(f"fusedisk did not exit after unmount{refused}:\n{self.log}") from None
        finally:
            force_unmount(self.mountpoint)
        if check_log and "unexpected error" in self.log:
            raise MountError(f"the daemon logged an unexpected error:\n{self.log}")

    def _unmount(self) -> str:
        """`fusermount3 -u`, tried again for a few seconds while the kernel says the
        mount is busy (a process that has just closed a file in it, a watchdog's stat
        at that instant); what it said last, if it never succeeded."""
        said = ""
        for _ in range(25):
            if not is_mounted(self.mountpoint):
                return ""
            done = subprocess.run(
                ["fusermount3", "-u", str(self.mountpoint)], capture_output=True, text=True
            )
            if done.returncode == 0:
                return ""
            said = f" (fusermount3 -u: {done.stderr.strip()})"
            time.sleep(0.2)
        return said

    def signal(self, signum: int) -> int:
        """Send `signum` to the daemon and wait for it; returns its exit status."""
        assert self.proc is not None
        proc = self.proc
        proc.send_signal(signum)
        try:
            return proc.wait(timeout=MOUNT_TIMEOUT)
        finally:
            self.proc = None
            deadline = time.monotonic() + 5
            while is_mounted(self.mountpoint) and time.monotonic() < deadline:
                time.sleep(0.05)  # auto_unmount's helper unmounts after the daemon dies
            force_unmount(self.mountpoint)

    def crash(self) -> None:
        """SIGKILL the daemon, as a crash would."""
        self.signal(signal.SIGKILL)


@contextmanager
def mounted(
    spec: Path, mountpoint: Path | None = None, extra_args: tuple[str, ...] = ()
) -> Iterator[Mount]:
    mnt = Mount(spec, mountpoint or Path(spec).parent / "mnt", extra_args)
    mnt.start()
    try:
        yield mnt
    finally:
        mnt.stop()
