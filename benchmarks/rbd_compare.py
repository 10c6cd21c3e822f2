#!/usr/bin/env python3
"""fio through a fusedisk mount of an `rbd` node, beside qemu-storage-daemon's FUSE
export of the same image (`--blockdev driver=rbd`), on a throwaway single-OSD cluster.

    .venv/bin/python benchmarks/rbd_compare.py [--size 256M] [--runtime 5] [--jobs ...]

The cluster (scripts/ceph-single-node, one OSD on a sparse file) is started in a
temporary folder and removed at the end.  The image is filled first (rbd import of
random bytes) so reads measure data.  Ceph on one host is slow (~1-1.5k random 4K
write IOPS): compare the ratio fusedisk / qemu-storage-daemon, not the figures.
Results belong in docs/benchmarks.md with the machine (and its load) they ran on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fio_compare import (  # noqa: E402
    JOBS,
    machine,
    mounted_spec,
    print_table,
    run_fio,
    serving_process,
)
from fusedisk.graph.options import parse_size  # noqa: E402

SCRIPT = ROOT / "scripts" / "ceph-single-node"
DEFAULT_JOBS = "seq-read-1M,seq-write-1M,rand-read-4k-qd16,rand-write-4k-qd16,rand-write-4k-qd1"


@contextmanager
def cluster(work: Path) -> Iterator[str]:
    folder = work / "ceph"
    started = time.monotonic()
    out = subprocess.run([str(SCRIPT), "start", str(folder)], capture_output=True, text=True)
    try:
        if out.returncode != 0:
            raise SystemExit(f"the cluster did not start: {out.stderr}")
        print(f"cluster started in {time.monotonic() - started:.1f} s", file=sys.stderr)
        yield str(folder / "ceph.conf")
    finally:
        subprocess.run([str(SCRIPT), "stop", str(folder)])


@contextmanager
def qsd_rbd(conf: str, image: str, work: Path) -> Iterator[Path]:
    target = work / "qsd.img"
    target.touch()
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=rbd,node-name=d,pool=rbd,image={image},conf={conf}",
         "--export", f"type=fuse,id=e,node-name=d,mountpoint={target},writable=on"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(target):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"qemu-storage-daemon did not mount: {proc.stderr.read()!r}")
            time.sleep(0.05)
        yield target
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if os.path.ismount(target):
            subprocess.run(["fusermount3", "-uz", str(target)])


@contextmanager
def fusedisk_rbd(conf: str, image: str, work: Path) -> Iterator[Path]:
    spec = (f'[nodes.d0]\ndriver = "rbd"\npool = "rbd"\nimage = "{image}"\nconf = "{conf}"\n\n'
            '[disks.vm0]\nnode = "d0"\n')  # fmt: skip
    with mounted_spec(work, spec) as path:
        yield path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M")
    parser.add_argument("--runtime", type=int, default=5, help="seconds per job")
    parser.add_argument("--jobs", default=DEFAULT_JOBS, help="comma-separated job names")
    args = parser.parse_args()
    size = parse_size(args.size)
    jobs = args.jobs.split(",")
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fusedisk-rbd-bench-") as folder:
        work = Path(folder)
        with cluster(work) as conf:
            data = work / "fill.raw"
            with open(data, "wb") as f:
                for _ in range(size >> 20):
                    f.write(os.urandom(1 << 20))
            subprocess.run(["rbd", "-c", conf, "import", "--no-progress", str(data), "rbd/b0"],
                           check=True)  # fmt: skip
            data.unlink()
            targets = {"qemu-storage-daemon": qsd_rbd, "fusedisk": fusedisk_rbd}
            for name, start in targets.items():
                results[name] = {}
                with start(conf, "b0", work) as path:
                    for job in jobs:
                        results[name][job] = run_fio(
                            path, JOBS[job], args.runtime, size, daemon=serving_process(path)
                        )
    print(machine())
    print_table(results, jobs, "fusedisk", "qemu-storage-daemon", "fusedisk / qsd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
