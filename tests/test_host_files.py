"""Only regular files and block devices are images: a FIFO, character device, socket or
directory named in a spec or an image header is refused at once, never opened in a way
that blocks (before, a FIFO hung `check` and `mount` forever)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fusedisk.formats.qcow2.create import create_qcow2
from tests.conftest import cli, raw_spec
from tests.mounting import Mount
from tests.test_quorum_mount import SIZE, make_children
from tests.test_quorum_mount import spec as quorum_spec

pytestmark = pytest.mark.timeout(60)

QCOW2_SPEC = """
[nodes.d0]
driver = "qcow2"
filename = "top.qcow2"

[disks.vm0]
node = "d0"
"""


def refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in result.stderr, result.stderr


def make_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (os.mkfifo, "is a FIFO"),
        (os.mkdir, "is a directory"),
        (make_socket, "is a socket"),
        (lambda p: os.symlink("/dev/zero", p), "is a character device"),
    ],
)
def test_spec_filename_that_is_no_image_is_refused(
    tmp_path: Path, write_spec: Callable[..., Path], make: Callable[[Path], None], kind: str
) -> None:
    make(tmp_path / "d0.img")
    spec = write_spec(raw_spec())
    (tmp_path / "mnt").mkdir()
    for command in (("check", spec), ("mount", spec, tmp_path / "mnt")):
        refused(cli(*command), "node 'd0.file': option 'filename'", kind, "d0.img")


@pytest.mark.parametrize("backing_fmt", ["raw", None])
def test_backing_file_that_is_a_fifo_is_refused(
    tmp_path: Path, write_spec: Callable[..., Path], backing_fmt: str | None
) -> None:
    (tmp_path / "base.img").write_bytes(bytes(1 << 20))
    create_qcow2(tmp_path / "top.qcow2", 1 << 20, backing="base.img", backing_fmt=backing_fmt)
    os.unlink(tmp_path / "base.img")
    os.mkfifo(tmp_path / "base.img")
    refused(cli("check", write_spec(QCOW2_SPEC)), "node 'd0'", "its backing file", "FIFO")


def test_data_file_that_is_a_fifo_is_refused(
    tmp_path: Path, write_spec: Callable[..., Path]
) -> None:
    create_qcow2(tmp_path / "top.qcow2", 1 << 20, data_file="data.raw")
    os.unlink(tmp_path / "data.raw")
    os.mkfifo(tmp_path / "data.raw")
    refused(cli("check", write_spec(QCOW2_SPEC)), "node 'd0'", "its data file", "FIFO")


@pytest.mark.mount
def test_a_quorum_replace_onto_a_spare_with_a_fifo_backing_fails_and_the_mount_lives(
    tmp_path: Path, write_spec: Callable[..., Path], mount: Callable[..., Mount]
) -> None:
    """Before, the spare's open blocked on the FIFO and froze the whole mount."""
    make_children(tmp_path)
    os.mkfifo(tmp_path / "spare-base.raw")
    create_qcow2(tmp_path / "spare.qcow2", SIZE, backing="spare-base.raw", backing_fmt="raw")
    m = mount(write_spec(quorum_spec(spare=True)))
    q = m.path("vm0", "nodes", "q")
    with contextlib.suppress(OSError):
        (q / "replace").write_text("children.1 spare\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = json.loads((q / "replace").read_text())
        if state.get("state") != "running":
            break
        time.sleep(0.05)
    assert "FIFO" in json.dumps(state) + m.log, (state, m.log)
    assert os.readlink(q / "children" / "children.1") == "../../c1"  # unchanged
    assert sorted(os.listdir(m.mountpoint))  # the mount still answers
    assert m.path("vm0.img").read_bytes()[:4] == b"\x5a" * 4
