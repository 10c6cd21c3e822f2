#!/usr/bin/env python3
"""fio through a fusedisk mount: a 3-child quorum over raw files beside a single raw disk.

    .venv/bin/python benchmarks/quorum_bench.py [--size 256M] [--runtime 5] [--dir DIR]
        [--jobs seq-read-1M,rand-read-4k-qd1,...] [--pattern quorum|fifo] [--json OUT]
        [--delay MS] [--cold]

Every target is a fusedisk mount of fully written images (random data, the same
in each child), measured in one run with the jobs of fio_compare.py.  The quorum
reads every child and compares the results; writes go to all three.  Results
belong in docs/benchmarks.md with the machine they ran on.

Slow children, the case where overlap matters: `--delay MS` puts a `faults` node
holding every read MS milliseconds over each child and over the single disk, so a
quorum read that overlaps its children costs one delay and one that does not costs
three.  `--cold` evicts the images from the page cache before each job
(posix_fadvise DONTNEED on the image files only: a global drop_caches would
disturb whatever else runs on the machine), so reads reach the device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fio_compare import JOBS, machine, mounted_spec, print_table, run_fio  # noqa: E402
from fusedisk.graph.options import parse_size  # noqa: E402


def make_images(work: Path, size: int, count: int) -> list[Path]:
    """`count` identical raw images of random data (one written, the rest copied).

    The last one is the single disk's, so its writes never touch the quorum's children.
    """
    first = work / "c0.img"
    subprocess.run(
        ["dd", "if=/dev/urandom", f"of={first}", "bs=1M", f"count={size >> 20}", "status=none"],
        check=True,
    )
    images = [first]
    for i in range(1, count):
        image = work / f"c{i}.img"
        shutil.copyfile(first, image)
        images.append(image)
    return images


def leaf(image: Path, delay: int) -> str:
    """A raw node over `image` as an inline table; with `delay`, behind a delaying faults node."""
    raw = f'{{ driver = "raw", filename = "{image}" }}'
    if not delay:
        return raw
    return f'{{ driver = "faults", delay-reads = true, delay = {delay}, file = {raw} }}'


def single_spec(images: list[Path], pattern: str, delay: int) -> str:
    return f'[nodes]\nd0 = {leaf(images[-1], delay)}\n[disks.vm0]\nnode = "d0"\n'


def quorum_spec(images: list[Path], pattern: str, delay: int) -> str:
    children = ", ".join(leaf(p, delay) for p in images[:3])
    return (
        f'[nodes.q]\ndriver = "quorum"\nvote-threshold = 2\nread-pattern = "{pattern}"\n'
        f'children = [{children}]\n[disks.vm0]\nnode = "q"\n'
    )


def evict(images: list[Path]) -> None:
    """Drop these files (only) from the page cache, after writing back what is dirty."""
    for image in images:
        fd = os.open(image, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


TARGETS = {"single raw": single_spec, "quorum 3 x raw": quorum_spec}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M")
    parser.add_argument("--runtime", type=int, default=5, help="seconds per job")
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--pattern", default="quorum", choices=("quorum", "fifo"))
    parser.add_argument("--dir", help="work folder (default: a temporary one)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--delay", type=int, default=0, help="hold every child read MS ms")
    parser.add_argument(
        "--cold", action="store_true", help="evict the images from the page cache before each job"
    )
    args = parser.parse_args()
    if not shutil.which("fio"):
        raise SystemExit("fio is not installed")
    size = parse_size(args.size)
    jobs = args.jobs.split(",")
    work = Path(args.dir or tempfile.mkdtemp(prefix="fusedisk-quorum-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        images = make_images(work, size, 4)
        for target, make_spec in TARGETS.items():
            results[target] = {}
            with mounted_spec(work, make_spec(images, args.pattern, args.delay)) as path:
                for job in jobs:
                    if args.cold:
                        evict(images)
                    results[target][job] = run_fio(path, JOBS[job], args.runtime, size)
                    print(f"{target:>16} {job:<20} {results[target][job]}", file=sys.stderr)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nMachine: {machine()}")
    print(
        f"Images: raw, {args.size}; quorum read-pattern {args.pattern}, vote-threshold 2; "
        f"fio libaio direct=1, {args.runtime} s per job"
        + (f"; every read held {args.delay} ms (faults)" if args.delay else "")
        + ("; page cache evicted before each job" if args.cold else "")
        + "\n"
    )
    single, quorum = list(TARGETS)
    print_table(results, jobs, quorum, single, "quorum / single")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
