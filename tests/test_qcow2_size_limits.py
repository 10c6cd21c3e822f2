"""qcow2's size limits: refused with a sentence before any table is built (issue 25).

`truncate -s 1E vm0.img` on a growable qcow2 disk built a 16 GiB L1 table in
memory and the kernel killed the daemon, taking every disk of the mount with it.
QEMU caps the L1 table at 32 MiB (2 PiB of virtual size with 64 KiB clusters) and
the refcount table at 8 MiB; fusedisk refuses the same sizes (EFBIG through the
mount, a sentence naming the node in the log).  The mount test runs the daemon
under an address-space limit, so a regression fails with MemoryError instead of
taking the machine's memory.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess

import pytest

from fusedisk.errors import TooLarge
from fusedisk.formats.qcow2.layout import MAX_L1_BYTES, MAX_REFTABLE_BYTES
from tests.conftest import cli
from tests.qcow2_helpers import MiB, assert_clean, create, needs_qemu, opened, qemu_img

pytestmark = [needs_qemu, pytest.mark.timeout(120)]

PiB = 1 << 50
EiB = 1 << 60
#: the largest virtual size of a 64 KiB-cluster image: 4 Mi L1 entries x 8192 x 64 KiB
MAX_64K = (MAX_L1_BYTES // 8) * 8192 * 65536


def test_create_refuses_what_qemu_refuses(tmp_path) -> None:
    for size in ("1E", "3P", str(MAX_64K + 65536)):
        result = cli("create", "-f", "qcow2", tmp_path / "x.qcow2", size)
        assert result.returncode != 0
        assert "too large for qcow2 with 65536-byte clusters" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "x.qcow2").exists()
        refused = qemu_img("create", "-f", "qcow2", tmp_path / "q.qcow2", size, ok=(1,))
        assert "too large" in refused.stderr
    # a larger cluster size allows more, as in QEMU
    result = cli("create", "-f", "qcow2", "-o", "cluster_size=2M", tmp_path / "big.qcow2", "1E")
    assert result.returncode == 0, result.stderr
    info = qemu_img("info", "--output=json", tmp_path / "big.qcow2").stdout
    assert f'"virtual-size": {EiB}' in info


def _limit_address_space(pid: int, headroom: int = 2 << 30) -> None:
    """The daemon may map at most `headroom` more bytes than it has now."""
    with open(f"/proc/{pid}/status") as f:
        vm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = vm_kib * 1024 + headroom
    resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))


@pytest.mark.mount
def test_truncate_to_an_exabyte_is_refused_and_the_mount_lives(tmp_path, mount, write_spec):
    image = create(tmp_path / "d0.qcow2", 64 * MiB)
    spec = write_spec(
        f'[nodes.d0]\ndriver = "qcow2"\nfilename = "{image}"\n'
        '[disks.vm0]\nnode = "d0"\ngrowable = true\n'
    )
    m = mount(spec)
    assert m.proc is not None
    _limit_address_space(m.proc.pid)
    disk = m.path("vm0.img")
    for size in ("1E", "3P"):
        result = subprocess.run(["truncate", "-s", size, str(disk)], capture_output=True, text=True)
        assert result.returncode != 0
        assert "File too large" in result.stderr  # EFBIG
    with pytest.raises(OSError) as e:
        os.truncate(disk, EiB)
    assert e.value.errno == errno.EFBIG
    assert m.proc.poll() is None  # alive
    assert os.path.getsize(disk) == 64 * MiB
    assert "node 'd0': a virtual size of" in m.log
    assert "too large for qcow2" in m.path("last-error").read_text()
    subprocess.run(["truncate", "-s", "1T", str(disk)], check=True)  # within the limit: grows
    assert os.path.getsize(disk) == 1 << 40
    m.stop()
    assert_clean(image)


async def test_the_refcount_table_stops_at_qemus_limit(tmp_path) -> None:
    """Growth past 8 MiB of refcount table is refused before anything is allocated."""
    image = create(tmp_path / "d0.qcow2", MiB)
    async with opened(image) as (_graph, _disk, node):
        refs = node.image.refs  # type: ignore[attr-defined]
        with pytest.raises(TooLarge) as e:
            await refs._grow(MAX_REFTABLE_BYTES // 8, set())
        assert "refcount table larger than QEMU's limit of 8 MiB" in str(e.value)
        assert len(refs.table) * 8 < MAX_REFTABLE_BYTES
    assert_clean(image)
