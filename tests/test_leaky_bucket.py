"""The leaky bucket as a meter (QEMU's util/throttle.c semantics), with the time passed in."""

from __future__ import annotations

import pytest

from fusedisk.filters.throttle.bucket import (
    NS_PER_S,
    VALUE_MAX,
    Direction,
    LeakyBucket,
    ThrottleConfig,
    ThrottleConfigError,
    ThrottleState,
)

R, W = Direction.READ, Direction.WRITE
MS = NS_PER_S // 1000


def run(state: ThrottleState, direction: Direction, nbytes: int, count: int) -> list[float]:
    """Let `count` requests go as soon as allowed; the time (s) each one went."""
    now = 0
    times = []
    for _ in range(count):
        while wait := state.wait_ns(direction, now):
            now += wait
        state.account(direction, nbytes)
        times.append(now / NS_PER_S)
    return times


def state(**options: int) -> ThrottleState:
    config = ThrottleConfig.from_options({k.replace("_", "-"): v for k, v in options.items()})
    return ThrottleState(config, 0)


def test_without_max_the_burst_is_a_tenth_of_a_second_of_the_average():
    # bucket = 10 / 10 = 1 unit: a request goes while level <= 1, so two go at
    # once, then one every 100 ms.
    times = run(state(iops_total=10), R, 4096, 6)
    assert times == pytest.approx([0, 0, 0.1, 0.2, 0.3, 0.4])


def test_a_bucket_leaks_at_its_average_rate():
    b = LeakyBucket(avg=100)
    b.pour(50)
    b.leak(250 * MS)
    assert b.level == pytest.approx(25)
    b.leak(NS_PER_S)
    assert b.level == 0


def test_bps_spaces_requests_by_size_over_rate():
    rate, size = 1 << 20, 64 << 10
    times = run(state(bps_total=rate), W, size, 8)
    bucket = rate / 10
    expected = [max(0.0, (k * size - bucket) / rate) for k in range(8)]
    assert times == pytest.approx(expected, abs=1e-6)


def test_read_and_write_limits_apply_to_their_direction_only():
    s = state(iops_read=10, bps_write=1000)
    assert run(s, W, 1, 5) == [0, 0, 0, 0, 0]  # 5 bytes, far below the write bucket
    s = state(iops_read=10)
    assert run(s, W, 4096, 50) == [0] * 50
    assert run(s, R, 4096, 3) == pytest.approx([0, 0, 0.1])


def test_total_limits_count_both_directions():
    s = state(iops_total=10)
    s.account(R, 512)
    s.account(W, 512)
    assert s.wait_ns(R, 0) == 100 * MS
    assert s.wait_ns(W, 0) == 100 * MS


def test_burst_runs_at_max_for_about_max_length_then_falls_to_the_average():
    s = state(iops_total=10, iops_total_max=50, iops_total_max_length=2)
    times = run(s, R, 4096, 200)
    done_by = lambda t: sum(1 for x in times if x <= t + 1e-9)  # noqa: E731
    # Burst bucket (max/10 = 5 units) lets 6 go at once, then 50 per second...
    assert done_by(0) == 6
    assert done_by(1.0) == 56
    # ...until the main bucket (max x length = 100 units, leaking at 10/s) is
    # full: 6 + 40 t = 100 -> about 2.35 s of burst...
    first_slow = next(i for i in range(1, len(times)) if times[i] - times[i - 1] > 0.021)
    assert first_slow == 124
    assert times[first_slow - 1] == pytest.approx(2.36)
    # ...then exactly the average.
    assert done_by(8) - done_by(5) == 30


def test_max_without_length_allows_max_units_at_once():
    times = run(state(iops_total=10, iops_total_max=30), R, 512, 35)
    assert times[:31] == [0] * 31
    assert times[31] == pytest.approx(0.1)


def test_iops_size_counts_large_requests_as_several_operations():
    s = state(iops_total=10, iops_size=4096)
    assert s.units(16384) == 4
    assert s.units(4096) == 1
    assert s.units(512) == 1  # a small request is still one operation
    times = run(s, R, 16384, 4)
    # bucket 1 unit: the first goes (level 4), then each waits for 4 units to leak
    assert times == pytest.approx([0, 0.3, 0.7, 1.1])


def test_reconfiguring_empties_the_buckets():
    s = state(iops_total=1)
    for _ in range(10):
        s.account(R, 512)
    assert s.wait_ns(R, 0) > 0
    s.configure(ThrottleConfig.from_options({"iops-total": 1000}), 0)
    assert s.wait_ns(R, 0) == 0


def test_zero_means_unlimited():
    assert not ThrottleConfig.from_options({}).enabled
    assert run(state(), W, 1 << 20, 100) == [0] * 100


@pytest.mark.parametrize(
    ("options", "option", "words"),
    [
        ({"iops-total": 10, "iops-read": 5}, "iops-read", "cannot be set together with"),
        ({"bps-total": 10, "bps-write": 5}, "bps-write", "'bps-total'"),
        ({"iops-total-max": 100}, "iops-total-max", "needs its average limit 'iops-total'"),
        ({"bps-read": 100, "bps-read-max": 50}, "bps-read-max", "cannot be lower"),
        ({"iops-write": 5, "iops-write-max-length": 3}, "iops-write-max-length", "burst rate"),
        ({"iops-total": 5, "iops-total-max-length": 0}, "iops-total-max-length", "at least 1"),
        ({"bps-total": -1}, "bps-total", "0 (unlimited) or more"),
        ({"bps-total": VALUE_MAX + 1}, "bps-total", "at most"),
        ({"bps-total": 10, "iops-size": 4096}, "iops-size", "needs an iops limit"),
        (
            {"bps-total": 10, "bps-total-max": VALUE_MAX, "bps-total-max-length": 2},
            "bps-total-max-length",
            "too large",
        ),
    ],
)
def test_invalid_combinations_are_refused_naming_the_option(options, option, words):
    with pytest.raises(ThrottleConfigError) as info:
        ThrottleConfig.from_options(options)
    assert info.value.option == option
    assert f"option '{option}'" in str(info.value)
    assert words in str(info.value)


def test_valid_combinations_pass():
    ThrottleConfig.from_options(
        {
            "iops-read": 100,
            "iops-write": 50,
            "bps-total": 1 << 20,
            "bps-total-max": 2 << 20,
            "bps-total-max-length": 10,
            "iops-size": 4096,
        }
    )
    config = ThrottleConfig.from_options({"iops-total": 10})
    with pytest.raises(ThrottleConfigError):
        config.with_value("iops-read", 5)
    assert config.with_value("iops-total", 20).get("iops-total") == 20
