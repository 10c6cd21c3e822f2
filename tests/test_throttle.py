"""The throttle driver on trio's mock clock: every limit, bursts, groups, run-time changes, drain.

Times are virtual (`autojump_clock`: the clock jumps whenever every task
waits), so each assertion is exact and the file runs in well under a second.
"""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from fusedisk.errors import ControlError, OpenError, SpecError
from fusedisk.filters.throttle.node import ThrottleGroup, ThrottleNode
from fusedisk.graph.disk import Disk
from fusedisk.graph.graph import Graph
from fusedisk.graph.registry import drivers
from fusedisk.spec import parse_spec
from tests.conftest import make_image, needs
from tests.memory_node import MemoryDriver

pytestmark = pytest.mark.timeout(30)

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture(autouse=True)
def memory_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(drivers(), "memory", MemoryDriver)


def disk_spec(n: int, limits: str = "", group: str | None = None, groups: str = "") -> str:
    """`n` disks vm0..vm{n-1}, each a throttle node t{i} over a memory node f{i}: its
    requests never leave the event loop, so the mock clock's times are exact."""
    text = groups
    for i in range(n):
        text += f'\n[nodes.f{i}]\ndriver = "memory"\n'
        text += f'[nodes.t{i}]\ndriver = "throttle"\nfile = "f{i}"\n'
        text += f'throttle-group = "{group}"\n' if group else limits + "\n"
        text += f'[disks.vm{i}]\nnode = "t{i}"\n'
    return text


async def open_graph(tmp_path: Path, text: str, disks: int = 1) -> Graph:
    for i in range(disks):
        (tmp_path / f"d{i}.img").write_bytes(bytes(4 * MiB))
    return await Graph.open(parse_spec(text, tmp_path / "spec.toml"))


Op = Callable[[], Awaitable[object]]


async def finish_times(ops: list[Op]) -> list[float]:
    """Start every op at once; the virtual time at which each one finished."""
    start = trio.current_time()
    times = [0.0] * len(ops)

    async def one(i: int) -> None:
        await ops[i]()
        times[i] = round(trio.current_time() - start, 6)

    async with trio.open_nursery() as nursery:
        for i in range(len(ops)):
            nursery.start_soon(one, i)
    return times


def reads(disk: Disk, count: int, size: int = 4 * KiB) -> list[Op]:
    return [partial(disk.read, i * size % disk.size, size) for i in range(count)]


def writes(disk: Disk, count: int, size: int = 4 * KiB) -> list[Op]:
    return [partial(disk.write, i * size % disk.size, b"w" * size) for i in range(count)]


# -- each limit -------------------------------------------------------------------


async def test_iops_total_lets_a_burst_of_a_tenth_second_then_spaces_requests(
    tmp_path, autojump_clock
):
    graph = await open_graph(tmp_path, disk_spec(1, "iops-total = 10"))
    disk = graph.disks["vm0"]
    times = sorted(await finish_times(reads(disk, 12)))
    # bucket = 10/10 = 1 operation: two go at once, then one per 100 ms
    assert times == pytest.approx([0, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    # writes share the total budget
    times = sorted(await finish_times(writes(disk, 5)))
    assert times[-1] > 0.4
    stats = graph.nodes["t0"].driver_stats()
    assert stats["requests"] == 17
    assert stats["requests_delayed"] >= 10
    assert stats["throttled_time_ns"] > 0
    assert stats["queued"] == {"read": 0, "write": 0}
    await graph.close()


@pytest.mark.parametrize(
    ("limits", "throttled", "free"),
    [
        ("iops-read = 10", reads, writes),
        ("iops-write = 10", writes, reads),
        ("bps-read = 40960", reads, writes),
        ("bps-write = 40960", writes, reads),
    ],
)
async def test_read_and_write_limits_hold_back_only_their_direction(
    tmp_path, autojump_clock, limits, throttled, free
):
    graph = await open_graph(tmp_path, disk_spec(1, limits))
    disk = graph.disks["vm0"]
    assert max(await finish_times(free(disk, 50))) == 0
    # 10 ops/s, or 40960 B/s of 4 KiB requests = 10 ops/s: the same schedule
    assert max(await finish_times(throttled(disk, 12))) == pytest.approx(1.0)
    await graph.close()


async def test_bps_total_spaces_requests_by_their_size(tmp_path, autojump_clock):
    graph = await open_graph(tmp_path, disk_spec(1, "bps-total = '1M'"))
    disk = graph.disks["vm0"]
    size = 64 * KiB
    times = sorted(await finish_times(writes(disk, 10, size)))
    bucket = MiB / 10
    expected = [max(0.0, (k * size - bucket) / MiB) for k in range(10)]
    assert times == pytest.approx(expected, abs=1e-6)
    await graph.close()


async def test_burst_max_and_max_length(tmp_path, autojump_clock):
    limits = "iops-total = 10\niops-total-max = 50\niops-total-max-length = 2"
    graph = await open_graph(tmp_path, disk_spec(1, limits))
    disk = graph.disks["vm0"]
    times = sorted(await finish_times(reads(disk, 200)))
    done_by = lambda t: sum(1 for x in times if x <= t + 1e-9)  # noqa: E731
    assert done_by(0) == 6  # the burst bucket (max/10) and one more
    assert done_by(1) == 56  # then at max = 50/s
    assert done_by(2) == 106
    assert done_by(5) - done_by(4) == 10  # the burst is spent: back to the average
    await graph.close()


async def test_iops_size_counts_large_requests_as_several(tmp_path, autojump_clock):
    graph = await open_graph(tmp_path, disk_spec(1, "iops-total = 10\niops-size = 4096"))
    disk = graph.disks["vm0"]
    small = sorted(await finish_times(reads(disk, 4, 4 * KiB)))
    assert small == pytest.approx([0, 0, 0.1, 0.2])
    await trio.sleep(10)  # let the bucket empty
    big = sorted(await finish_times(reads(disk, 4, 16 * KiB)))
    assert big == pytest.approx([0, 0.3, 0.7, 1.1])  # each counts as 4 operations
    await graph.close()


async def test_flush_is_not_throttled_and_discard_and_zeroes_count_as_writes(
    tmp_path, autojump_clock
):
    graph = await open_graph(tmp_path, disk_spec(1, "iops-write = 10"))
    disk = graph.disks["vm0"]
    root = disk.root
    await finish_times(writes(disk, 20))  # the write bucket is now deep
    t0 = trio.current_time()
    await disk.flush()
    assert trio.current_time() == t0
    await root.discard(0, 4096)
    t1 = trio.current_time()
    assert t1 > t0
    await root.write_zeroes(0, 4096)
    assert trio.current_time() > t1
    await disk.read(0, 4096)  # reads are free
    await graph.close()


async def test_unlimited_node_passes_everything_at_once(tmp_path, autojump_clock):
    graph = await open_graph(tmp_path, disk_spec(1))
    disk = graph.disks["vm0"]
    assert max(await finish_times(reads(disk, 100) + writes(disk, 100))) == 0
    await graph.close()


# -- groups -------------------------------------------------------------------------


GROUP = "[throttle-groups.g0]\niops-total = 10\n"


async def test_two_disks_in_a_group_share_one_budget_fairly(tmp_path, autojump_clock):
    graph = await open_graph(tmp_path, disk_spec(2, group="g0", groups=GROUP), disks=2)
    vm0, vm1 = graph.disks["vm0"], graph.disks["vm1"]
    order: list[str] = []

    def tagged(disk: Disk, tag: str) -> Op:
        async def op() -> None:
            await disk.read(0, 4096)
            order.append(tag)

        return op

    ops = [tagged(vm0, "a") for _ in range(20)] + [tagged(vm1, "b") for _ in range(20)]
    times = await finish_times(ops)
    # one budget: 40 requests at 10/s (2 at once) take 3.8 s together
    assert max(times) == pytest.approx(3.8)
    # round-robin: once both queue, they alternate
    tail = "".join(order[2:-2])  # after the first burst, until one runs out
    assert "aa" not in tail and "bb" not in tail
    group = graph.shared_objects[("throttle-groups", "g0")]
    assert isinstance(group, ThrottleGroup)
    stats = group.stats_dict()
    assert stats["members"] == ["t0", "t1"]
    assert stats["requests"] == 40
    await graph.close()


async def test_three_members_each_get_a_third(tmp_path, autojump_clock):
    graph = await open_graph(tmp_path, disk_spec(3, group="g0", groups=GROUP), disks=3)
    done = {"vm0": 0, "vm1": 0, "vm2": 0}

    async def hammer(name: str) -> None:
        disk = graph.disks[name]
        while True:
            await disk.read(0, 4096)
            done[name] += 1

    async with trio.open_nursery() as nursery:
        for name in done:
            for _ in range(4):  # four requests in flight per disk
                nursery.start_soon(hammer, name)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    total = sum(done.values())
    assert total in (301, 302, 303)  # 10/s for 30 s, plus the initial burst
    assert max(done.values()) - min(done.values()) <= 2  # the first burst of 2 aside
    # a cancelled waiter left no trace in the queues
    assert graph.shared_objects[("throttle-groups", "g0")].stats_dict()["queued"] == {
        "read": 0,
        "write": 0,
    }
    await graph.close()


async def test_a_quiet_member_is_not_starved_by_a_busy_one(tmp_path, autojump_clock):
    graph = await open_graph(tmp_path, disk_spec(2, group="g0", groups=GROUP), disks=2)
    vm0, vm1 = graph.disks["vm0"], graph.disks["vm1"]
    async with trio.open_nursery() as nursery:
        for op in reads(vm0, 100):
            nursery.start_soon(op)
        await trio.sleep(1)
        t0 = trio.current_time()
        await vm1.read(0, 4096)  # 90 requests of vm0 are queued ahead of it
        assert trio.current_time() - t0 <= 0.2 + 1e-9
        nursery.cancel_scope.cancel()
    await graph.close()


async def test_group_limit_changed_at_run_time_applies_to_every_member(tmp_path, autojump_clock):
    graph = await open_graph(tmp_path, disk_spec(2, group="g0", groups=GROUP), disks=2)
    group = graph.shared_objects[("throttle-groups", "g0")]
    assert group.option_values()["iops-total"] == "10"
    assert "iops-total" in group.runtime_options()
    vm0, vm1 = graph.disks["vm0"], graph.disks["vm1"]
    finished: list[float] = []

    async def op(disk: Disk) -> None:
        await disk.read(0, 4096)
        finished.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(op, vm0)
            nursery.start_soon(op, vm1)
        await trio.sleep(1.05)
        assert len(finished) == 12
        await group.set_option("iops-total", "1000\n")
    # the 88 queued requests went at 1000/s: 100 ms of burst, then 1 ms apart
    assert max(finished) - 1.05 < 0.1
    # a member's options show the group's limits, and writing them changes the group
    node = graph.nodes["t1"]
    assert node.option_values()["iops-total"] == "1000"
    await node.set_option("iops-total", "20")
    assert group.option_values()["iops-total"] == "20"
    assert graph.nodes["t0"].option_values()["iops-total"] == "20"
    await graph.close()


async def test_inline_limit_changed_at_run_time_releases_the_queue(tmp_path, autojump_clock):
    graph = await open_graph(tmp_path, disk_spec(1, "iops-total = 1"))
    disk = graph.disks["vm0"]
    node = graph.nodes["t0"]
    finished: list[float] = []

    async def op() -> None:
        await disk.read(0, 4096)
        finished.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(op)
        await trio.sleep(2.5)
        assert len(finished) == 3  # 1/s: two at once, one more at t = 1 (then 2 s)
        await node.set_option("iops-total", "0")  # unlimited
    assert max(finished) == pytest.approx(2.5)
    assert node.option_values()["iops-total"] == "0"
    await graph.close()


async def test_bad_run_time_values_are_refused_and_change_nothing(tmp_path, autojump_clock):
    graph = await open_graph(tmp_path, disk_spec(2, group="g0", groups=GROUP), disks=2)
    group = graph.shared_objects[("throttle-groups", "g0")]
    with pytest.raises(ControlError, match="throttle group 'g0': option 'iops-read'"):
        await group.set_option("iops-read", "5")  # iops-total is set
    with pytest.raises(ControlError, match=r"option 'iops-total-max'.*cannot be lower"):
        await group.set_option("iops-total-max", "5")
    with pytest.raises(ControlError, match="expected an integer"):
        await group.set_option("iops-total", "fast")
    with pytest.raises(ControlError, match="node 't0' \\(throttle group 'g0'\\)"):
        await graph.nodes["t0"].set_option("iops-write", "5")
    assert group.option_values()["iops-read"] == "0"
    assert group.option_values()["iops-total"] == "10"
    await graph.close()


# -- drain ----------------------------------------------------------------------------


async def test_drain_releases_the_queue_at_once(tmp_path, autojump_clock):
    graph = await open_graph(tmp_path, disk_spec(1, "iops-total = 1"))
    disk = graph.disks["vm0"]
    node = graph.nodes["t0"]
    assert isinstance(node, ThrottleNode)
    finished: list[float] = []

    async def op() -> None:
        await disk.write(0, b"x" * 4096)
        finished.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(op)
        await trio.sleep(0.5)
        t0 = trio.current_time()
        async with node.draining():
            await trio.testing.wait_all_tasks_blocked()
            assert len(finished) == 20
            assert trio.current_time() == t0
            await disk.read(0, 4096)  # and new requests pass too while drained
            assert trio.current_time() == t0
        # after the drain the limit holds again (the bucket is deep)
        t1 = trio.current_time()
        await disk.read(0, 4096)
        assert trio.current_time() > t1
    await graph.close()


async def test_disk_drain_does_not_stall_behind_a_throttled_queue(tmp_path, autojump_clock):
    graph = await open_graph(tmp_path, disk_spec(1, "iops-total = 1"))
    disk = graph.disks["vm0"]
    async with trio.open_nursery() as nursery:
        for op in writes(disk, 30):
            nursery.start_soon(op)
        await trio.sleep(0.5)
        t0 = trio.current_time()
        async with disk.drained():  # Disk.drained() calls begin_drain() on its nodes
            assert trio.current_time() == t0
        assert graph.nodes["t0"].driver_stats()["queued"] == {"read": 0, "write": 0}
    await graph.close()


# -- spec errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (disk_spec(1, "iops-total = 10\niops-read = 5"), ["node 't0'", "option 'iops-read'"]),
        (disk_spec(1, "bps-total-max = 5"), ["node 't0'", "option 'bps-total-max'"]),
        (disk_spec(1, group="nope"), ["node 't0'", "[throttle-groups.nope]"]),
        (
            disk_spec(1, group="g0", groups="[throttle-groups.g0]\niops-total = 1\niops-write = 1"),
            ["node 't0'", "[throttle-groups.g0]", "option 'iops-write'"],
        ),
    ],
)
async def test_invalid_limits_are_refused_at_open(tmp_path, text, words):
    with pytest.raises(OpenError) as info:
        await open_graph(tmp_path, text)
    for word in words:
        assert word in str(info.value)


async def test_group_and_inline_limits_exclude_each_other(tmp_path):
    text = disk_spec(1, group="g0", groups=GROUP).replace(
        'throttle-group = "g0"', 'throttle-group = "g0"\niops-read = 5'
    )
    with pytest.raises(OpenError, match="either 'throttle-group' or inline limits"):
        await open_graph(tmp_path, text)


def test_group_options_are_checked_by_the_spec(tmp_path):
    text = disk_spec(1, group="g0", groups="[throttle-groups.g0]\niops-totl = 1\n")
    with pytest.raises(SpecError, match=r"\[throttle-groups.g0\].*unknown option 'iops-totl'"):
        parse_spec(text, tmp_path / "spec.toml")


# -- through a real mount --------------------------------------------------------------------

MOUNT_SPEC = """
[throttle-groups.g0]
iops-total = 200

[nodes.alone]
driver = "throttle"
iops-total = 200
file = { driver = "raw", filename = "d0.img" }

[nodes.m1]
driver = "throttle"
throttle-group = "g0"
file = { driver = "raw", filename = "d1.img" }

[nodes.m2]
driver = "throttle"
throttle-group = "g0"
file = { driver = "raw", filename = "d2.img" }

[disks.vm0]
node = "alone"
[disks.vm1]
node = "m1"
[disks.vm2]
node = "m2"
"""


def _fio_iops(*disks: Path, runtime: int) -> list[float]:
    cmd = ["fio", "--output-format=json", "--direct=1", "--ioengine=libaio", "--iodepth=8"]
    cmd += ["--bs=4k", "--rw=randread", "--time_based", f"--runtime={runtime}"]
    for i, disk in enumerate(disks):
        cmd += [f"--name=j{i}", f"--filename={disk}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 60)
    assert result.returncode == 0, result.stdout + result.stderr
    return [job["read"]["iops"] for job in json.loads(result.stdout)["jobs"]]


@pytest.mark.mount
@pytest.mark.timeout(90)
@needs("fio")
def test_fio_measures_the_limit_and_a_group_shares_it(tmp_path, write_spec, mount):
    for i in range(3):
        make_image(tmp_path / f"d{i}.img", 16 * MiB)
    m = mount(write_spec(MOUNT_SPEC))
    # One run at a time: a throttled request holds one of the kernel's 12 FUSE
    # background slots, which all disks of a mount share (see docs/drivers/throttle.md).
    # The limit is a ceiling (within 10 %); how close a run comes to it depends on
    # how busy the machine is, so the floor is loose: timing belongs in benchmarks.
    (alone,) = _fio_iops(m.path("vm0.img"), runtime=10)
    assert 100 <= alone <= 220  # iops-total = 200
    in_g0_a, in_g0_b = _fio_iops(m.path("vm1.img"), m.path("vm2.img"), runtime=6)
    assert 100 <= in_g0_a + in_g0_b <= 220  # one budget for both members...
    assert abs(in_g0_a - in_g0_b) <= 0.1 * (in_g0_a + in_g0_b)  # ...shared fairly
    stats = json.loads(m.path("throttle-groups", "g0", "stats").read_text())
    assert stats["members"] == ["m1", "m2"]
    assert stats["requests_delayed"] > 0
    # a limit written in the mount takes effect for every member
    m.path("vm1", "nodes", "m1", "options", "iops-total").write_text("1000\n")
    assert m.path("throttle-groups", "g0", "options", "iops-total").read_text().strip() == "1000"
    assert m.path("vm2", "nodes", "m2", "options", "iops-total").read_text().strip() == "1000"
    with pytest.raises(OSError) as info:
        m.path("throttle-groups", "g0", "options", "iops-read").write_text("5\n")
    assert info.value.errno == errno.EINVAL
