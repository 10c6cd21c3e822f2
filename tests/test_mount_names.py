"""A spec file's name never becomes a mount option (issue 25, item 10).

The mount's source is `fusedisk:<spec file name>`.  Passed unescaped in `-o
fsname=` to libfuse (pyfuse3) or fusermount3, a spec named `y,allow_other` opened
the mount to every user though `--allow-other` was not given, and `x,ro` mounted
it read-only.  Each path is tried: mount(2) as root (kernel transport), libfuse
(pyfuse3), and fusermount3 (the path without root, run here as root).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_image, needs, raw_spec, write_at
from tests.mounting import force_unmount, is_mounted

pytestmark = [pytest.mark.mount, pytest.mark.timeout(90)]

MiB = 1 << 20


def mount_entry(mountpoint: Path) -> tuple[str, str, str]:
    """(mount options, source, super options) of the mount at `mountpoint`."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, after = line.split(" - ", 1)
            fields = before.split()
            if fields[4] == str(mountpoint):
                _fstype, source, super_options = after.split()
                # mountinfo writes a backslash (and spaces) as an octal escape
                source = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), source)
                return fields[5], source, super_options
    raise AssertionError(f"nothing mounted at {mountpoint}")


def assert_no_injection(mountpoint: Path, name: str) -> None:
    options, source, super_options = mount_entry(mountpoint)
    assert source == f"fusedisk:{name}"
    assert options.split(",")[0] == "rw"
    assert "allow_other" not in super_options.split(",")
    assert super_options.split(",")[0] == "rw"


@pytest.mark.parametrize(
    ("transport", "name"),
    [
        ((), "y,allow_other.toml"),
        ((), "x,ro.toml"),
        (("--transport", "pyfuse3"), "y,allow_other.toml"),
        (("--transport", "pyfuse3"), "x,ro.toml"),
        (("--transport", "pyfuse3"), "y,allow_other"),
        (("--transport", "pyfuse3"), "x,ro"),
        (("--transport", "pyfuse3"), "back\\slash,ro"),
    ],
    ids=lambda v: v[-1] if isinstance(v, tuple) and v else (v or "kernel"),
)
def test_a_comma_in_the_spec_name_is_not_a_mount_option(
    tmp_path, write_spec, mount, transport, name
) -> None:
    make_image(tmp_path / "d0.img", MiB)
    m = mount(write_spec(raw_spec(), name=name), extra_args=transport)
    assert_no_injection(m.mountpoint, name)
    write_at(m.path("vm0.img"), 0, b"w" * 512)  # not read-only


MOUNT_WITH_FUSERMOUNT = """
import sys
from pathlib import Path
from fusedisk.fuse.kernel import mounting
m = mounting._mount_with_fusermount(Path(sys.argv[1]), sys.argv[2], "fusedisk", False)
print("mounted", flush=True)
sys.stdin.readline()
m.unmount()
m.close()
"""


@needs("fusermount3")
@pytest.mark.parametrize("name", ["y,allow_other.toml", "x,ro", "y,allow_other"])
def test_fusermount3_gets_the_name_escaped(tmp_path, name) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", MOUNT_WITH_FUSERMOUNT, str(mnt), f"fusedisk:{name}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line.strip() == "mounted", proc.stderr.read() if proc.stderr else ""
        assert_no_injection(mnt, name)
        proc.stdin.write("done\n")
        proc.stdin.flush()
        proc.wait(timeout=20)
    finally:
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while is_mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        force_unmount(mnt)
