"""The quorum driver through a real mount: three qcow2 children, corrupted on the host
or failing through the `faults` driver; QEMU's tools check the images afterwards."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs, seed_filters
from tests.mounting import Mount

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120), needs("qemu-img", "qemu-io")]

MiB = 1 << 20
SIZE = 16 * MiB


def run(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if ok:
        assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}{result.stderr}"
    return result


def make_children(tmp_path: Path, names: tuple[str, ...] = ("c0", "c1", "c2")) -> None:
    """qcow2 images holding the same pattern: 0x5a in the first 4 MiB, 0xa5 at 8 MiB."""
    for name in names:
        image = str(tmp_path / f"{name}.qcow2")
        run("qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE))
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4M", "-c", "write -P 0xa5 8M 1M",
            image)  # fmt: skip


def spec(
    rewrite: bool = False,
    faulty: dict[int, str] | None = None,
    spare: bool = False,
    pattern: str = "quorum",
    quorum_options: str = "",
) -> str:
    """Three qcow2 children; child i sits below a `faults` node with rules faulty[i]."""
    faulty = faulty or {}
    out = []
    children = []
    for i in range(3):
        out.append(f'[nodes.c{i}]\ndriver = "qcow2"\nfilename = "c{i}.qcow2"\n')
        if i in faulty:
            out.append(f'[nodes.f{i}]\ndriver = "faults"\nfile = "c{i}"\n{faulty[i]}\n')
            children.append(f'"f{i}"')
        else:
            children.append(f'"c{i}"')
    if spare:
        out.append('[nodes.spare]\ndriver = "qcow2"\nfilename = "spare.qcow2"\n')
    out.append(
        f'[nodes.q]\ndriver = "quorum"\nvote-threshold = 2\nread-pattern = "{pattern}"\n'
        f"rewrite-corrupted = {'true' if rewrite else 'false'}\n"
        f"children = [{', '.join(children)}]\n{quorum_options}"
    )
    out.append('[disks.vm0]\nnode = "q"\n')
    return "\n".join(out)


def corrupt(image: Path, guest_offset: int, length: int = 100) -> None:
    """Overwrite guest bytes of a qcow2 image in its host file, behind qcow2's back."""
    mapping = json.loads(run("qemu-img", "map", "--output=json", str(image)).stdout)
    for ext in mapping:
        if ext["start"] <= guest_offset < ext["start"] + ext["length"] and ext.get("data"):
            host = ext["offset"] + guest_offset - ext["start"]
            break
    else:
        raise AssertionError(f"guest offset {guest_offset} is not allocated in {image}")
    with open(image, "r+b") as f:
        f.seek(host)
        f.write(os.urandom(length))


def status(m: Mount) -> dict[str, Any]:
    return json.loads(m.path("vm0", "nodes", "q", "status").read_text())


def read_disk(m: Mount, offset: int, length: int) -> bytes:
    fd = os.open(m.path("vm0.img"), os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def write_disk(m: Mount, offset: int, data: bytes) -> None:
    fd = os.open(m.path("vm0.img"), os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(image: Path, *commands: str) -> None:
    args = [a for c in commands for a in ("-c", c)]
    out = run("qemu-io", "-f", "qcow2", *args, str(image)).stdout
    assert "Pattern verification failed" not in out, out


def test_a_corrupted_child_is_outvoted_reported_and_rewritten(tmp_path, write_spec, mount):
    make_children(tmp_path)
    corrupt(tmp_path / "c1.qcow2", MiB + 1000)
    m = mount(write_spec(spec(rewrite=True)))
    assert read_disk(m, 0, 4 * MiB) == b"\x5a" * 4 * MiB
    st = status(m)["children"]["children.1"]
    assert st["node"] == "c1" and st["mismatches"] >= 1 and st["bytes_rewritten"] >= 100
    assert st["state"] == "degraded"
    assert status(m)["children"]["children.0"]["state"] == "healthy"
    m.stop()
    verify(tmp_path / "c1.qcow2", "read -P 0x5a 0 4M", "read -P 0xa5 8M 1M")
    run("qemu-img", "check", "-q", str(tmp_path / "c1.qcow2"))


def test_without_rewrite_the_corruption_is_reported_and_left(tmp_path, write_spec, mount):
    make_children(tmp_path)
    corrupt(tmp_path / "c2.qcow2", 8 * MiB)
    m = mount(write_spec(spec(rewrite=False)))
    assert read_disk(m, 8 * MiB, MiB) == b"\xa5" * MiB
    assert status(m)["children"]["children.2"]["mismatches"] == 1
    m.stop()
    out = run("qemu-io", "-f", "qcow2", "-c", "read -P 0xa5 8M 1M", str(tmp_path / "c2.qcow2"),
              ok=False)  # fmt: skip
    assert "Pattern verification failed" in out.stdout


def test_wrong_data_returned_once_is_counted_as_transient(tmp_path, write_spec, mount):
    make_children(tmp_path)
    rules = "corrupt-reads = true\nmax-errors = 1\nrange-start = 0\nrange-length = 4096"
    m = mount(write_spec(spec(faulty={1: rules})))
    assert read_disk(m, 0, 4096) == b"\x5a" * 4096
    child = status(m)["children"]["children.1"]
    assert child["transient_mismatches"] == 1 and child["mismatches"] == 0
    assert child["state"] == "healthy"
    assert status(m)["children"]["children.0"]["transient_mismatches"] == 0


def test_a_child_past_max_read_errors_leaves_service(tmp_path, write_spec, mount):
    """md's policy: a child that keeps returning wrong data is taken out of service, so
    it costs no more reads; the other two still agree, and writes skip it."""
    make_children(tmp_path)
    m = mount(write_spec(spec(faulty={1: "corrupt-reads = true"},
                              quorum_options="max-read-errors = 3\n")))  # fmt: skip
    for i in range(6):
        assert read_disk(m, i * 64 * 1024, 4096) == b"\x5a" * 4096
    child = status(m)["children"]["children.1"]
    assert child["state"] == "failed", child
    assert "max-read-errors = 3" in child["last_error"]
    assert status(m)["children"]["children.0"]["state"] == "healthy"
    seen = json.loads(m.path("vm0", "nodes", "f1", "stats").read_text())["read"]["ops"]
    assert read_disk(m, 0, 4096) == b"\x5a" * 4096
    assert json.loads(m.path("vm0", "nodes", "f1", "stats").read_text())["read"]["ops"] == seen


def test_a_child_failing_every_request_leaves_service(tmp_path, write_spec, mount):
    make_children(tmp_path)
    rules = "error-reads = true\nerror-writes = true\nerror-flushes = true\nerror-zeroes = true"
    m = mount(write_spec(spec(faulty={1: rules})))
    assert read_disk(m, 0, MiB) == b"\x5a" * MiB
    data = os.urandom(MiB)
    write_disk(m, 2 * MiB, data)
    assert read_disk(m, 2 * MiB, MiB) == data
    st = status(m)
    assert st["state"] == "degraded" and st["children_in_service"] == 2
    child = st["children"]["children.1"]
    assert child["state"] == "failed" and child["node"] == "f1"
    assert child["read_errors"] >= 1 and child["write_errors"] >= 1
    m.stop()
    for name in ("c0", "c2"):
        assert run("qemu-img", "compare", "-q", str(tmp_path / "c0.qcow2"),
                   str(tmp_path / f"{name}.qcow2")).returncode == 0  # fmt: skip


@pytest.mark.parametrize(
    "rules",
    ["error-reads = true", "corrupt-reads = true"],
    ids=["errors", "corruption"],
)
def test_two_of_three_children_failing_gives_eio_never_wrong_data(
    tmp_path, write_spec, mount, rules
):
    make_children(tmp_path)
    faulty = {0: f"{rules}\nseed = 1", 2: f"{rules}\nseed = 2"}
    m = mount(write_spec(spec(faulty=faulty)))
    fd = os.open(m.path("vm0.img"), os.O_RDONLY)
    try:
        for offset in (0, 3 * MiB, 8 * MiB):
            with pytest.raises(OSError) as err:
                os.pread(fd, 65536, offset)
            assert err.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert status(m)["quorum_losses"] >= 3
    assert "quorum lost: read 0+65536" in m.log


def test_scrub_repairs_a_corruption_no_read_touched(tmp_path, write_spec, mount):
    make_children(tmp_path)
    corrupt(tmp_path / "c2.qcow2", 2 * MiB + 4096, 4096)
    corrupt(tmp_path / "c0.qcow2", 8 * MiB + 512 * 1024, 10)
    m = mount(write_spec(spec(rewrite=False)))
    scrub = m.path("vm0", "nodes", "q", "scrub")
    assert json.loads(scrub.read_text())["state"] == "never run"
    scrub.write_text("wait\n")  # returns when the scrub is over
    report = json.loads(scrub.read_text())
    assert report["state"] == "done" and report["progress"] == 1.0
    assert report["mismatched_ranges"] == 2 and report["unrecoverable"] == []
    st = status(m)["children"]
    assert st["children.2"]["mismatches"] == 1 and st["children.0"]["mismatches"] == 1
    assert st["children.1"]["mismatches"] == 0
    m.stop()
    for name in ("c0", "c1", "c2"):
        verify(tmp_path / f"{name}.qcow2", "read -P 0x5a 0 4M", "read -P 0xa5 8M 1M")


@needs("fio")
def test_replace_a_failed_child_while_fio_writes(tmp_path, write_spec, mount):
    make_children(tmp_path)
    run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "spare.qcow2"), str(SIZE))
    rules = "error-reads = true\nerror-writes = true\nerror-flushes = true\nerror-zeroes = true"
    m = mount(write_spec(spec(faulty={1: rules}, spare=True)))
    q = m.path("vm0", "nodes", "q")
    write_disk(m, 0, b"x" * 4096)  # the failing child leaves service
    assert status(m)["children"]["children.1"]["state"] == "failed"
    fio = subprocess.Popen(
        ["fio", "--name=w", f"--filename={m.path('vm0.img')}", "--ioengine=libaio",
         "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=8", f"--size={SIZE}",
         "--io_size=8M", "--randrepeat=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        stats = m.path("vm0", "stats")
        before = json.loads(stats.read_text())["write"]["ops"]
        deadline = time.monotonic() + 30
        while json.loads(stats.read_text())["write"]["ops"] == before and fio.poll() is None:
            assert time.monotonic() < deadline, "fio did not start writing"
            time.sleep(0.01)  # start the replacement once fio is writing
        (q / "replace").write_text("children.1 spare\n")  # returns once started
        deadline = time.monotonic() + 90
        while json.loads((q / "replace").read_text())["state"] == "running":
            assert time.monotonic() < deadline, "the resync did not end"
            time.sleep(0.1)
        out, _ = fio.communicate(timeout=90)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, out
    report = json.loads((q / "replace").read_text())
    assert report["state"] == "done", report
    assert report["old"] == "f1" and report["new"] == "spare"
    st = status(m)
    assert st["state"] == "healthy", st
    assert st["children"]["children.1"]["node"] == "spare"
    assert os.readlink(q / "children" / "children.1") == "../../spare"
    assert "f1" not in os.listdir(m.path("vm0", "nodes"))
    m.stop()
    c0 = str(tmp_path / "c0.qcow2")
    for name in ("c2", "spare"):
        result = run("qemu-img", "compare", c0, str(tmp_path / f"{name}.qcow2"), ok=False)
        assert result.returncode == 0, result.stdout + result.stderr
    run("qemu-img", "check", "-q", str(tmp_path / "spare.qcow2"))
    # The replacement is durable: the next mount opens the spare, not the failed child.
    m2 = mount(tmp_path / "spec.toml", name="mnt2")
    assert os.readlink(m2.path("vm0", "nodes", "q", "children", "children.1")) == "../../spare"
    assert status(m2)["state"] == "healthy"


def test_each_child_lists_its_siblings(tmp_path, write_spec, mount):
    make_children(tmp_path)
    m = mount(write_spec(spec()))
    nodes = m.path("vm0", "nodes")
    for i in range(3):
        siblings = sorted(os.listdir(nodes / f"c{i}" / "siblings"))
        assert siblings == [f"c{j}" for j in range(3) if j != i]
        for name in siblings:
            assert (nodes / f"c{i}" / "siblings" / name).resolve() == (nodes / name).resolve()
    assert sorted(os.listdir(nodes / "q" / "children")) == [
        "children.0", "children.1", "children.2"
    ]  # fmt: skip
    assert {"status", "scrub", "replace"} <= set(os.listdir(nodes / "q"))


SEED_TREE = seed_filters(["d0", "d1", "d2"], "rewrite-corrupted = true\n") + "".join(
    f'[nodes.d{i}]\ndriver = "qcow2"\nfile = {{ driver = "file", filename = "d{i}.qcow2" }}\n'
    for i in range(3)
)


@needs("losetup", "mkfs.ext4", "fsck.ext4")
def test_the_seed_tree_carries_an_ext4_file_system(tmp_path, write_spec, mount):
    """throttle -> luks -> quorum -> 3 x qcow2 -> 3 x file, mkfs and fsck through a loop device."""
    for i in range(3):
        run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / f"d{i}.qcow2"), "64M")
    (tmp_path / "key").write_bytes(b"seed tree passphrase")
    m = mount(write_spec(SEED_TREE))
    loop = run("losetup", "--find", "--show", str(m.path("vm0.img"))).stdout.strip()
    try:
        run("mkfs.ext4", "-q", "-F", loop)
        run("fsck.ext4", "-f", "-n", loop)
    finally:
        subprocess.run(["losetup", "-d", loop])
    assert status(m)["state"] == "healthy"
    assert status(m)["children"]["children.0"]["mismatches"] == 0
    m.stop()
    d0 = str(tmp_path / "d0.qcow2")
    for i in range(3):
        run("qemu-img", "check", "-q", str(tmp_path / f"d{i}.qcow2"))
    for i in (1, 2):
        run("qemu-img", "compare", "-q", d0, str(tmp_path / f"d{i}.qcow2"))
