"""Overlay names stay bounded and unique on long snapshot chains (graph/naming.py),
chains named by the old scheme still open, and a refused snapshot is one sentence."""

from __future__ import annotations

import errno
import itertools
import json
import os
import subprocess

import pytest

from tests.conftest import needs, read_at, run, write_at

pytestmark = [pytest.mark.mount, pytest.mark.timeout(300), needs("qemu-img", "qemu-io")]

MiB = 1 << 20
CHUNK = 64 << 10
SNAPSHOTS = 42


def qemu_img(*args: object) -> str:
    return run("qemu-img", *args)


def spec_of(driver: str, image: str) -> str:
    return f"""
[nodes.d0]
driver = "{driver}"
filename = "images/{image}"

[disks.vm0]
node = "d0"
"""


QUORUM = """
[nodes.q]
driver = "quorum"
children = ["d0", "d1", "d2"]
vote-threshold = 2

[nodes.d0]
driver = "qcow2"
filename = "images/d0.qcow2"

[nodes.d1]
driver = "raw"
filename = "images/d1.img"

[nodes.d2]
driver = "qcow2"
filename = "images/d2.qcow2"

[disks.vm0]
node = "q"
"""


def make_images(tmp_path, names: list[str]):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in names:
        fmt = "raw" if name.endswith(".img") else "qcow2"
        qemu_img("create", "-q", "-f", fmt, folder / name, "8M")
    return folder


def marker(i: int) -> bytes:
    return bytes([i + 1]) * CHUNK


def take_many(m, count: int) -> None:
    """Write a marker, then snapshot, `count` times: marker i lands in layer i."""
    for i in range(count):
        write_at(m.path("vm0.img"), i * CHUNK, marker(i))
        m.path("vm0", "snapshot").write_text(f"hourly-2026-12-{i:03d}\n")


def check_markers(disk, count: int) -> None:
    for i in range(count):
        assert read_at(disk, i * CHUNK, CHUNK) == marker(i), f"marker {i}"


def check_chain(top, length: int) -> None:
    qemu_img("check", "-q", top)
    chain = json.loads(qemu_img("info", "--output=json", "--backing-chain", top))
    assert len(chain) == length


def longest_name(folder) -> int:
    return max(len(p.name.encode()) for p in folder.iterdir())


@pytest.mark.parametrize("image", ["d0.img", "d0.qcow2"])
def test_forty_snapshots_in_a_row_keep_names_short(tmp_path, write_spec, mount, image):
    folder = make_images(tmp_path, [image])
    driver = "raw" if image.endswith(".img") else "qcow2"
    spec = write_spec(spec_of(driver, image))
    m = mount(spec)
    take_many(m, SNAPSHOTS)
    last = f"hourly-2026-12-{SNAPSHOTS - 1:03d}"
    assert os.readlink(m.path("vm0", "root")) == f"nodes/d0.{last}"
    lines = m.path("vm0", "snapshot").read_text().splitlines()
    assert len(lines) == SNAPSHOTS
    check_markers(m.path("vm0.img"), SNAPSHOTS)
    m.stop()
    assert longest_name(folder) == len(f"d0.{last}.qcow2")
    check_chain(folder / f"d0.{last}.qcow2", SNAPSHOTS + 1)
    m2 = mount(spec, name="mnt2")
    check_markers(m2.path("vm0.img"), SNAPSHOTS)


def test_forty_snapshots_under_a_quorum(tmp_path, write_spec, mount):
    folder = make_images(tmp_path, ["d0.qcow2", "d1.img", "d2.qcow2"])
    spec = write_spec(QUORUM)
    m = mount(spec)
    take_many(m, SNAPSHOTS)
    check_markers(m.path("vm0.img"), SNAPSHOTS)
    m.stop()
    last = f"hourly-2026-12-{SNAPSHOTS - 1:03d}"
    for i in range(3):
        check_chain(folder / f"d{i}.{last}.qcow2", SNAPSHOTS + 1)
    assert longest_name(folder) == len(f"d0.{last}.qcow2")
    m2 = mount(spec, name="mnt2")
    check_markers(m2.path("vm0.img"), SNAPSHOTS)
    assert json.loads(m2.path("vm0", "nodes", "q", "status").read_text())["state"] == "healthy"


def test_names_stay_bounded_through_commit_revert_and_stream(tmp_path, write_spec, mount):
    folder = make_images(tmp_path, ["d0.qcow2"])
    spec = write_spec(spec_of("qcow2", "d0.qcow2"))
    m = mount(spec)
    disk = m.path("vm0.img")

    def control(name: str, text: str = "") -> None:
        m.path("vm0", name).write_text(f"{text}\n")
        if name in ("commit", "stream"):
            m.path("vm0", "job").write_text("wait\n")

    take_many(m, 3)
    control("commit")  # hourly-...-002 merged into -001's overlay
    control("snapshot", "after-commit")
    control("revert")
    control("stream")  # d0.after-commit standalone: its family stays d0
    write_at(disk, 5 * CHUNK, marker(5))
    control("snapshot", "after-stream")
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0.after-stream"
    long_name = "x" * 200
    control("snapshot", long_name)
    top = os.readlink(m.path("vm0", "root")).removeprefix("nodes/")
    assert len(top.encode()) <= 3 + 48 and top.startswith("d0.xxx")
    assert long_name in m.path("vm0", "snapshot").read_text()  # listed by its whole name
    check_markers(disk, 3)
    m.stop()
    assert longest_name(folder) <= len("d0.") + 48 + len(".qcow2")
    qemu_img("check", "-q", folder / f"{top}.qcow2")
    m2 = mount(spec, name="mnt2")
    assert os.readlink(m2.path("vm0", "root")) == f"nodes/{top}"
    check_markers(m2.path("vm0.img"), 3)
    assert read_at(m2.path("vm0.img"), 5 * CHUNK, CHUNK) == marker(5)


def test_a_name_that_is_taken_gets_a_counter(tmp_path, write_spec, mount):
    folder = make_images(tmp_path, ["d0.qcow2"])
    stray = folder / "d0.s1.qcow2"
    stray.write_bytes(b"a file of the user's, not an overlay")
    spec = write_spec(spec_of("qcow2", "d0.qcow2"))
    m = mount(spec)
    m.path("vm0", "snapshot").write_text("s1\n")
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0.s1_2"
    assert "images/d0.s1_2.qcow2" in m.path("vm0", "snapshot").read_text()
    m.stop()
    assert stray.read_bytes() == b"a file of the user's, not an overlay"
    check_chain(folder / "d0.s1_2.qcow2", 2)
    mount(spec, name="mnt2")


def _old_scheme_chain(tmp_path):
    """d0.qcow2 <- d0.s1.qcow2 <- d0.s1.s2.qcow2 and their records, as fusedisk wrote
    them before names were bounded (records with no `stem`, `node-stem`, `file-driver`)."""
    folder = make_images(tmp_path, ["d0.qcow2"])
    files = ["d0.qcow2", "d0.s1.qcow2", "d0.s1.s2.qcow2"]
    for below, above in itertools.pairwise(files):
        qemu_img("create", "-q", "-f", "qcow2", "-b", below, "-F", "qcow2", folder / above)
    for i, name in enumerate(files):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {i + 1} {i * CHUNK} {CHUNK}",
                        folder / name], check=True, capture_output=True)  # fmt: skip
    changes = [
        {"op": "snapshot", "name": "s1", "time": "2026-12-01T00:00:00+0000", "disk": "vm0",
         "overlays": [{"node": "d0.s1", "base": "d0", "driver": "qcow2",
                       "filename": str(folder / "d0.s1.qcow2")}]},
        {"op": "snapshot", "name": "s2", "time": "2026-12-01T01:00:00+0000", "disk": "vm0",
         "overlays": [{"node": "d0.s1.s2", "base": "d0.s1", "driver": "qcow2",
                       "filename": str(folder / "d0.s1.s2.qcow2")}]},
    ]  # fmt: skip
    state = tmp_path / "spec.toml.state.json"
    state.write_text(json.dumps({"version": 1, "changes": changes}))
    return folder


def test_a_chain_named_by_the_old_scheme_still_opens(tmp_path, write_spec, mount):
    folder = _old_scheme_chain(tmp_path)
    spec = write_spec(spec_of("qcow2", "d0.qcow2"))
    m = mount(spec)
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0.s1.s2"
    check_markers(m.path("vm0.img"), 3)
    m.path("vm0", "snapshot").write_text("s3\n")  # the family is found through old records
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0.s3"
    write_at(m.path("vm0.img"), 3 * CHUNK, marker(3))
    names = [line.split("\t")[0] for line in m.path("vm0", "snapshot").read_text().splitlines()]
    assert names == ["s1", "s2", "s3"]
    m.path("vm0", "commit").write_text("s3\n")  # merges d0.s3 into the old d0.s1.s2
    m.path("vm0", "job").write_text("wait\n")
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0.s1.s2"
    m.stop()
    check_chain(folder / "d0.s1.s2.qcow2", 3)
    m2 = mount(spec, name="mnt2")
    check_markers(m2.path("vm0.img"), 4)


def test_an_overlong_snapshot_name_is_one_sentence(tmp_path, write_spec, mount):
    make_images(tmp_path, ["d0.qcow2"])
    m = mount(write_spec(spec_of("qcow2", "d0.qcow2")))
    with pytest.raises(OSError) as err:
        m.path("vm0", "snapshot").write_text("h" * 300 + "\n")
    assert err.value.errno == errno.EINVAL
    last = m.path("last-error").read_text()
    assert last.count("\n") == 1 and "300 characters long" in last, last
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0"
    assert "Traceback" not in m.log


def test_a_host_error_of_a_control_write_is_one_sentence(tmp_path, write_spec, mount):
    """The change log cannot be written (a folder where its temporary file goes):
    the OSError reaches the writer with its errno, and last-error and the log get
    one sentence naming the file, never a traceback."""
    folder = make_images(tmp_path, ["d0.qcow2"])
    m = mount(write_spec(spec_of("qcow2", "d0.qcow2")))
    blocker = tmp_path / "spec.toml.state.json.tmp"
    blocker.mkdir()
    (blocker / "keep").write_text("")
    with pytest.raises(OSError) as err:
        m.path("vm0", "snapshot").write_text("s1\n")
    assert err.value.errno == errno.EISDIR
    last = m.path("last-error").read_text()
    assert last.count("\n") == 1 and "vm0/snapshot: disk 'vm0': snapshot failed: " in last
    assert str(blocker) in last and "[Errno" not in last, last
    assert os.readlink(m.path("vm0", "root")) == "nodes/d0"
    assert sorted(p.name for p in folder.iterdir()) == ["d0.qcow2"]  # the overlay went again
    assert "Traceback" not in m.log and str(blocker) in m.log
