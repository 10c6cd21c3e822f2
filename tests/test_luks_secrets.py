"""The passphrase given by `passphrase-env` leaves the daemon's environment once read:
/proc/PID/environ (readable by the same user and root) and the environment that programs
the daemon starts would inherit.  Before: the variable stayed there for the mount's life."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import luks2_craft as craft

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

SECRET = b"env-passphrase-4f1c"


def spec(image: Path) -> str:
    return (
        f'[nodes.crypt]\ndriver = "luks"\nfile = {{ driver = "file", filename = "{image}" }}\n'
        'passphrase-env = "FUSEDISK_TEST_PASSPHRASE"\n[disks.vm0]\nnode = "crypt"\n'
    )


def test_passphrase_env_is_scrubbed_from_the_daemon(tmp_path, write_spec, mount, monkeypatch):
    image = craft.make_image(tmp_path / "l2.img")
    monkeypatch.setenv("FUSEDISK_TEST_PASSPHRASE", craft.PASSPHRASE.decode())
    m = mount(write_spec(spec(image)))
    assert m.proc is not None
    environ = Path(f"/proc/{m.proc.pid}/environ").read_bytes()
    assert b"FUSEDISK_TEST_PASSPHRASE" in environ  # the name stays, its value is zeroed
    assert craft.PASSPHRASE not in environ
    with open(m.path("vm0.img"), "rb") as f:
        assert len(f.read(4096)) == 4096  # and the volume did open with it


def test_scrub_environment_zeroes_the_value_in_proc(monkeypatch):
    """In-process: os.environ loses the variable and /proc/self/environ its value (for a
    variable of the exec-time environment; one set later lives on the heap only)."""
    from fusedisk.filters.luks.keys import read_key_env, scrub_environment

    environ = Path("/proc/self/environ").read_bytes()
    name = next((n for n in ("HOME", "PATH") if f"{n}=".encode() in environ), None)
    if name is None:
        pytest.skip("no exec-time variable to scrub")
    value = os.environb[name.encode()]
    monkeypatch.setenv(name, value.decode())  # restored at teardown
    try:
        assert scrub_environment(name)
        assert name not in os.environ
        assert f"{name}=".encode() + value not in Path("/proc/self/environ").read_bytes()
    finally:
        os.environb[name.encode()] = value
    monkeypatch.setenv("FUSEDISK_SECRET_X", SECRET.decode())
    assert read_key_env("FUSEDISK_SECRET_X", "test") == SECRET
    assert "FUSEDISK_SECRET_X" not in os.environ
    assert read_key_env("FUSEDISK_SECRET_X", "test") == SECRET  # a reopened node finds it
