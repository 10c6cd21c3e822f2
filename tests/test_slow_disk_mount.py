"""One slow device stalls nothing else: through the real mount, on each transport.

A disk whose every read takes seconds (a dying disk, a hung NFS server) is made
two ways: a `faults` node that delays its reads (deterministic), and a host
file that itself lives on a second mount with such delays (the daemon's pread
really blocks, in the host-I/O engine's worker).  While one such read is held,
reads of a second disk of the same mount and `cat` of control files must
answer, and the mount must still unmount afterwards.  Ordering is asserted,
not timing: the neighbour's 100 reads all finish while the slow read is held.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.mounting import Mount

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

SLOW_HOST_SPEC = """
[nodes.slow]
driver = "raw"
file = {{ driver = "file", filename = "{slow_host_file}", aio = "{aio}" }}

[nodes.fast]
driver = "raw"
# the backing mount has fast.img open too: share it knowingly (image locking)
file = {{ driver = "file", filename = "fast.img", locking = "off" }}

[disks.slow]
node = "slow"

[disks.fast]
node = "fast"
"""


def images(tmp_path: Path) -> bytes:
    """slow.img (the pattern 'slow') and fast.img (random, returned)."""
    make_image(tmp_path / "slow.img", 4 * MiB, b"slow")
    fast_data = os.urandom(4 * MiB)
    (tmp_path / "fast.img").write_bytes(fast_data)
    return fast_data


def delayed_so_far(m: Mount) -> int:
    """How many reads the `faults` node of `m` has held so far."""
    return int(json.loads(m.path("slow", "nodes", "slow", "stats").read_text())["requests_delayed"])


def assert_slow_disk_holds_nothing(
    m: Mount, fast_data: bytes, slow_read_held: Callable[[], bool], controls: Callable[[], None]
) -> None:
    """Read slow.img in a thread; once `slow_read_held()`, 100 reads of fast.img and the
    `controls` checks must all finish before that read returns (≥ 2 s later)."""
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
        while not slow_read_held():
            assert time.monotonic() < deadline, "the slow read never reached the slow device"
            time.sleep(0.02)
        rnd = random.Random(1)
        with open(m.path("fast.img"), "rb", buffering=0) as f:
            for _ in range(100):
                offset = rnd.randrange(4 * MiB // 4096) * 4096
                assert os.pread(f.fileno(), 4096, offset) == fast_data[offset : offset + 4096]
        assert m.path("fast", "size").read_text() == f"{4 * MiB}\n"
        stats = json.loads(m.path("fast", "nodes", "fast", "stats").read_text())
        assert stats["read"]["ops"] >= 100
        controls()
        neighbour_done_at = time.monotonic()
        assert "done_at" not in slow, "the slow read returned before its neighbour's reads"
    finally:
        reader.join(timeout=30)
    assert not reader.is_alive()
    assert slow["data"] == b"slow" * 1024
    assert float(slow["done_at"]) - start >= 2.0
    assert neighbour_done_at < float(slow["done_at"])
    m.stop()  # unmount works, and the daemon exits


@pytest.mark.parametrize(("name", "args"), TRANSPORTS, ids=[t[0] for t in TRANSPORTS])
def test_a_slow_disk_holds_neither_its_neighbour_nor_the_control_files(
    tmp_path, write_spec, mount, name, args
):
    fast_data = images(tmp_path)
    m = mount(write_spec(SPEC), extra_args=args)

    def controls() -> None:
        assert "delay = 3000" in m.path("slow", "nodes", "slow", "rules").read_text()

    assert_slow_disk_holds_nothing(m, fast_data, lambda: delayed_so_far(m) > 0, controls)


@pytest.mark.parametrize("aio", ["threads", "io_uring"])
def test_a_host_file_that_blocks_in_pread_holds_nothing_else(tmp_path, write_spec, mount, aio):
    """The host file itself is slow: it lives on a second mount whose reads take 3 s,
    so the daemon's read really waits (in a worker of the host-I/O engine, or in the
    kernel for io_uring)."""
    fast_data = images(tmp_path)
    backing = mount(write_spec(SPEC, "backing.toml"), "backing")
    spec = SLOW_HOST_SPEC.format(slow_host_file=backing.path("slow.img"), aio=aio)
    m = mount(write_spec(spec))

    def controls() -> None:
        assert m.path("slow", "size").read_text() == f"{4 * MiB}\n"

    assert_slow_disk_holds_nothing(m, fast_data, lambda: delayed_so_far(backing) > 0, controls)
