"""qcow2: concurrent guest reads of different clusters run side by side, metadata included.

A qcow2 with 4 KiB clusters (one L2 table maps 2 MiB) sits on a `faults` node that
holds every read for a while, like a slow device. Eight guests threads read eight
clusters mapped by eight different L2 tables, none cached yet: each read needs an
L2 table read and then a data read, both held. If the image serialised its
metadata reads (one lock around the table cache, say), the faults node would see
one request at a time; it must see them side by side. Asserted by the node's
`peak_in_flight`, not by timing.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from pathlib import Path

import pytest

from tests.conftest import needs, run

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120), needs("qemu-img", "qemu-io")]

MiB = 1 << 20
TABLE_SPAN = 2 * MiB  # guest bytes one L2 table maps with 4 KiB clusters
READERS = 8
FIRST_UNCACHED = 8  # tables 8..15: not among those read at open

SPEC = """
[nodes.slow]
driver = "faults"
file = {{ driver = "file", filename = "{image}" }}

[nodes.d0]
driver = "qcow2"
file = "slow"
l2-cache-size = "16K"   # four tables: the first four are read at open, the rest on demand

[disks.vm0]
node = "d0"
"""


def read_direct(path: Path, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    finally:
        os.close(fd)


def test_reads_of_clusters_in_different_l2_tables_run_side_by_side(tmp_path, write_spec, mount):
    image = tmp_path / "d0.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, "32M")
    for i in range(READERS):
        offset = (FIRST_UNCACHED + i) * TABLE_SPAN
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {i + 1} {offset} 4k", image)
    m = mount(write_spec(SPEC.format(image=image)))
    slow = m.path("vm0", "nodes", "slow")
    (slow / "options" / "delay").write_text("300\n")
    (slow / "options" / "delay-reads").write_text("true\n")
    before = json.loads((slow / "stats").read_text())["peak_in_flight"]
    results: dict[int, bytes] = {}

    def reader(i: int) -> None:
        results[i] = read_direct(m.path("vm0.img"), (FIRST_UNCACHED + i) * TABLE_SPAN)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(results[i] == bytes([i + 1]) * 4096 for i in range(READERS))
    stats = json.loads((slow / "stats").read_text())
    assert stats["requests_delayed"] >= 2 * READERS  # a table read and a data read each
    assert before <= 1 and stats["peak_in_flight"] >= READERS // 2
    m.stop()
    run("qemu-img", "check", "-q", image)
