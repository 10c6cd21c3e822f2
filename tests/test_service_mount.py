"""status, top, job and the metrics file, against a real mount of the seed tree.

The mount holds two disks: vm0, the seed tree (throttle -> luks -> quorum of
three qcow2 images) with one child failing every write and the other two read
through a throttle group, so a scrub runs as long as the test keeps the limit;
and vm1, a qcow2 disk whose base image is a file served by a second fusedisk
mount through a throttle (a slow device without device-mapper), so a commit runs
as long as the test needs.  The overlay the snapshot makes lands beside the
base's link, in a plain folder.

A write to a slow host file blocks the daemon's event loop today (the file
driver writes inline), so while the commit runs every request to the mount
waits up to one chunk's write: the tests read few files then (the job file,
metrics), and `status` is shown a running scrub, which waits in the throttle
without blocking anything.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import needs, run, write_at
from tests.mounting import Mount

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120), needs("qemu-img")]

MiB = 1 << 20
BASE_SIZE = 512 * MiB

SLOW_SPEC = """
[nodes.raw1]
driver = "raw"
filename = "base1.qcow2"

[nodes.bad]
driver = "faults"
file = "raw1"

[nodes.slow]
driver = "throttle"
file = "bad"

[disks.base]
node = "slow"
"""

MAIN_SPEC = """
[throttle-groups.g]
iops-total = 50000

[nodes.thr]
driver = "throttle"
file = "crypt"
throttle-group = "g"

[nodes.crypt]
driver = "luks"
file = "q"
key-file = "key"
format = true
iter-time = 10

[throttle-groups.children]

[nodes.q]
driver = "quorum"
children = ["t0", "t1", "f2"]
vote-threshold = 2

[nodes.t0]
driver = "throttle"
file = "d0"
throttle-group = "children"

[nodes.t1]
driver = "throttle"
file = "d1"
throttle-group = "children"

[nodes.d0]
driver = "qcow2"
filename = "d0.qcow2"

[nodes.d1]
driver = "qcow2"
filename = "d1.qcow2"

[nodes.f2]
driver = "faults"
file = "d2"
error-writes = true

[nodes.d2]
driver = "qcow2"
filename = "d2.qcow2"

[nodes.spare]
driver = "qcow2"
filename = "spare.qcow2"

[nodes.b1]
driver = "qcow2"
filename = "vm1/base1.qcow2"

[disks.vm0]
node = "thr"

[disks.vm1]
node = "b1"
"""


@dataclass
class Setup:
    main: Mount
    slow: Mount

    def fusedisk(self, *args: object, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fusedisk", *map(str, args)],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def throttle(self, bps: str) -> None:
        self.slow.path("base", "nodes", "slow", "options", "bps-write").write_text(f"{bps}\n")

    def children_limit(self, bps: str) -> None:
        options = self.main.path("throttle-groups", "children", "options")
        (options / "bps-read").write_text(f"{bps}\n")

    def start_scrub(self) -> Path:
        """A scrub reading what the quorum's two children hold, 1 MB/s together (~20 s)."""
        self.children_limit("1M")
        scrub = self.main.path("vm0", "nodes", "q", "scrub")
        scrub.write_text("\n")
        deadline = time.monotonic() + 20
        while json.loads(scrub.read_text())["done_bytes"] == 0:
            assert time.monotonic() < deadline, scrub.read_text()
            time.sleep(0.05)
        return scrub

    def job(self) -> dict:
        return json.loads(self.main.path("vm1", "job").read_text())

    def start_commit(self) -> None:
        """Snapshot vm1, fill the overlay, slow the base down to 32 MB/s, commit (~16 s).

        Today a write to a host file blocks the daemon's event loop for as long as the
        file takes (here one 1 MiB chunk of the commit: ~30 ms), so the limit is kept
        high enough for the mount's files to stay readable while the commit runs.
        """
        self.main.path("vm1", "snapshot").write_text(f"s{time.monotonic_ns()}\n")
        chunk = os.urandom(4 * MiB)
        fd = os.open(self.main.path("vm1.img"), os.O_WRONLY)
        try:
            for offset in range(0, BASE_SIZE, len(chunk)):
                os.pwrite(fd, chunk, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.throttle("32M")
        self.main.path("vm1", "commit").write_text("\n")
        deadline = time.monotonic() + 20
        while self.job()["done_bytes"] == 0:  # the first chunk is through: a rate exists
            assert self.job()["state"] == "running", self.job()
            assert time.monotonic() < deadline, self.job()
            time.sleep(0.05)


@pytest.fixture
def setup(tmp_path: Path, mount: Callable[..., Mount]) -> Iterator[Setup]:
    for name in ("d0", "d1", "d2", "spare"):
        run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / f"{name}.qcow2", "32M")
    (tmp_path / "key").write_bytes(b"seed tree passphrase")
    # Preallocated: the commit overwrites clusters in place, the served file never grows.
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc",
        tmp_path / "base1.qcow2", str(BASE_SIZE))  # fmt: skip
    (tmp_path / "slow.toml").write_text(SLOW_SPEC)
    slow = mount(tmp_path / "slow.toml", name="slowmnt")
    (tmp_path / "vm1").mkdir()
    (tmp_path / "vm1" / "base1.qcow2").symlink_to(slow.path("base.img"))
    (tmp_path / "spec.toml").write_text(MAIN_SPEC)
    main = mount(tmp_path / "spec.toml")
    # f2 fails this write and leaves service; the scrub has 10 MiB to read on each other child
    write_at(main.path("vm0.img"), 0, os.urandom(8 * MiB))
    s = Setup(main, slow)
    yield s
    s.throttle("0")  # let a commit or scrub still running finish before the unmount
    s.children_limit("0")


def test_status_shows_tree_health_and_a_running_job(setup: Setup) -> None:
    setup.start_scrub()
    result = setup.fusedisk("status", "--json", setup.main.mountpoint)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    vm0, vm1 = doc["disks"]["vm0"], doc["disks"]["vm1"]
    assert vm0["size"] == int(setup.main.path("vm0", "size").read_text())
    assert vm0["read_only"] is False and vm0["top"] == "thr"
    assert vm0["nodes"]["q"]["driver"] == "quorum"
    assert vm0["nodes"]["q"]["children"] == {
        "children.0": "t0", "children.1": "t1", "children.2": "f2"}  # fmt: skip
    assert vm0["nodes"]["t0"]["children"] == {"file": "d0"}
    quorum = vm0["health"]["q"]
    assert quorum["state"] == "degraded"
    assert quorum["children"]["children.2"]["state"] == "failed"
    assert "injected" in quorum["children"]["children.2"]["last_error"]
    assert vm0["nodes"]["f2"]["errors"] >= 1
    scrub = vm0["tasks"]["q/scrub"]
    assert scrub["state"] == "running" and 0 < scrub["done_bytes"] < scrub["total_bytes"]
    assert scrub["eta_seconds"] > 0 and scrub["rate_bytes_per_second"] > 0
    assert vm1["job"] == {"state": "none", "kind": None, "eta_seconds": None,
                          "rate_bytes_per_second": 0}  # fmt: skip
    assert vm1["read_only"] is False and vm1["size"] == BASE_SIZE

    text = setup.fusedisk("status", setup.main.mountpoint)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    for expected in ("vm0", "q (quorum) degraded, 2 of 3 children in service",
                     "children.2: f2 (faults) failed", "children.0: t0 (throttle) healthy",
                     "file: d0 (qcow2)", "vm1 512.0 MiB", "b1 (qcow2)", "q scrub: running",
                     "ETA"):  # fmt: skip
        assert expected in out, out


def test_status_shows_the_last_commit(setup: Setup) -> None:
    setup.main.path("vm1", "snapshot").write_text("s1\n")
    write_at(setup.main.path("vm1.img"), 0, os.urandom(MiB))
    setup.main.path("vm1", "commit").write_text("\n")
    setup.main.path("vm1", "job").write_text("wait\n")
    doc = json.loads(setup.fusedisk("status", "--json", setup.main.mountpoint).stdout)
    assert doc["disks"]["vm1"]["job"]["kind"] == "commit"
    assert doc["disks"]["vm1"]["job"]["state"] == "done"
    out = setup.fusedisk("status", setup.main.mountpoint).stdout
    assert "job: commit s1: done 100.0%" in out, out


def _families(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = family.samples
    return out


def _value(samples: list, metric: str, /, **labels: str) -> float:
    found = [s.value for s in samples if s.name == metric and labels.items() <= s.labels.items()]
    assert len(found) == 1, (metric, labels, found)
    return found[0]


def test_metrics_file_parses_as_prometheus_text(setup: Setup) -> None:
    data = os.urandom(MiB)
    write_at(setup.main.path("vm0.img"), 2 * MiB, data)
    with open(setup.main.path("vm0.img"), "rb") as f:
        f.seek(2 * MiB)
        assert f.read(MiB) == data
    setup.start_commit()
    families = _families(setup.main.path("metrics").read_text())

    reqs = families["fusedisk_disk_requests"]
    assert _value(reqs, "fusedisk_disk_requests_total", disk="vm0", op="write") >= 2
    assert _value(reqs, "fusedisk_disk_requests_total", disk="vm0", op="read") >= 1
    written = _value(families["fusedisk_disk_bytes"], "fusedisk_disk_bytes_total",
                     disk="vm0", op="write")  # fmt: skip
    assert written >= 2 * MiB
    seconds = _value(families["fusedisk_disk_request_seconds"],
                     "fusedisk_disk_request_seconds_total", disk="vm0", op="write")  # fmt: skip
    assert 0 < seconds < 60
    size = _value(families["fusedisk_disk_size_bytes"], "fusedisk_disk_size_bytes", disk="vm0")
    assert size == int(setup.main.path("vm0", "size").read_text())
    in_flight = families["fusedisk_disk_in_flight"]
    assert _value(in_flight, "fusedisk_disk_in_flight", disk="vm1") >= 0

    node_writes = families["fusedisk_node_requests"]
    assert _value(node_writes, "fusedisk_node_requests_total", node="d0", op="write") >= 1
    assert _value(node_writes, "fusedisk_node_requests_total", node="t0", op="read") >= 1
    errors = families["fusedisk_node_errors"]
    assert _value(errors, "fusedisk_node_errors_total", node="f2", op="write") >= 1
    assert _value(families["fusedisk_node_info"], "fusedisk_node_info",
                  disk="vm0", node="q", driver="quorum", parent="crypt") == 1  # fmt: skip

    states = families["fusedisk_node_child_state"]
    assert _value(states, "fusedisk_node_child_state", node="q", child="children.2",
                  child_node="f2", state="failed") == 1  # fmt: skip
    assert _value(states, "fusedisk_node_child_state", node="q", child="children.0",
                  state="healthy") == 1  # fmt: skip
    assert _value(families["fusedisk_node_state"], "fusedisk_node_state", node="q",
                  state="degraded") == 1  # fmt: skip
    child_errors = families["fusedisk_node_child_write_errors"]
    assert _value(child_errors, "fusedisk_node_child_write_errors", child="children.2") >= 1

    assert _value(families["fusedisk_disk_job_running"], "fusedisk_disk_job_running",
                  disk="vm1", kind="commit") == 1  # fmt: skip
    progress = _value(families["fusedisk_disk_job_progress_ratio"],
                      "fusedisk_disk_job_progress_ratio", disk="vm1")  # fmt: skip
    assert 0 < progress < 1
    assert _value(families["fusedisk_disk_job_state"], "fusedisk_disk_job_state",
                  disk="vm1", state="running") == 1  # fmt: skip
    assert _value(families["fusedisk_driver_quorum_losses"], "fusedisk_driver_quorum_losses",
                  node="q") == 0  # fmt: skip
    shared = families["fusedisk_shared_requests"]  # the throttle groups' counters
    assert _value(shared, "fusedisk_shared_requests", section="throttle-groups", name="g") >= 2
    assert _value(shared, "fusedisk_shared_requests", section="throttle-groups",
                  name="children") >= 1  # fmt: skip


def test_top_reports_rates_as_plain_text(setup: Setup) -> None:
    stop = threading.Event()

    def reader() -> None:
        fd = os.open(setup.main.path("vm0.img"), os.O_RDONLY)
        try:
            while not stop.is_set():
                os.pread(fd, 65536, 0)
        finally:
            os.close(fd)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        result = setup.fusedisk("top", "-n", "2", "-i", "0.5", setup.main.mountpoint)
    finally:
        stop.set()
        thread.join()
    assert result.returncode == 0, result.stderr
    reports = [r for r in result.stdout.split("\n\n") if r.strip()]
    assert len(reports) == 2
    for report in reports:
        lines = report.splitlines()
        assert lines[0].endswith(str(setup.main.mountpoint))
        assert lines[1].split() == ["device", "r/s", "rMB/s", "r_ms", "w/s", "wMB/s", "w_ms",
                                    "f/s", "err/s", "inflight"]  # fmt: skip
        rows = {line.split()[0]: line.split() for line in lines[2:]}
        assert {"vm0", "vm1", "thr", "q", "t0", "f2", "d0.file", "b1"} <= set(rows)
        assert "\x1b" not in report  # no terminal codes when stdout is a pipe
    rows = _top_rows(reports[-1].splitlines()[2:])
    assert rows["vm0"]["r/s"] > 0 and rows["vm0"]["rMB/s"] > 0
    assert rows["d0"]["r/s"] > 0  # the reads reached the quorum's children
    assert rows["f2"]["r/s"] == 0  # ... but not the failed one
    assert math.isfinite(rows["vm0"]["r_ms"]) and rows["vm1"]["w/s"] == 0


def _top_rows(lines: list[str]) -> dict[str, dict[str, float]]:
    """`  d0 (qcow2)  1.0 ...` -> {"d0": {"r/s": 1.0, ...}}."""
    columns = ["r/s", "rMB/s", "r_ms", "w/s", "wMB/s", "w_ms", "f/s", "err/s", "inflight"]
    out = {}
    for line in lines:
        words = [w for w in line.split() if not w.startswith("(")]
        out[words[0]] = dict(zip(columns, map(float, words[1:]), strict=True))
    return out


def test_job_wait_follows_a_commit_to_its_end(setup: Setup) -> None:
    setup.start_commit()
    once = setup.fusedisk("job", setup.main.path("vm1"))
    assert once.returncode == 0 and "commit" in once.stdout and "running" in once.stdout
    follower = subprocess.Popen(
        [sys.executable, "-m", "fusedisk", "job", "--wait", "-i", "0.2", setup.main.path("vm1")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert follower.stdout is not None
        first = follower.stdout.readline()  # it follows the running commit ...
        assert follower.poll() is None
        setup.throttle("0")  # ... to its end
        rest, err = follower.communicate(timeout=60)
        out = first + rest
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0, err
    lines = out.splitlines()
    assert "running" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("commit") and ": done 100.0%" in lines[-1], lines[-1]
    assert setup.job()["state"] == "done"


def _on_a_terminal(*args: object, timeout: float = 60) -> tuple[int, str]:
    """Run `fusedisk ARGS` with a pseudo-terminal as stdout: its exit status and output.

    The terminal is the test's own, whatever the caller's: 120 x 40 and TERM=xterm
    (rich draws a "dumb" terminal 80 columns wide, whatever COLUMNS says).
    """
    import fcntl
    import pty
    import struct
    import termios

    main_fd, tty = pty.openpty()
    fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "120", "LINES": "40"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusedisk", *map(str, args)],
        stdout=tty, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    os.close(tty)
    chunks = []
    try:
        while True:
            try:
                data = os.read(main_fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        status = proc.wait(timeout=timeout)
    finally:
        os.close(main_fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, b"".join(chunks).decode(errors="replace")


def test_terminal_modes_draw_a_table_and_a_progress_bar(setup: Setup) -> None:
    status, out = _on_a_terminal("top", "-n", "2", "-i", "0.3", setup.main.mountpoint)
    assert status == 0, out
    assert "fusedisk top" in out and "r_ms" in out and "d0.file (file)" in out
    assert "\x1b[" in out  # redrawn in place
    scrub = setup.start_scrub()
    setup.children_limit("0")
    status, out = _on_a_terminal("job", "--wait", "-i", "0.1", scrub)
    assert status == 0, out
    assert "scrub: done 100.0%" in out and "━" in out  # the bar, then the final line


def test_job_exits_non_zero_when_the_job_failed(setup: Setup) -> None:
    setup.main.path("vm1", "snapshot").write_text("s1\n")
    write_at(setup.main.path("vm1.img"), 0, os.urandom(MiB))
    setup.slow.path("base", "nodes", "bad", "options", "error-writes").write_text("true\n")
    setup.main.path("vm1", "commit").write_text("\n")  # starts; fails in the background
    try:
        result = setup.fusedisk("job", "--wait", "-i", "0.1", setup.main.path("vm1"))
    finally:
        setup.slow.path("base", "nodes", "bad", "options", "error-writes").write_text("false\n")
    assert setup.job()["state"] == "failed"
    assert result.returncode == 1, result.stdout
    assert result.stdout.startswith("commit s1: failed"), result.stdout
    assert "Input/output error" in result.stdout  # the base's host file failed the write


def test_job_follows_a_quorum_scrub(setup: Setup) -> None:
    scrub = setup.start_scrub()
    follower = subprocess.Popen(
        [sys.executable, "-m", "fusedisk", "job", "--wait", "-i", "0.2", scrub],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert follower.stdout is not None
        first = follower.stdout.readline()
        assert follower.poll() is None
        setup.children_limit("0")
        rest, err = follower.communicate(timeout=60)
        out = first + rest
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("scrub: running") and "ETA" in lines[0]
    assert lines[-1].startswith("scrub: done 100.0%")


def test_a_replace_followed_to_its_end_heals_the_quorum(setup: Setup) -> None:
    replace = setup.main.path("vm0", "nodes", "q", "replace")
    replace.write_text("children.2 spare\n")  # the failed child, for the spec's spare
    result = setup.fusedisk("job", "--wait", "-i", "0.1", replace)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("replace: done 100.0%")
    doc = json.loads(setup.fusedisk("status", "--json", setup.main.mountpoint).stdout)
    vm0 = doc["disks"]["vm0"]
    assert vm0["nodes"]["q"]["children"]["children.2"] == "spare"
    assert vm0["health"]["q"]["state"] == "healthy"
    assert vm0["health"]["q"]["children"]["children.2"]["state"] == "healthy"
    assert vm0["tasks"]["q/replace"]["state"] == "done"
    text = setup.fusedisk("status", setup.main.mountpoint).stdout
    assert "q (quorum) healthy, 3 of 3 children in service" in text, text
    assert "children.2: spare (qcow2) healthy" in text, text


def test_not_a_mount_is_a_clear_error(tmp_path: Path) -> None:
    for command in ("status", "top"):
        result = subprocess.run(
            [sys.executable, "-m", "fusedisk", command, str(tmp_path)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 1
        assert f"'{tmp_path}' is not a fusedisk mount" in result.stderr
