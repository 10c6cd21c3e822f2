"""fstab and mount.fuse3: `fusedisk SPEC MOUNTPOINT -o OPTS`, run by real `mount` commands.

mount(8) runs mount.fuse3 with PATH cleared, so for type `fuse.fusedisk` the
program comes from the default path (/usr/local/sbin first): the test binds a
folder holding a `fusedisk` link over /usr/local/sbin in a private mount
namespace, so the machine's own /usr/local is never touched.  Type `fuse` with
`PROGRAM#SPEC` names the program's path and needs no such help.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusedisk.cli import main
from fusedisk.errors import SpecError
from fusedisk.service.fstab import helper_argv
from tests.conftest import make_image, needs, raw_spec, read_at
from tests.mounting import force_unmount, is_mounted

FUSEDISK = Path(sys.executable).parent / "fusedisk"
MiB = 1 << 20


# -- the command form -----------------------------------------------------------------


def test_helper_form_maps_mount_options() -> None:
    argv = ["/etc/d.toml", "/mnt/d", "-o", "rw,allow_other,dev,suid,log-file=/var/log/f.log"]
    assert helper_argv(argv) == [
        "mount", "--allow-other", "--log-file", "/var/log/f.log", "/etc/d.toml", "/mnt/d",
    ]  # fmt: skip
    assert helper_argv(["-oro,noauto,x-systemd.automount,_netdev", "s", "m", "-o", "debug"]) == [
        "mount", "--read-only", "--debug", "s", "m",
    ]  # fmt: skip


def test_helper_form_refuses_unknown_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SpecError, match="mount option 'allow_othr' is not one fusedisk knows"):
        helper_argv(["s", "m", "-o", "defaults,allow_othr"])
    with pytest.raises(SpecError, match="log-file=VALUE"):
        helper_argv(["s", "m", "-o", "log-file="])
    assert main(["spec.toml", "/mnt", "-o", "bogus"]) == 2
    assert "mount option 'bogus'" in capsys.readouterr().err


def test_commands_still_win() -> None:
    with pytest.raises(SystemExit):  # argparse: `check` wants exactly one spec
        main(["check", "a", "b"])


# -- real mounts through mount(8) ------------------------------------------------------


def _wait_daemon_gone(log: Path, timeout: float = 30) -> None:
    """The daemon detached from `mount`; its log says when every disk is closed."""
    deadline = time.monotonic() + timeout
    while "all disks flushed and closed" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"the daemon did not finish:\n{log.read_text()}"
        time.sleep(0.05)


@pytest.mark.mount
@pytest.mark.timeout(90)
@needs("mount", "umount", "mount.fuse3", "dd")
def test_fstab_line_of_type_fuse_with_program_path(tmp_path: Path) -> None:
    image = make_image(tmp_path / "d0.img", 4 * MiB)
    spec = tmp_path / "spec.toml"
    spec.write_text(raw_spec())
    mnt, log = tmp_path / "mnt", tmp_path / "daemon.log"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"{FUSEDISK}#{spec} {mnt} fuse allow_other,noauto,nofail,x-systemd.requires=a.service,"
        f"log-file={log} 0 0\n"
    )
    try:
        subprocess.run(["mount", "-T", fstab, mnt], check=True, capture_output=True, timeout=30)
        assert is_mounted(mnt)
        assert "allow_other" in next(
            line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if f" {mnt} " in line
        )  # fmt: skip
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={mnt / 'vm0.img'}", "bs=64k", "count=2",
             "conv=notrunc,fsync", "status=none"], check=True)  # fmt: skip
        subprocess.run(
            f"printf 'fstab' | dd of={mnt / 'vm0.img'} bs=1 seek=4096 conv=notrunc,fsync "
            "status=none", shell=True, check=True)  # fmt: skip
        subprocess.run(["umount", mnt], check=True, timeout=30)
        _wait_daemon_gone(log)
    finally:
        force_unmount(mnt)
    assert read_at(image, 4096, 5) == b"fstab"
    assert "unexpected error" not in log.read_text()


NAMESPACE_SCRIPT = """
set -eu
trap 'fusermount3 -uz {mnt} 2>/dev/null || true' EXIT
mount --bind {bin} /usr/local/sbin
mount -t fuse.fusedisk -o ro,log-file={log} {spec} {mnt}
grep -q ' {mnt} ' /proc/self/mountinfo
cat {mnt}/vm0/size
if dd if=/dev/zero of={mnt}/vm0.img bs=4k count=1 conv=notrunc,fsync status=none 2>/dev/null
then echo "ro disk took a write"; exit 1; fi
umount {mnt}
while ! grep -q 'all disks flushed and closed' {log}; do sleep 0.05; done
mount -T {fstab} {mnt}
printf 'typed' | dd of={mnt}/vm0.img bs=1 seek=8192 conv=notrunc,fsync status=none
umount {mnt}
while [ $(grep -c 'all disks flushed and closed' {log}) -lt 2 ]; do sleep 0.05; done
echo done
"""


@pytest.mark.mount
@pytest.mark.timeout(90)
@needs("mount", "umount", "mount.fuse3", "unshare", "dd", "fusermount3")
def test_mount_type_fuse_fusedisk_and_fstab(tmp_path: Path) -> None:
    image = make_image(tmp_path / "d0.img", 4 * MiB)
    spec = tmp_path / "spec.toml"
    spec.write_text(raw_spec())
    mnt, log, bin_dir = tmp_path / "mnt", tmp_path / "daemon.log", tmp_path / "bin"
    mnt.mkdir()
    bin_dir.mkdir()
    (bin_dir / "fusedisk").symlink_to(FUSEDISK)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{spec} {mnt} fuse.fusedisk defaults,noauto,_netdev,log-file={log} 0 0\n")
    script = NAMESPACE_SCRIPT.format(
        **{k: shlex.quote(str(v)) for k, v in
           {"mnt": mnt, "bin": bin_dir, "log": log, "spec": spec, "fstab": fstab}.items()}
    )  # fmt: skip
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{_read(log)}"
    assert result.stdout.split() == [str(4 * MiB), "done"]
    assert read_at(image, 8192, 5) == b"typed"
    assert "unexpected error" not in _read(log)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@needs("systemd-analyze")
def test_unit_files_pass_systemd_analyze(tmp_path: Path) -> None:
    """systemd's own checker, which works without systemd running: syntax, ordering cycles."""
    import fusedisk.service

    folder = Path(fusedisk.service.__file__).parent / "systemd"
    unit = (folder / "fusedisk@.service").read_text()
    # systemd resolves a bare `fusedisk` in /usr/local/bin...; this machine has it in the venv
    (tmp_path / "fusedisk@vm.service").write_text(
        unit.replace("ExecStart=fusedisk ", f"ExecStart={FUSEDISK} ")
    )
    (tmp_path / "mnt-disks.mount").write_text((folder / "mnt-disks.mount").read_text())
    units = [tmp_path / "fusedisk@vm.service", tmp_path / "mnt-disks.mount"]
    result = subprocess.run(
        ["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_unit_files_are_shipped() -> None:
    import fusedisk.service

    folder = Path(fusedisk.service.__file__).parent / "systemd"
    unit = (folder / "fusedisk@.service").read_text()
    assert "Type=notify" in unit and "mount --foreground" in unit
    assert "Type=fuse.fusedisk" in (folder / "mnt-disks.mount").read_text()
    assert os.access(FUSEDISK, os.X_OK)
