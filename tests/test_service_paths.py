"""status, top, job and mount on a dead mount and on paths that are not a fusedisk
disk: one sentence naming the path (and how to clear a dead mount), exit 1, no
traceback (fusedisk/service/mounts.py)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_image, raw_spec
from tests.mounting import force_unmount, is_mounted

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

MiB = 1 << 20


def fusedisk(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusedisk", *map(str, args)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def helpers_of(mountpoint: Path, daemon: int) -> list[int]:
    """The processes that would unmount after the daemon dies (its watchdog as root,
    fusermount3's auto_unmount otherwise): their command line names the mount point."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        helper = any(b"watchdog" in a or b"fusermount3" in a for a in argv)
        if helper and int(pid) != daemon and os.fsencode(mountpoint) in argv:
            found.append(int(pid))
    return found


def kill_leaving_a_dead_mount(m) -> None:
    """SIGKILL the daemon after its unmount helpers: the mount stays, dead (ENOTCONN)."""
    proc, m.proc = m.proc, None
    helpers = helpers_of(m.mountpoint, proc.pid)
    assert helpers, "no watchdog or fusermount3 found for the mount"
    for pid in helpers:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert is_mounted(m.mountpoint)
    with pytest.raises(OSError) as err:
        os.stat(m.mountpoint)
    assert err.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # the ring aborts


def assert_one_sentence(result: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for part in parts:
        assert part in result.stderr, result.stderr


def test_a_dead_mount_is_named_with_how_to_clear_it(tmp_path, write_spec, mount) -> None:
    make_image(tmp_path / "d0.img", MiB)
    spec = write_spec(raw_spec())
    m = mount(spec)
    mnt = m.mountpoint
    try:
        kill_leaving_a_dead_mount(m)
        clear = f"`fusermount3 -u {mnt}`"
        for args in (["status", mnt], ["top", mnt], ["job", mnt / "vm0"],
                     ["job", mnt / "vm0" / "job"], ["mount", "-f", spec, mnt]):  # fmt: skip
            assert_one_sentence(fusedisk(*args), f"'{mnt}' is a dead fusedisk mount", clear)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)  # what the sentence says
        assert not is_mounted(mnt)
        mount(spec, name="mnt")  # and the mount point works again
    finally:
        force_unmount(mnt)


def test_job_refuses_paths_that_are_not_a_disk_of_a_mount(tmp_path, write_spec, mount) -> None:
    make_image(tmp_path / "d0.img", MiB)
    m = mount(write_spec(raw_spec()))
    assert_one_sentence(fusedisk("job", "/etc/passwd"), "'/etc/passwd' is not in a fusedisk mount")
    planted = tmp_path / "vm0"
    planted.mkdir()
    (planted / "job").write_text('{"state": "done"}')  # looks like a disk's folder; is not
    assert_one_sentence(fusedisk("job", planted), f"'{planted}' is not in a fusedisk mount")
    for path in (m.mountpoint, m.path("vm0", "stats"), m.path("vm0", "nodes", "d0"),
                 m.path("vm0.img"), m.path("nope")):  # fmt: skip
        assert_one_sentence(fusedisk("job", path), f"'{path}' is not a disk of the fusedisk mount")
    for path in (m.path("vm0"), m.path("vm0", "job")):
        result = fusedisk("job", path)
        assert result.returncode == 0 and result.stdout == "no job\n", result
    inside = m.path("vm0")
    assert_one_sentence(fusedisk("status", inside), f"'{inside}' is not a fusedisk mount; "
                        f"the mount is at '{m.mountpoint}'")  # fmt: skip


def test_a_mount_table_without_the_root_holds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a chroot, mountinfo lists only the mounts below the process's root (/proc,
    /dev...), and the root itself need not be one: a path no entry holds is simply not
    on a mount, never an assertion (it stopped every `fusedisk mount` in a chroot)."""
    from fusedisk.service import mounts

    only_proc = [mounts.MountEntry(Path("/proc"), "proc", "proc")]
    monkeypatch.setattr(mounts, "mount_table", lambda: only_proc)
    assert mounts.mount_of(Path("/srv/disks")) is None
    mounts.refuse_dead(Path("/srv/disks"))  # nothing to refuse
    with pytest.raises(mounts.NotAMount, match="is not in a fusedisk mount"):
        mounts.fusedisk_mount_of(Path("/srv/disks/vm0"))
