#!/usr/bin/env python3
"""fio over NBD: fusedisk's export beside qemu-nbd serving the same raw image.

    .venv/bin/python benchmarks/nbd_compare.py [--size 512M] [--runtime 5] [--jobs ...]

fio's nbd engine (libnbd) talks to each server on a unix socket; the table
gives MB/s or IOPS per job and the ratio fusedisk / qemu-nbd, then the server's
CPU per request.  Run on an otherwise idle machine; results belong in
docs/benchmarks.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fio_compare import JOBS, machine, make_image, print_table, run_fio  # noqa: E402
from fusedisk.graph.options import parse_size  # noqa: E402


@contextmanager
def server(cmd: list[str], sock: Path) -> Iterator[int]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start")
            time.sleep(0.05)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512M")
    parser.add_argument("--runtime", type=int, default=5, help="seconds per job")
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated job names")
    args = parser.parse_args()
    size = parse_size(args.size)
    jobs = args.jobs.split(",")
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fusedisk-nbd-bench-") as folder:
        work = Path(folder)
        image = work / "d0.img"
        make_image(image, size, "raw")
        spec = work / "spec.toml"
        spec.write_text(f'[nodes.d0]\ndriver = "raw"\nfilename = "{image}"\n\n'
                        '[disks.vm0]\nnode = "d0"\n')  # fmt: skip
        targets = {
            "fusedisk serve": [sys.executable, "-m", "fusedisk", "serve", "--nbd",
                               f"unix:{work / 'f.sock'}", str(spec)],
            "qemu-nbd": ["qemu-nbd", "-t", "-k", str(work / "q.sock"), "-f", "raw", "-x", "vm0",
                         "--shared=8", "--cache=writeback", "--aio=threads", str(image)],
        }  # fmt: skip
        socks = {"fusedisk serve": work / "f.sock", "qemu-nbd": work / "q.sock"}
        for name, cmd in targets.items():
            with server(cmd, socks[name]) as pid:
                uri = f"nbd+unix:///vm0?socket={socks[name]}"
                target = ["--ioengine=nbd", f"--uri={uri}"]
                results[name] = {
                    j: run_fio(image, JOBS[j], args.runtime, size, target, pid) for j in jobs
                }
    print(machine() + "\n")
    print_table(results, jobs, "fusedisk serve", "qemu-nbd", "fusedisk / qemu-nbd")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
