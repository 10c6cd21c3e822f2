"""Every pair of graph operations started together through a real mount, on a quorum
of three qcow2 children with a spare: each ends done or refused with an errno and a
sentence; afterwards the disk writes, the spec remounts, the data is the model's and
`qemu-img check` is clean on every image.  Then SIGKILL in the middle of each
operation: the next mount opens the graph before or after it, fsync'd data there.
(docs/operations.md is the table this checks.)"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import random
import threading
from pathlib import Path

import pytest

from tests.conftest import needs, run
from tests.mounting import Mount

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120), needs("qemu-img")]

MiB = 1 << 20
SIZE = 8 * MiB
OPS = ("snapshot", "commit", "stream", "revert", "replace", "scrub", "truncate")

SPEC = (
    """
[nodes.q]
driver = "quorum"
vote-threshold = 2
children = ["c0", "c1", "c2"]
"""
    + "".join(
        f'\n[nodes.{n}]\ndriver = "qcow2"\nfilename = "{n}.qcow2"\n'
        for n in ("c0", "c1", "c2", "spare0")
    )
    + """
[disks.vm0]
node = "q"
growable = true
"""
)


def control(path: Path, text: str) -> None:
    """One write(2), as `echo` does (a buffered file object may write again at close)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def start_op(m: Mount, op: str, tag: str) -> tuple[str, int, str]:
    """Start `op`; returns (op, 0 or the errno, the sentence: last-error for a control
    file, the log for a truncate)."""
    try:
        if op == "truncate":
            os.truncate(m.path("vm0.img"), SIZE + MiB)
        elif op == "snapshot":
            control(m.path("vm0", "snapshot"), f"s{tag}")
        elif op == "replace":
            control(m.path("vm0", "nodes", "q", "replace"), "children.1 spare0")
        elif op == "scrub":
            control(m.path("vm0", "nodes", "q", "scrub"), "")
        else:  # commit, stream, revert: of the snapshot s0 the set-up took
            control(m.path("vm0", op), "")
    except OSError as e:
        if op == "truncate":
            return op, e.errno or -1, "".join(m.log.splitlines(keepends=True)[-3:])
        return op, e.errno or -1, m.path("last-error").read_text()
    return op, 0, ""


def wait_jobs(m: Mount) -> None:
    """Wait for the disk's job; the last one must have ended well."""
    with contextlib.suppress(OSError):  # a failed job says so in its state
        m.path("vm0", "job").write_text("wait\n")
    state = json.loads(m.path("vm0", "job").read_text())
    assert state["state"] == "done", state


class Writer(threading.Thread):
    """Writes random 64 KiB blocks of the first half of the disk into a model."""

    def __init__(self, path: Path, model: bytearray) -> None:
        super().__init__()
        self.path, self.model, self.stop = path, model, threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(3)
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                while not self.stop.is_set():
                    offset = rng.randrange(SIZE // 2 // 65536) * 65536
                    data = rng.randbytes(65536)
                    os.pwrite(fd, data, offset)
                    self.model[offset : offset + 65536] = data
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:
            self.error = e


def read_disk(m: Mount) -> bytes:
    with open(m.path("vm0.img"), "rb") as f:
        return f.read()


def set_up(tmp_path: Path) -> tuple[Path, Mount, bytearray]:
    for name in ("c0", "c1", "c2", "spare0"):
        run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / f"{name}.qcow2", SIZE)
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    m = Mount(spec, tmp_path / "mnt").start()
    model = bytearray(SIZE)
    data = random.Random(1).randbytes(SIZE)
    with open(m.path("vm0.img"), "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    model[:] = data
    (tmp_path / "at-s0").write_bytes(data)
    m.path("vm0", "snapshot").write_text("s0\n")  # what commit, stream, revert act on
    head = random.Random(2).randbytes(MiB)
    with open(m.path("vm0.img"), "r+b") as f:
        f.seek(SIZE - MiB)
        f.write(head)
        f.flush()
        os.fsync(f.fileno())
    model[SIZE - MiB :] = head
    return spec, m, model


def check_images(tmp_path: Path) -> None:
    for image in sorted(tmp_path.glob("*.qcow2")):
        run("qemu-img", "check", "-q", image)


PAIRS = list(itertools.combinations_with_replacement(OPS, 2))


@pytest.mark.parametrize("writer", [False, True], ids=["idle", "writer"])
@pytest.mark.parametrize(("a", "b"), PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_two_operations_started_together(tmp_path: Path, a: str, b: str, writer: bool):
    spec, m, model = set_up(tmp_path)
    try:
        at_s0 = (tmp_path / "at-s0").read_bytes()  # what a revert to s0 gives
        w = Writer(m.path("vm0.img"), model) if writer else None
        if w is not None:
            w.start()
        results: list[tuple[str, int, str]] = []
        barrier = threading.Barrier(2)

        def go(op: str, tag: str) -> None:
            barrier.wait()
            results.append(start_op(m, op, tag))

        threads = [threading.Thread(target=go, args=(op, str(i + 1))) for i, op in
                   enumerate((a, b))]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_jobs(m)
        if w is not None:
            w.stop.set()
            w.join()
            assert w.error is None, w.error
        for op, err, why in results:
            assert err in (0, errno.EBUSY, errno.EOPNOTSUPP, errno.EINVAL), (op, err, why)
            if err == errno.EBUSY:
                assert "refused" in why and "is running" in why, why
            elif err:
                assert why.strip(), (op, err)
        if any(op == "revert" and err == 0 for op, err, _ in results) and not writer:
            model[:] = at_s0  # everything written since s0 is gone
        content = read_disk(m)
        if not (writer and any(op == "revert" for op, _, _ in results)):
            assert content == bytes(model), results
        with open(m.path("vm0.img"), "r+b") as f:  # the disk still writes
            f.write(b"after" * 100)
            f.flush()
            os.fsync(f.fileno())
        content = b"after" * 100 + content[500:]
        log = m.log
        m.stop()
        assert "Traceback" not in log, log
        check_images(tmp_path)
        m2 = Mount(spec, tmp_path / "mnt2").start()
        try:
            assert read_disk(m2) == content
        finally:
            m2.stop()
    finally:
        m.stop(check_log=False)


@pytest.mark.parametrize("op", ["snapshot", "commit", "stream", "revert", "replace", "scrub"])
def test_sigkill_in_the_middle_of_an_operation(tmp_path: Path, op: str):
    spec, m, model = set_up(tmp_path)
    try:
        w = Writer(m.path("vm0.img"), model)
        w.start()
        start_op(m, op, "1")
        w.stop.set()
        w.join()  # its writes are fsync'd: they must survive
        assert w.error is None, w.error
        m.crash()
        m2 = Mount(spec, tmp_path / "mnt2").start()
        try:
            content = read_disk(m2)
            if op != "revert":
                assert content == bytes(model)
            with open(m2.path("vm0.img"), "r+b") as f:
                f.write(b"x" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            m2.stop()
        check_images(tmp_path)  # a crashed image may leak clusters until the remount repairs it
    finally:
        m.stop(check_log=False)
