"""One slow device stalls nothing else: through the real mount, on each transport.

A `faults` node delays every read of one disk by seconds (a dying disk, a hung
NFS server, made deterministic); while one such read is held, reads of a
second disk of the same mount and `cat` of control files must answer, and the
mount must still unmount afterwards.  Ordering is asserted, not timing: the
neighbour's 100 reads all finish while the slow read is still held.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time

import pytest

from tests.conftest import make_image

pytestmark = [pytest.mark.mount, pytest.mark.timeout(90)]

MiB = 1 << 20
DELAY_MS = 3000
TRANSPORTS = [("kernel", ()), ("pyfuse3", ("--transport", "pyfuse3"))]

SPEC = f"""
[nodes.slow]
driver = "faults"
file = {{ driver = "raw", filename = "slow.img" }}
delay-reads = true
delay = {DELAY_MS}

[nodes.fast]
driver = "raw"
filename = "fast.img"

[disks.slow]
node = "slow"

[disks.fast]
node = "fast"
"""


def delayed_so_far(m) -> int:
    return int(json.loads(m.path("slow", "nodes", "slow", "stats").read_text())["requests_delayed"])


@pytest.mark.parametrize(("name", "args"), TRANSPORTS, ids=[t[0] for t in TRANSPORTS])
def test_a_slow_disk_holds_neither_its_neighbour_nor_the_control_files(
    tmp_path, write_spec, mount, name, args
):
    make_image(tmp_path / "slow.img", 4 * MiB, b"slow")
    fast_data = os.urandom(4 * MiB)
    (tmp_path / "fast.img").write_bytes(fast_data)
    m = mount(write_spec(SPEC), extra_args=args)

    slow: dict[str, object] = {}

    def read_slow() -> None:
        start = time.monotonic()
        with open(m.path("slow.img"), "rb", buffering=0) as f:
            slow["data"] = os.pread(f.fileno(), 4096, 0)
        slow["seconds"] = time.monotonic() - start
        slow["done_at"] = time.monotonic()

    reader = threading.Thread(target=read_slow)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while delayed_so_far(m) == 0:  # the daemon now holds the slow read
            assert time.monotonic() < deadline, "the slow read never reached the daemon"
            time.sleep(0.02)

        rnd = random.Random(1)
        with open(m.path("fast.img"), "rb", buffering=0) as f:
            for _ in range(100):
                offset = rnd.randrange(4 * MiB // 4096) * 4096
                assert os.pread(f.fileno(), 4096, offset) == fast_data[offset : offset + 4096]
        assert m.path("fast", "size").read_text() == f"{4 * MiB}\n"
        assert "delay = 3000" in m.path("slow", "nodes", "slow", "rules").read_text()
        stats = json.loads(m.path("fast", "nodes", "fast", "stats").read_text())
        assert stats["read"]["ops"] >= 100
        neighbour_done_at = time.monotonic()
        assert "done_at" not in slow, "the slow read returned before its neighbour's reads"
    finally:
        reader.join(timeout=30)
    assert not reader.is_alive()
    assert slow["data"] == b"slow" * 1024
    assert float(slow["seconds"]) >= 2.0  # type: ignore[arg-type]
    assert neighbour_done_at < float(slow["done_at"])  # type: ignore[arg-type]
    m.stop()  # unmount works, and the daemon exits


SLOW_HOST_SPEC = """
[nodes.slow]
driver = "raw"
filename = "{slow_host_file}"

[nodes.fast]
driver = "raw"
filename = "fast.img"

[disks.slow]
node = "slow"

[disks.fast]
node = "fast"
"""


def test_a_host_file_that_blocks_in_pread_holds_nothing_else(tmp_path, write_spec, mount):
    """The host file itself is slow: it lives on a second mount whose reads take 3 s,
    so the daemon's pread really blocks (in a worker of the host-I/O engine)."""
    make_image(tmp_path / "slow.img", 4 * MiB, b"slow")
    fast_data = os.urandom(4 * MiB)
    (tmp_path / "fast.img").write_bytes(fast_data)
    backing = mount(write_spec(SPEC, "backing.toml"), "backing")
    slow_host_file = backing.path("slow.img")
    m = mount(write_spec(SLOW_HOST_SPEC.format(slow_host_file=slow_host_file)))

    slow: dict[str, float | bytes] = {}

    def read_slow() -> None:
        with open(m.path("slow.img"), "rb", buffering=0) as f:
            slow["data"] = os.pread(f.fileno(), 4096, 8192)
        slow["done_at"] = time.monotonic()

    start = time.monotonic()
    reader = threading.Thread(target=read_slow)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while delayed_so_far(backing) == 0:  # the first daemon's pread is now blocked
            assert time.monotonic() < deadline, "the slow read never reached the host file"
            time.sleep(0.02)
        with open(m.path("fast.img"), "rb", buffering=0) as f:
            for i in range(100):
                offset = (i * 7919 % 1024) * 4096
                assert os.pread(f.fileno(), 4096, offset) == fast_data[offset : offset + 4096]
        assert m.path("slow", "size").read_text() == f"{4 * MiB}\n"
        neighbour_done_at = time.monotonic()
        assert "done_at" not in slow, "the blocked host read returned before the neighbour"
    finally:
        reader.join(timeout=30)
    assert not reader.is_alive()
    assert slow["data"] == b"slow" * 1024
    assert float(slow["done_at"]) - start >= 2.0
    assert neighbour_done_at < float(slow["done_at"])
    m.stop()
