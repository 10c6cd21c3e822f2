"""Graph jobs: how long a commit and a stream take (Graph and Disk, no FUSE).

    python benchmarks/jobs_bench.py [--rounds 7] [--mib 128]

A 2×MIB qcow2 disk: MIB MiB of random data, snapshot s1, MIB MiB more written
across the top half of the first layer (so the overlay holds MIB MiB), then a
commit of s1 is timed; then snapshot s2 and a stream of the whole chain.  Best
and median of the rounds.  The machines are noisy; compare figures from the same
run, and run with GLIBC_TUNABLES set as below to see the copy loop without the
allocator's page faults (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import trio

from fusedisk.graph.commit import start_commit
from fusedisk.graph.graph import Graph
from fusedisk.graph.snapshot import take_snapshot
from fusedisk.graph.stream import start_stream
from fusedisk.spec import parse_spec

MiB = 1 << 20
SPEC = '[nodes.d0]\ndriver = "qcow2"\nfilename = "d0.qcow2"\n[disks.vm0]\nnode = "d0"\n'


async def one_round(mib: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path / "d0.qcow2"),
                        f"{2 * mib}M"], check=True)  # fmt: skip
        graph = await Graph.open(parse_spec(SPEC, path / "spec.toml"))
        try:
            disk = graph.disks["vm0"]
            data = os.urandom(MiB)
            for i in range(mib):
                await disk.write(i * MiB, data)
            await take_snapshot(graph, disk, disk.root, "s1")
            for i in range(mib // 2, mib // 2 + mib):
                await disk.write(i * MiB, data)
            out = {}
            t0 = time.perf_counter()
            await graph.jobs.wait(await start_commit(graph, disk, ""))
            out[f"commit {mib} MiB"] = time.perf_counter() - t0
            await take_snapshot(graph, disk, disk.root, "s2")
            t0 = time.perf_counter()
            await graph.jobs.wait(await start_stream(graph, disk, ""))
            out[f"stream {2 * mib} MiB chain"] = time.perf_counter() - t0
            return out
        finally:
            await graph.close()


async def main(rounds: int, mib: int) -> None:
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, seconds in (await one_round(mib)).items():
            times.setdefault(name, []).append(seconds)
    for name, values in times.items():
        values.sort()
        print(f"{name}: best {values[0]:.3f} s, median {values[len(values) // 2]:.3f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mib", type=int, default=128)
    args = parser.parse_args()
    trio.run(main, args.rounds, args.mib)
