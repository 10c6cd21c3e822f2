"""The io_uring ring (aio = "io_uring"): results, errors, and what cancellation does."""

from __future__ import annotations

import errno
import os
import time

import pytest
import trio

from fusedisk.hostio.uring import Ring, available

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(available() is not None, reason=f"no io_uring: {available()}"),
]


async def test_read_write_fdatasync_and_errors(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abcdefgh" * 1024)
    fd = os.open(path, os.O_RDWR)
    ring = Ring()
    try:
        assert await ring.write(fd, b"XYZ", 8) == 3
        await ring.fdatasync(fd)
        buf = bytearray(16)
        assert await ring.read_into(fd, buf, 0) == 16
        assert bytes(buf) == b"abcdefghXYZdefgh"
        assert await ring.read_into(fd, buf, 1 << 20) == 0  # past the end
        with pytest.raises(OSError) as e:
            await ring.read_into(-1, buf, 0)
        assert e.value.errno == errno.EBADF
    finally:
        ring.close()
        os.close(fd)


async def test_a_cancelled_read_returns_at_once_and_the_ring_goes_on():
    r, w = os.pipe()
    ring = Ring()
    try:
        buf = bytearray(4)
        with trio.move_on_after(0.1) as scope:
            await ring.read_into(r, buf, 0)  # nothing to read: waits in the kernel
        assert scope.cancelled_caught
        os.write(w, b"late")  # completes the abandoned read; its result is dropped
        await trio.sleep(0.05)
        os.write(w, b"next")
        buf2 = bytearray(4)
        assert await ring.read_into(r, buf2, 0) == 4
        assert bytes(buf2) == b"next"
    finally:
        ring.close()
        os.close(r)
        os.close(w)


async def test_a_cancelled_write_waits_until_the_kernel_is_done_with_it():
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, bytes(65536))  # fill the pipe
    except BlockingIOError:
        pass
    ring = Ring()
    try:

        def drain_later() -> None:
            time.sleep(0.3)
            os.read(r, 65536)  # room for the write

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, drain_later)
            with trio.move_on_after(0.05) as scope:
                assert await ring.write(w, b"w" * 4096, 0) == 4096
                await trio.lowlevel.checkpoint()  # the cancellation comes here
            assert scope.cancelled_caught
            assert trio.current_time() - start >= 0.25  # it waited for the kernel
    finally:
        ring.close()
        os.close(r)
        os.close(w)


async def test_a_ring_closed_before_its_reaper_ran_ends_quietly():
    Ring().close()  # `fusedisk check` opens and closes files without waiting
    await trio.sleep(0.01)  # the reaper starts, sees the ring closed, and ends
