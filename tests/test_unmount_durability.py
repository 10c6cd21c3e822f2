"""Stopping the daemon while a writer is active loses nothing the writer saw flushed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import make_image, raw_spec

pytestmark = [pytest.mark.mount, pytest.mark.timeout(90)]

BLOCK = 4096
BLOCKS = 2048

WRITER = f"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
i = 0
try:
    while True:
        block = i % {BLOCKS}
        os.pwrite(fd, i.to_bytes(8, "little") * ({BLOCK} // 8), block * {BLOCK})
        if i % 8 == 7:
            os.fsync(fd)
            print(i, flush=True)
        i += 1
except OSError:
    pass
"""


def _written_blocks(last_flushed: int) -> dict[int, int]:
    expected = {}
    for i in range(last_flushed + 1):
        expected[i % BLOCKS] = i
    return expected


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "lazy unmount"])
def test_stopping_under_a_writer_keeps_every_flushed_write(how, tmp_path, write_spec, mount):
    image = make_image(tmp_path / "d0.img", BLOCK * BLOCKS)
    m = mount(write_spec(raw_spec()))
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(m.path("vm0.img"))], stdout=subprocess.PIPE, text=True
    )
    try:
        time.sleep(1.0)
        if how == "lazy unmount":
            # The mount lives on while the writer holds the disk open (as for any
            # filesystem); the daemon exits once the writer goes away.
            subprocess.run(["fusermount3", "-uz", str(m.mountpoint)], check=True)
            time.sleep(0.3)
            writer.terminate()
            assert m.proc is not None
            m.proc.wait(timeout=30)
            m.proc = None
        else:
            m.signal(getattr(signal, how))
        out, _ = writer.communicate(timeout=30)
    finally:
        writer.kill()
    flushed = [int(line) for line in out.split()]
    assert len(flushed) > 10, "the writer made no progress"
    data = image.read_bytes()
    for block, seq in _written_blocks(flushed[-1]).items():
        got = int.from_bytes(data[block * BLOCK : block * BLOCK + 8], "little")
        # A later, unflushed write may have landed too; an older value never.
        assert got >= seq, f"block {block}: flushed write {seq} lost (found {got})"
    assert "all disks flushed and closed" in m.log
