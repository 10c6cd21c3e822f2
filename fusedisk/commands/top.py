"""`fusedisk top MOUNTPOINT`: live per-disk and per-node I/O, like `iostat -x 1`.

Every interval it reads the `stats` files of every disk and node and shows what
changed: requests and MB per second for reads and writes, the mean latency of
the requests completed in the interval (time spent / requests, from the
counters' latency sums), flushes, errors and the requests in flight (the queue
depth at the moment of reading).  On a terminal the table is redrawn in place
(rich); otherwise each report is printed as plain text after a time stamp, as
iostat does, so it can be logged or piped.  Reads only the mount's files.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusedisk.service.reader import check_mount, disk_names, read_disk, tree_rows

COLUMNS = ("device", "r/s", "rMB/s", "r_ms", "w/s", "wMB/s", "w_ms", "f/s", "err/s", "inflight")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "top",
        help="live per-disk and per-node IOPS, MB/s, latency and queue depth",
        description="Show I/O rates of a running mount's disks and nodes every INTERVAL "
        "seconds, like `iostat -x 1`: r/s, rMB/s, r_ms (mean read latency), w/s, wMB/s, "
        "w_ms, f/s (flushes), err/s and inflight (requests in progress). Plain text when "
        "stdout is not a terminal.",
    )
    p.add_argument("mountpoint", type=Path, help="where fusedisk is mounted")
    p.add_argument("-n", "--count", type=int, help="stop after COUNT reports")
    p.add_argument(
        "-i", "--interval", type=float, default=1.0, help="seconds between reports (default 1)"
    )
    p.add_argument("--disks", action="store_true", help="disks only, no per-node rows")
    p.set_defaults(func=run)


@dataclass
class Sample:
    at: float
    #: row label -> that row's stats dict (a disk, or a node below it)
    rows: dict[str, dict[str, Any]]


def sample(mountpoint: Path, nodes: bool) -> Sample:
    rows: dict[str, dict[str, Any]] = {}
    for name in disk_names(mountpoint):
        disk = read_disk(mountpoint, name, with_reports=False)
        rows[name] = disk.stats
        if nodes:
            for row in tree_rows(disk):
                if row.node is not None:
                    label = f"{'  ' * (row.depth + 1)}{row.name} ({row.node.driver})"
                    rows.setdefault(label, row.node.stats)
    return Sample(time.monotonic(), rows)


def _field(stats: dict[str, Any], kind: str, key: str) -> float:
    value = stats.get(kind, {})
    number = value.get(key, 0) if isinstance(value, dict) else 0
    return number if isinstance(number, int | float) else 0


def rates(before: Sample, after: Sample) -> list[tuple[str, ...]]:
    """One row of formatted columns per device present in both samples."""
    dt = max(after.at - before.at, 1e-6)
    out: list[tuple[str, ...]] = []
    for label, new in after.rows.items():
        old = before.rows.get(label)
        if old is None:
            continue

        def delta(kind: str, key: str, new: dict[str, Any] = new, old: dict = old) -> float:
            return max(0.0, _field(new, kind, key) - _field(old, kind, key))

        def latency_ms(kind: str) -> str:
            ops = delta(kind, "ops")
            return f"{delta(kind, 'total_time_ns') / ops / 1e6:.2f}" if ops else "0.00"

        kinds = [k for k, v in new.items() if isinstance(v, dict) and "errors" in v]
        errors = sum(delta(k, "errors") for k in kinds)
        out.append((
            label,
            f"{delta('read', 'ops') / dt:.1f}",
            f"{delta('read', 'bytes') / dt / 1e6:.2f}",
            latency_ms("read"),
            f"{delta('write', 'ops') / dt:.1f}",
            f"{delta('write', 'bytes') / dt / 1e6:.2f}",
            latency_ms("write"),
            f"{delta('flush', 'ops') / dt:.1f}",
            f"{errors / dt:.1f}",
            str(new.get("in_flight", 0)),
        ))  # fmt: skip
    return out


def plain(rows: list[tuple[str, ...]]) -> str:
    """Fixed-width columns, the device name left, numbers right (iostat's layout)."""
    table = [COLUMNS, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = []
    for row in table:
        numbers = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        cells = [row[0].ljust(widths[0]), *numbers]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _rich_table(mountpoint: Path, rows: list[tuple[str, ...]]) -> Any:
    from rich.table import Table

    table = Table(title=f"fusedisk top {mountpoint}  {time.strftime('%H:%M:%S')}")
    for i, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def run(args: argparse.Namespace) -> int:
    mountpoint: Path = args.mountpoint
    check_mount(mountpoint)
    interval = max(args.interval, 0.05)
    nodes = not args.disks
    before = sample(mountpoint, nodes)
    reports = 0
    if sys.stdout.isatty():
        from rich.live import Live

        with Live(_rich_table(mountpoint, []), auto_refresh=False) as live:
            while args.count is None or reports < args.count:
                time.sleep(interval)
                after = sample(mountpoint, nodes)
                live.update(_rich_table(mountpoint, rates(before, after)), refresh=True)
                before, reports = after, reports + 1
        return 0
    while args.count is None or reports < args.count:
        time.sleep(interval)
        after = sample(mountpoint, nodes)
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {mountpoint}")
        print(plain(rates(before, after)), end="\n\n", flush=True)
        before, reports = after, reports + 1
    return 0
