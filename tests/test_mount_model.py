"""Random reads, writes and flushes through a real mount agree with a model."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_image, raw_spec

pytestmark = [pytest.mark.mount, pytest.mark.timeout(300)]

DISK_SIZE = 4 << 20
# Sizes at the edges that matter: sectors, pages, FUSE's 1 MiB request limit.
SIZES = [1, 511, 512, 513, 4095, 4096, 4097, 65536, (1 << 20) - 1, 1 << 20, (1 << 20) + 1]

operation = st.one_of(
    st.tuples(
        st.just("write"),
        st.integers(0, DISK_SIZE - 1),
        st.sampled_from(SIZES) | st.integers(1, 200_000),
        st.integers(0, 2**32),
    ),
    st.tuples(
        st.just("read"),
        st.integers(0, DISK_SIZE - 1),
        st.sampled_from(SIZES) | st.integers(1, 200_000),
        st.just(0),
    ),
    st.tuples(st.just("fsync"), st.just(0), st.just(0), st.just(0)),
)


@pytest.fixture
def disk(tmp_path, write_spec, mount):
    make_image(tmp_path / "d0.img", DISK_SIZE)
    m = mount(write_spec(raw_spec()))
    fd = os.open(m.path("vm0.img"), os.O_RDWR)
    yield fd, tmp_path / "d0.img"
    os.close(fd)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(operation, min_size=1, max_size=25))
def test_random_io_matches_an_in_memory_model(disk, ops):
    fd, image = disk
    model = bytearray(image.read_bytes())  # start from whatever earlier examples left
    for kind, offset, size, seed in ops:
        size = min(size, DISK_SIZE - offset)
        if kind == "write":
            data = random.Random(seed).randbytes(size)
            assert os.pwrite(fd, data, offset) == size
            model[offset : offset + size] = data
        elif kind == "read":
            assert os.pread(fd, size, offset) == bytes(model[offset : offset + size])
        else:
            os.fsync(fd)
    os.fsync(fd)
    assert image.read_bytes() == bytes(model)
