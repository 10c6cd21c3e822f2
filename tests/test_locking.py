"""Image locking: fusedisk and QEMU refuse each other's in-use images as two QEMUs do.

Through the real CLI and mount, with qemu-io and qemu-img on the other side
(docs/security.md, docs/drivers/file.md option `locking`).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import cli, make_image, raw_spec, write_at
from tests.mounting import Mount, MountError
from tests.qcow2_helpers import create, needs_qemu, qemu_img

pytestmark = [needs_qemu, pytest.mark.mount, pytest.mark.timeout(60)]

QCOW2_SPEC = """
[nodes.d0]
driver = "qcow2"
file = {{ driver = "file", filename = "d0.qcow2"{file_options} }}
{node_options}

[disks.vm0]
node = "d0"
"""


@contextmanager
def qemu_holding(image: Path, *args: str) -> Iterator[None]:
    """qemu-io with `image` open (and locked) until the block ends."""
    proc = subprocess.Popen(
        ["qemu-io", *args, str(image)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("help\n")  # answered once the image is open
        proc.stdin.flush()
        assert proc.stdout.readline(), "qemu-io did not open the image"
        yield
    finally:
        proc.kill()
        proc.wait()


def qemu_io_rc(image: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", *args, str(image)], capture_output=True, text=True)


@pytest.fixture
def qcow2_spec(tmp_path: Path, write_spec: Callable[..., Path]) -> Callable[..., Path]:
    create(tmp_path / "d0.qcow2", "16M")

    def make(file_options: str = "", node_options: str = "") -> Path:
        return write_spec(QCOW2_SPEC.format(file_options=file_options, node_options=node_options))

    return make


def test_second_mount_of_the_same_spec_is_refused(
    qcow2_spec: Callable[..., Path], mount: Callable[..., Mount]
) -> None:
    spec = qcow2_spec()
    m = mount(spec)
    write_at(m.path("vm0.img"), 0, b"first" * 100)
    with pytest.raises(MountError) as err:
        mount(spec, "mnt2")
    text = str(err.value)
    assert "node 'd0.file': option 'filename'" in text and 'Failed to get "write" lock' in text
    assert "Traceback" not in text
    # the first mount still serves, and its data is intact
    assert m.path("vm0.img").read_bytes()[:500] == b"first" * 100


def test_qemu_refuses_an_image_fusedisk_has_open(
    tmp_path: Path, qcow2_spec: Callable[..., Path], mount: Callable[..., Mount]
) -> None:
    image = tmp_path / "d0.qcow2"
    mount(qcow2_spec())
    rw = qemu_io_rc(image, "-f", "qcow2", "-c", "write 0 512")
    assert rw.returncode != 0 and 'Failed to get "write" lock' in rw.stderr
    # read-only without -U is refused too (the image is being written), as between QEMUs
    info = qemu_img("info", image, ok=(1,))
    assert "Failed to get shared" in info.stderr
    qemu_img("info", "-U", image)  # force-share still reads it


def test_qemu_refuses_a_raw_image_fusedisk_has_open(
    tmp_path: Path, write_spec: Callable[..., Path], mount: Callable[..., Mount]
) -> None:
    image = make_image(tmp_path / "d0.img", 1 << 20)
    mount(write_spec(raw_spec()))
    rw = qemu_io_rc(image, "-f", "raw", "-c", "write 0 512")
    assert rw.returncode != 0 and 'Failed to get "write" lock' in rw.stderr


def test_fusedisk_refuses_an_image_qemu_has_open(
    tmp_path: Path, qcow2_spec: Callable[..., Path]
) -> None:
    image = tmp_path / "d0.qcow2"
    spec = qcow2_spec()
    (tmp_path / "m").mkdir()
    with qemu_holding(image, "-f", "qcow2"):
        for command in (("check", spec), ("mount", spec, tmp_path / "m")):
            result = cli(*command)
            assert result.returncode == 1, result
            assert "node 'd0.file': option 'filename'" in result.stderr
            assert "Failed to get" in result.stderr and '"write" lock' in result.stderr
            assert "Traceback" not in result.stderr
    ro = qcow2_spec(file_options=", read-only = true")
    with qemu_holding(image, "-f", "qcow2"):
        result = cli("check", ro)
        assert result.returncode == 1 and 'shared "write" lock' in result.stderr


def test_read_only_opens_coexist(
    tmp_path: Path, qcow2_spec: Callable[..., Path], mount: Callable[..., Mount]
) -> None:
    image = tmp_path / "d0.qcow2"
    spec = qcow2_spec(node_options="read-only = true")
    mount(spec)
    mount(spec, "mnt2")
    qemu_img("info", image)
    assert qemu_io_rc(image, "-r", "-f", "qcow2", "-c", "read 0 512").returncode == 0
    with qemu_holding(image, "-r", "-f", "qcow2"):
        assert cli("check", spec).returncode == 0
    rw = qemu_io_rc(image, "-f", "qcow2", "-c", "write 0 512")
    assert rw.returncode != 0 and 'Failed to get "write" lock' in rw.stderr


def test_locking_off_opens_an_image_in_use(
    tmp_path: Path, qcow2_spec: Callable[..., Path], mount: Callable[..., Mount]
) -> None:
    image = tmp_path / "d0.qcow2"
    spec = qcow2_spec(file_options=', locking = "off"', node_options="read-only = true")
    with qemu_holding(image, "-f", "qcow2"):
        assert cli("check", spec).returncode == 0
        m = mount(spec)
        assert (m.path("vm0", "nodes", "d0.file", "options", "locking").read_text().strip()
                == "off")  # fmt: skip


def test_locking_option_is_checked(qcow2_spec: Callable[..., Path]) -> None:
    result = cli("check", qcow2_spec(file_options=', locking = "maybe"'))
    assert result.returncode == 1
    assert "option 'locking'" in result.stderr and "Traceback" not in result.stderr


def test_a_snapshot_base_takes_read_only_locks(
    tmp_path: Path, qcow2_spec: Callable[..., Path], mount: Callable[..., Mount]
) -> None:
    """As after QEMU's snapshot (the base reopened read-only): others may read the base,
    nobody may write it, and the new overlay is locked read-write."""
    m = mount(qcow2_spec())
    m.path("vm0", "snapshot").write_text("s1\n")
    base, overlay = tmp_path / "d0.qcow2", tmp_path / "d0.s1.qcow2"
    qemu_img("info", base)  # no -U needed any more
    rw = qemu_io_rc(base, "-f", "qcow2", "-c", "write 0 512")
    assert rw.returncode != 0 and 'Failed to get "write" lock' in rw.stderr
    rw = qemu_io_rc(overlay, "-f", "qcow2", "-c", "write 0 512")
    assert rw.returncode != 0 and 'Failed to get "write" lock' in rw.stderr
    write_at(m.path("vm0.img"), 0, b"after" * 100)  # the disk still writes


def test_check_of_a_mounted_spec_is_refused_unless_force_share(
    qcow2_spec: Callable[..., Path], mount: Callable[..., Mount]
) -> None:
    spec = qcow2_spec()
    m = mount(spec)
    write_at(m.path("vm0.img"), 0, b"x" * 4096)
    refused = cli("check", spec)
    assert refused.returncode == 1 and 'Failed to get shared "write" lock' in refused.stderr
    shared = cli("check", "-U", spec)
    assert shared.returncode in (0, 3), shared.stdout + shared.stderr  # in use: leaks at most
    assert "d0 (qcow2" in shared.stdout


def test_a_committed_base_is_locked_read_write_again(
    tmp_path: Path, qcow2_spec: Callable[..., Path], mount: Callable[..., Mount]
) -> None:
    m = mount(qcow2_spec())
    m.path("vm0", "snapshot").write_text("s1\n")
    write_at(m.path("vm0.img"), 0, b"into the overlay" * 64)
    m.path("vm0", "commit").write_text("\n")
    m.path("vm0", "job").write_text("wait\n")  # returns when the job has ended
    base = tmp_path / "d0.qcow2"
    rw = qemu_io_rc(base, "-f", "qcow2", "-c", "write 0 512")
    assert rw.returncode != 0 and 'Failed to get "write" lock' in rw.stderr
    assert "Failed to get shared" in qemu_img("info", base, ok=(1,)).stderr
    write_at(m.path("vm0.img"), 4096, b"after the commit" * 64)
