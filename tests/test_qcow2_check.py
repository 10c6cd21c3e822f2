"""`fusedisk check` finds what `qemu-img check` finds on corrupt qcow2 images (refcount
errors, leaks, COPIED flags, overlaps), and the overlap check keeps a write from
destroying metadata whose refcount says free (before: an image whose L1 cluster had
refcount 0 passed `fusedisk check`, and the first allocating write overwrote the L1)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import cli, write_at
from tests.mounting import Mount
from tests.qcow2_helpers import create, header_field, needs_qemu, patch, qemu_io

pytestmark = [needs_qemu, pytest.mark.timeout(90)]

CS = 65536
SPEC = """
[nodes.d0]
driver = "qcow2"
filename = "img.qcow2"

[disks.vm0]
node = "d0"
"""


def image_with_data(d: Path) -> Path:
    image = create(d / "img.qcow2", "8M")
    qemu_io(image, "write -P 0x11 0 192k", "write -P 0x22 4M 64k")
    return image


def l1_cluster(image: Path) -> int:
    return header_field(image, 40, ">Q") // CS


def l2_cluster(image: Path) -> int:
    return (header_field(image, header_field(image, 40, ">Q"), ">Q") & 0x00FF_FFFF_FFFF_FE00) // CS


def data_cluster(image: Path) -> int:
    l2 = l2_cluster(image) * CS
    return (header_field(image, l2, ">Q") & 0x00FF_FFFF_FFFF_FE00) // CS


def refblock(image: Path) -> int:
    return header_field(image, header_field(image, 48, ">Q"), ">Q")


def set_refcount(image: Path, cluster: int, value: int) -> None:
    patch(image, refblock(image) + 2 * cluster, ">H", value)


def l1_refcount_zero(image: Path) -> None:
    set_refcount(image, l1_cluster(image), 0)


def l2_refcount_zero(image: Path) -> None:
    set_refcount(image, l2_cluster(image), 0)


def refblock_refcount_zero(image: Path) -> None:
    set_refcount(image, refblock(image) // CS, 0)


def data_refcount_zero(image: Path) -> None:
    set_refcount(image, data_cluster(image), 0)


def data_refcount_two(image: Path) -> None:
    set_refcount(image, data_cluster(image), 2)


def leaked_clusters(image: Path) -> None:
    end = os.path.getsize(image) // CS
    os.truncate(image, (end + 3) * CS)
    for c in range(end, end + 3):
        set_refcount(image, c, 1)


def copied_flag_missing(image: Path) -> None:
    l2 = l2_cluster(image) * CS
    patch(image, l2, ">Q", header_field(image, l2, ">Q") & ~(1 << 63))


def data_on_the_l1_table(image: Path) -> None:
    patch(image, l2_cluster(image) * CS + 8, ">Q", (1 << 63) | l1_cluster(image) * CS)


CASES = [
    ("clean", lambda image: None),
    ("l1_refcount_zero", l1_refcount_zero),
    ("l2_refcount_zero", l2_refcount_zero),
    ("refblock_refcount_zero", refblock_refcount_zero),
    ("data_refcount_zero", data_refcount_zero),
    ("data_refcount_two", data_refcount_two),
    ("leaked_clusters", leaked_clusters),
    ("copied_flag_missing", copied_flag_missing),
    ("data_on_the_l1_table", data_on_the_l1_table),
]


def qemu_check(image: Path) -> tuple[int, dict[str, int]]:
    proc = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                          capture_output=True, text=True)  # fmt: skip
    report = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return proc.returncode, report


@pytest.mark.parametrize(("name", "damage"), CASES, ids=[c[0] for c in CASES])
def test_fusedisk_check_agrees_with_qemu_img_check(
    tmp_path: Path, write_spec: Callable[..., Path], name: str, damage: Callable[[Path], None]
) -> None:
    image = image_with_data(tmp_path)
    damage(image)
    before = image.read_bytes()
    qemu_rc, qemu = qemu_check(image)
    ours = cli("check", write_spec(SPEC), timeout=60)
    assert "Traceback" not in ours.stderr
    assert ours.returncode == qemu_rc, (
        f"qemu-img: {qemu_rc} {qemu}\nfusedisk:\n{ours.stdout}{ours.stderr}"
    )
    if qemu_rc == 3:
        assert "leak: ... and" in ours.stdout or ours.stdout.count("leak: ") == qemu["leaks"]
    if qemu_rc == 2 and "status: corrupt" in ours.stdout:  # else refused at open, named
        assert ours.stdout.count("error: ") == qemu["corruptions"], ours.stdout
    elif qemu_rc == 2:
        assert "overlaps metadata" in ours.stderr
    assert image.read_bytes() == before  # check writes nothing


@pytest.mark.mount
def test_a_write_never_lands_on_an_l1_table_whose_refcount_says_free(
    tmp_path: Path, write_spec: Callable[..., Path], mount: Callable[..., Mount]
) -> None:
    image = image_with_data(tmp_path)
    l1_refcount_zero(image)
    m = mount(write_spec(SPEC))
    with pytest.raises(OSError):
        write_at(m.path("vm0.img"), 2 * 1024 * 1024, b"x" * CS)  # needs a new cluster
    assert "overlap" in m.log or "holds metadata" in m.log
    m.stop(check_log=False)
    # the L1 table and the old data are intact: qemu-io reads what was written
    out = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x11 0 192k",
                          "-c", "read -P 0x22 4M 64k", str(image)],
                         capture_output=True, text=True).stdout  # fmt: skip
    assert "Pattern verification failed" not in out and out.count("read ") == 2, out


def test_an_image_with_persistent_bitmaps_is_checked_with_their_clusters(
    tmp_path: Path, write_spec: Callable[..., Path]
) -> None:
    """The bitmap directory, tables and data clusters count as references."""
    image = image_with_data(tmp_path)
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 64k", str(image)], check=True,
                   capture_output=True)  # fmt: skip
    ours = cli("check", write_spec(SPEC))
    assert ours.returncode == 0, ours.stderr
    assert "status: clean" in ours.stdout
