"""The control tree of a mount: node directories, links, options and stats."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import make_image

pytestmark = [pytest.mark.mount, pytest.mark.timeout(60)]

SPEC = """
[nodes.base]
driver = "file"
filename = "d0.img"

[nodes.win]
driver = "raw"
file = "base"
offset = 4096

[nodes.top]
driver = "raw"
file = "win"

[disks.vm0]
node = "top"
"""


def test_every_node_has_a_directory_with_its_relations(tmp_path, write_spec, mount):
    make_image(tmp_path / "d0.img", 1 << 20)
    m = mount(write_spec(SPEC))
    nodes = m.path("vm0", "nodes")
    assert sorted(os.listdir(nodes)) == ["base", "top", "win"]
    assert os.readlink(m.path("vm0", "root")) == "nodes/top"
    assert m.path("vm0", "root").resolve() == (nodes / "top").resolve()
    assert os.readlink(nodes / "top" / "children" / "file") == "../../win"
    assert (nodes / "top" / "children" / "file").resolve() == (nodes / "win").resolve()
    assert (nodes / "win" / "children" / "file").resolve() == (nodes / "base").resolve()
    assert (nodes / "base" / "parents" / "win").resolve() == (nodes / "win").resolve()
    assert os.listdir(nodes / "top" / "parents") == []
    assert os.listdir(nodes / "base" / "children") == []
    assert (nodes / "win" / "driver").read_text() == "raw\n"
    assert (nodes / "base" / "size").read_text() == f"{1 << 20}\n"
    assert (nodes / "top" / "size").read_text() == f"{(1 << 20) - 4096}\n"
    assert (m.path("vm0", "size")).read_text() == f"{(1 << 20) - 4096}\n"


def test_options_read_back_the_spec(tmp_path, write_spec, mount):
    make_image(tmp_path / "d0.img", 1 << 20)
    m = mount(write_spec(SPEC))
    opts = m.path("vm0", "nodes", "win", "options")
    assert sorted(os.listdir(opts)) == ["offset", "read-only", "size"]
    assert (opts / "offset").read_text() == "4096\n"
    assert (opts / "size").read_text() == "\n"
    assert (opts / "read-only").read_text() == "false\n"
    base_opts = m.path("vm0", "nodes", "base", "options")
    assert (base_opts / "filename").read_text() == f"{tmp_path / 'd0.img'}\n"


def test_options_that_cannot_change_at_run_time_refuse_writes(tmp_path, write_spec, mount):
    make_image(tmp_path / "d0.img", 1 << 20)
    m = mount(write_spec(SPEC))
    with pytest.raises(OSError) as err:
        m.path("vm0", "nodes", "win", "options", "offset").write_text("0\n")
    assert err.value.errno == errno.EACCES
    assert m.path("vm0", "nodes", "win", "options", "offset").read_text() == "4096\n"


def test_stats_count_the_requests_made(tmp_path, write_spec, mount):
    make_image(tmp_path / "d0.img", 1 << 20)
    m = mount(write_spec(SPEC))
    fd = os.open(m.path("vm0.img"), os.O_RDWR)
    try:
        for i in range(3):
            os.pwrite(fd, b"x" * 4096, i * 8192)
        os.pread(fd, 8192, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    for node in ("top", "win", "base"):
        stats = json.loads(m.path("vm0", "nodes", node, "stats").read_text())
        assert stats["write"]["ops"] == 3 and stats["write"]["bytes"] == 3 * 4096, node
        assert stats["read"]["ops"] == 1 and stats["read"]["bytes"] == 8192, node
        assert stats["flush"]["ops"] == 2, node  # the fsync, and the close
        assert stats["in_flight"] == 0
    disk = json.loads(m.path("vm0", "stats").read_text())
    assert disk["write"]["ops"] == 3 and disk["read"]["bytes"] == 8192


def test_siblings_list_the_other_children_of_the_parent(tmp_path, write_spec, mount):
    # raw has one child, so siblings are empty here; fan-out nodes fill them.
    make_image(tmp_path / "d0.img", 1 << 20)
    m = mount(write_spec(SPEC))
    assert os.listdir(m.path("vm0", "nodes", "win", "siblings")) == []


def test_background_mount_returns_when_ready_and_unmount_ends_the_daemon(tmp_path, write_spec):
    make_image(tmp_path / "d0.img", 1 << 20, b"q")
    spec = write_spec(SPEC)
    mnt = tmp_path / "bg"
    mnt.mkdir()
    log = tmp_path / "bg.log"
    cmd = [sys.executable, "-m", "fusedisk", "mount", "--log-file", str(log), str(spec), str(mnt)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    try:
        assert result.returncode == 0, result.stderr
        assert os.path.ismount(mnt)  # ready when the command returns
        assert (mnt / "vm0.img").read_bytes()[:4] == b"qqqq"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    for _ in range(100):
        if "all disks flushed and closed" in log.read_text():
            break
        subprocess.run(["sleep", "0.05"])
    assert "all disks flushed and closed" in log.read_text()
    assert not os.path.ismount(mnt)


def test_a_refused_control_write_says_why_in_last_error(tmp_path, write_spec, mount):
    make_image(tmp_path / "d0.img", 1 << 20)
    m = mount(write_spec(SPEC))
    assert m.path("last-error").read_text() == ""
    with pytest.raises(OSError):
        m.path("vm0", "snapshot").write_text("bad/name\n")
    text = m.path("last-error").read_text()
    assert "vm0/snapshot" in text and "snapshot name 'bad/name'" in text
